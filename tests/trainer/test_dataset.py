"""Examples cut from interaction sequences: fresh histories for a refresh."""

from datetime import UTC, datetime

from reward_rules.policy import Policy
from server.schemas import Item
from trainer.corpus import Corpus
from trainer.dataset import ExampleBuilder, Shape
from trainer.index_build import build_index

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def corpus() -> Corpus:
    items = {
        f"i{n}": Item(item_id=f"i{n}", title=f"Film {n}", categories=["drama"], created_at=NOW)
        for n in range(12)
    }
    # (user, items in time order, time of their last interaction)
    users = {"old": (["i0", "i1", "i2"], 100), "new": (["i3", "i4", "i5"], 300)}
    users |= {"mid": (["i6", "i7", "i8"], 200), "one": (["i9"], 400)}
    sequences = {
        user: [(item, last - len(seq) + 1 + t) for t, item in enumerate(seq)]
        for user, (seq, last) in users.items()
    }
    return Corpus(items=items, profiles={}, sequences=sequences)


def builder() -> ExampleBuilder:
    data = corpus()
    sequences = [[item for item, _ in seq] for seq in data.sequences.values()]
    index = build_index(list(data.items.values()), sequences, dim=4, seed=0)
    return ExampleBuilder(data, index, Shape(candidates=11, history=5))


def test_fresh_takes_the_latest_interaction_of_the_most_recent_users() -> None:
    fresh = builder().fresh(2)

    # "one" has a single interaction: nothing to predict it from.
    assert [example.user_id for example in fresh] == ["new", "mid"]
    assert [example.positives for example in fresh] == [["i5"], ["i8"]]
    for example in fresh:
        assert example.positives[0] in example.candidates
        assert "Film 3" in example.prompt or "Film 6" in example.prompt  # the history before it


def test_users_the_gate_scores_give_no_fresh_example_and_others_take_their_place() -> None:
    """Passed over after the newest were taken, they left as few fresh examples as the gate has
    users among the most recent (most of them, where feedback is mostly ratings)."""
    assert [example.user_id for example in builder().fresh(2, exclude={"new"})] == ["mid", "old"]


def test_no_fresh_examples_asked_none_given() -> None:
    assert builder().fresh(0) == []


def test_validation_keeps_users_whose_item_retrieval_missed() -> None:
    small = builder()
    small.shape = Shape(candidates=1, history=5)
    small.corpus.sequences["odd"] = [("i0", 10), ("i1", 11), ("i7", 12)]  # not i2, as others did

    validation = {example.user_id: example for example in small.validation(users=10, seed=0)}

    # Every user with 3+ interactions, whether or not the candidates hold the last item.
    assert sorted(validation) == ["mid", "new", "odd", "old"]
    assert validation["odd"].candidates == ["i2"] and validation["odd"].positives == ["i7"]
    assert small.example("odd", 2) is None  # a training example needs its positive


def test_a_training_example_never_names_the_held_out_last_item() -> None:
    """Validation holds out each user's last interaction: a training position's next k items
    stop before it (185 of 577 training targets named it on a small synthetic store)."""
    examples = builder()

    training = examples.example("old", 1)
    held_out = examples.example("old", 2, need_positive=False)

    assert training is not None and training.positives == ["i1"]  # not i2
    assert held_out is not None and held_out.positives == ["i2"]


def test_a_user_who_has_seen_the_whole_catalog_is_no_example() -> None:
    """Nothing is left to recommend: validation skips them (a ValueError stopped bootstrap)."""
    examples = builder()
    again = [(f"i{n}", float(n)) for n in range(12)] + [("i0", 12.0)]  # came back to i0
    examples.corpus.sequences["all"] = again

    assert examples.example("all", 12, need_positive=False) is None
    assert "all" not in {e.user_id for e in examples.validation(users=10, seed=0)}


def test_an_item_come_back_to_shows_once_where_the_user_last_had_it() -> None:
    """As the gateway's history keeps it (a click, then a purchase of the same item): the
    prompt listed it twice."""
    again = builder()
    again.corpus.sequences["back"] = [("i0", 1), ("i1", 2), ("i0", 3), ("i2", 4), ("i3", 5)]

    example = again.example("back", 3, need_positive=False)

    assert example is not None
    assert example.prompt.count("Film 0") == 1
    assert example.prompt.index("Film 1") < example.prompt.index("Film 0")


def test_candidates_are_what_the_policy_would_serve() -> None:
    """The gateway never offers an item the policy finds unavailable (out of stock, here);
    training taught the model to pick it."""
    taught = builder()
    gone = taught.candidates(["i3"])[0]
    stock = taught.corpus.items[gone].model_copy(update={"attributes": {"in_stock": 0}})
    taught.corpus.items[gone] = stock
    policy = Policy(attributes={"available": "in_stock"})
    offered = ExampleBuilder(taught.corpus, taught.index, taught.shape, policy)

    assert gone in taught.candidates(["i3"]) and gone not in offered.candidates(["i3"])
    assert all(gone not in example.candidates for example in offered.fresh(3))
