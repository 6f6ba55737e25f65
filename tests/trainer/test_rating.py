"""The rating task's training side: examples cut without leaks, sampling under the rating
grammar, composed reasoning, validation against the bias baseline, both recipes end to end."""

import re
from datetime import UTC, datetime
from pathlib import Path

import pytest
import torch

from contract.prompt import Rendering
from contract.rating import RATING_WEIGHTS, STEP_CHARS, parse_rating, rating_pattern
from contract.tasks import Task
from reward_rules.policy import DEFAULT_POLICY, build_terms
from server.schemas import Item
from tests.trainer.test_constrained import sample
from trainer.constrained import RatingConstraint, constrained_generation
from trainer.corpus import Corpus
from trainer.model import build_model
from trainer.presets import GrpoSettings, RatingPreset, Recipe, SftSettings
from trainer.rating import (
    RatingExampleBuilder,
    compose_steps,
    errors,
    train_rating,
    validate_rating,
)
from trainer.tokenizer import train_tokenizer

NOW = datetime(2026, 1, 1, tzinfo=UTC)
GENRES = ["drama", "comedy"]


def corpus(users: int = 12) -> Corpus:
    """Drama fans rate dramas 5 and comedies 2; comedy fans the other way round."""
    items = {
        f"i{n}": Item(
            item_id=f"i{n}", title=f"Film {n}", categories=[GENRES[n % 2]], created_at=NOW
        )
        for n in range(10)
    }
    ratings, sequences = {}, {}
    for u in range(users):
        liked = GENRES[u % 2]
        rated = [(f"i{(u + t) % 10}", 0.0) for t in range(6)]
        rated = [(item, 5.0 if items[item].categories[0] == liked else 2.0) for item, _ in rated]
        ratings[f"u{u}"] = rated
        sequences[f"u{u}"] = [(item, float(t)) for t, (item, _) in enumerate(rated)]
    return Corpus(items=items, profiles={}, sequences=sequences, ratings=ratings)


@pytest.fixture(scope="module")
def data() -> Corpus:
    return corpus()


def test_examples_hold_out_each_users_last_rating_and_never_see_their_answer(data) -> None:
    builder = RatingExampleBuilder(data, Rendering.compact, history=3)
    examples = builder.build(count=1000, validation_users=5, seed=0)

    assert examples.rendering is Rendering.compact
    assert len(examples.validation) == 5
    for example in examples.validation:
        last_item, last_value = data.ratings[example.user_id][-1]
        assert example.rating == last_value
        assert f"item #{last_item} " in example.prompt
    # every position but each user's last: 12 users x 5
    assert len(examples.train) == 60
    example = builder.example("u0", 3)
    lines = example.prompt.splitlines()
    # the three ratings before t, the mean of those before t, the item's mean without this one
    assert lines[1] == "#i0=5, #i1=2, #i2=5"
    # u0 rated i0=5, i1=2, i2=5: each item's mean is pulled by the others' ratings, so the
    # lean follows the newest (5) most and is positive
    assert lines[2].startswith("user mean=4.0 n=3 lean=+")
    item, value = data.ratings["u0"][3]
    others = [v for r in data.ratings.values() for i, v in r if i == item]
    assert (
        lines[3]
        == f"item #{item} mean={(sum(others) - value) / (len(others) - 1):.1f} n={len(others) - 1}"
    )
    assert example.target.endswith(f"<rating>{int(value)}</rating>")
    assert parse_rating(example.target).well_formed


def test_half_stars_are_taught_half_up_and_half_down() -> None:
    """The served rating is the model's expected one: targets that all rounded 4.5 to 4 (and
    3.5 to 4) taught it to serve 4 for both."""
    halves = corpus()
    halves.ratings = {user: [(i, 4.5) for i, _ in rated] for user, rated in halves.ratings.items()}
    builder = RatingExampleBuilder(halves, Rendering.compact, history=3)

    written = [parse_rating(e.target).rating for e in builder.build(1000, 1, seed=0).train]

    assert sorted(set(written)) == [4, 5]
    assert abs(sum(written) / len(written) - 4.5) < 0.1


def test_an_item_rated_again_shows_its_latest_rating_once() -> None:
    """As the gateway keeps it: a prompt that listed both ratings was one it never serves."""
    again = corpus()
    first, second, *rest = again.ratings["u0"]
    again.ratings["u0"] = [first, second, (first[0], 1.0), *rest]
    builder = RatingExampleBuilder(again, Rendering.compact, history=3)

    lines = builder.example("u0", 3).prompt.splitlines()

    assert lines[1] == f"#{second[0]}=2, #{first[0]}=1"
    assert lines[2].startswith("user mean=1.5 n=2 ")


def test_compact_steps_are_numbers_and_rich_steps_are_sentences(data) -> None:
    history = [(data.items["i0"], 5.0), (data.items["i2"], 5.0), (data.items["i1"], 2.0)]
    from contract.prompt import ItemView
    from contract.rating import Stats

    drama = ItemView.model_validate(data.items["i4"], from_attributes=True)
    compact = compose_steps(history, drama, Stats(mean=3.5, count=4), Rendering.compact)
    # mean 4.0; others rate it 3.5; their dramas average 5.0, one above their mean
    assert compact == ["4.0", "3.5", "+1.0"]
    rich = compose_steps(history, drama, Stats(mean=3.5, count=4), Rendering.rich)
    assert rich[0] == "Rates 4.0 on average; likes drama."
    assert "Strong for them: drama" in rich[1]
    assert rich[2] == "They rate such items 1.0 above their mean."
    assert compose_steps([], drama, Stats(), Rendering.compact) == ["new", "new", "none"]


@pytest.fixture(scope="module")
def tokenizer(data):
    builder = RatingExampleBuilder(data, Rendering.compact, history=3)
    texts = [e.prompt + e.target for e in builder.build(100, 2, 0).train]
    return train_tokenizer(texts, list(data.items), 300, {Task.rank, Task.rate})


def test_untrained_samples_follow_the_rating_grammar(data, tokenizer) -> None:
    model = build_model(tokenizer, "tiny", seed=0).eval()
    builder = RatingExampleBuilder(data, Rendering.compact, history=3)
    prompts = [e.prompt for e in builder.build(8, 2, 0).train]
    constraint = RatingConstraint(tokenizer, STEP_CHARS[Rendering.compact])

    with constrained_generation(model, constraint):
        texts = sample(model, tokenizer, prompts, budget=constraint.length, seed=1)

    pattern = rating_pattern(Rendering.compact)
    for text in texts:
        assert re.fullmatch(pattern, text), text
        assert parse_rating(text).well_formed
    # without it, an untrained model writes anything
    free = sample(model, tokenizer, prompts, budget=constraint.length, seed=1)
    assert not any(parse_rating(text).well_formed for text in free)


def test_errors() -> None:
    assert errors([3.0, 5.0], [4.0, 4.0]) == {"mae": 1.0, "rmse": 1.0}
    assert errors([4.0, 2.0], [4.0, 4.0]) == {"mae": 1.0, "rmse": pytest.approx(2**0.5)}


PRESET = RatingPreset(
    sft_examples=60,
    sft=SftSettings(epochs=20, batch_size=8, learning_rate=3e-3, progress=False),
    grpo_examples=8,
    grpo=GrpoSettings(max_steps=2, prompts_per_step=2, num_generations=4, progress=False),
    zero_grpo=GrpoSettings(max_steps=2, prompts_per_step=2, num_generations=4, progress=False),
    validation_users=6,
)


@pytest.mark.parametrize("recipe", list(Recipe))
def test_both_recipes_train_and_validate_against_the_baseline(
    data, tokenizer, recipe: Recipe, tmp_path: Path
) -> None:
    torch.manual_seed(0)
    model = build_model(tokenizer, "tiny", seed=0)
    builder = RatingExampleBuilder(data, Rendering.compact, history=3)
    examples = builder.build(PRESET.sft_examples, PRESET.validation_users, 0)
    terms = build_terms(DEFAULT_POLICY, {}, {}, Task.rate)

    model, stages = train_rating(model, tokenizer, examples, PRESET, recipe, terms, tmp_path)
    scores = validate_rating(model, tokenizer, examples.validation, examples.rendering)

    # what the model scored before GRPO: after SFT (RecOne), as the base (RecZero)
    assert list(stages) == ["rate_sft_rmse" if recipe is Recipe.one else "rate_base_rmse"]
    assert scores["rate_failed"] == 0.0  # the grammar always yields a rating
    assert 0 <= scores["rate_mae"] <= scores["rate_rmse"] <= 4
    assert scores["rate_validation_ratings"] == 6
    # the served mix is chosen among the weights and is no worse than the model alone
    assert scores["rating_weight"] in RATING_WEIGHTS
    assert scores["rate_rmse"] <= scores["rate_model_rmse"]
    baseline = [e.baseline for e in examples.validation]
    assert scores["rate_baseline_rmse"] == pytest.approx(
        errors(baseline, [e.rating for e in examples.validation])["rmse"]
    )
    if recipe is Recipe.one:
        # the data is learnable: SFT on it predicts the held-out ratings better than the baseline
        assert scores["rate_rmse"] < scores["rate_baseline_rmse"]


def test_a_refresh_learns_from_the_latest_ratings_and_holds_out_the_newest(data) -> None:
    """Who rated last, not whose last positive event came last: a rating below 4 is no positive
    event, and the raters were picked by their positives."""
    users = list(data.sequences)
    stamped = data.model_copy(
        update={
            "rated_at": {user: 10.0 * n for n, user in enumerate(users)},  # u11 rated last
            "sequences": {  # u0's positives came last
                user: [
                    (item, float(t - 10 * n)) for t, (item, _) in enumerate(data.sequences[user])
                ]
                for n, user in enumerate(users)
            },
        }
    )
    builder = RatingExampleBuilder(stamped, Rendering.compact, history=3)

    recent = builder.recent(users=5, holdout=0.2)

    assert [e.user_id for e in recent.train] == ["u7", "u8", "u9", "u10"]
    assert [e.user_id for e in recent.validation] == ["u11"]
    assert recent.validation[0].rating == data.ratings["u11"][-1][1]
