"""Rec-R1's training (trainer.search): examples composed from the sequences, the search grammar
in token space, and SFT then GRPO against a real BM25 retriever on a learnable toy catalog."""

import re
from datetime import UTC, datetime
from pathlib import Path

import pytest
import torch

import trainer.search
from contract.prompt import Rendering
from contract.search import RetrieverKind, parse_search, search_pattern
from contract.tasks import Task
from server.schemas import Item
from server.search_index import build_search_index
from tests.trainer.test_constrained import sample
from trainer.constrained import constrained_generation, search_constraint
from trainer.corpus import Corpus
from trainer.model import build_model
from trainer.presets import GrpoSettings, SearchPreset, SftSettings
from trainer.search import (
    SearchExampleBuilder,
    compose_reasoning,
    train_search,
    validate_search,
)
from trainer.tokenizer import train_tokenizer

NOW = datetime(2026, 1, 1, tzinfo=UTC)
WORDS = ["alpha", "bravo", "delta", "echo", "golf", "hotel", "india", "kilo", "lima", "oscar"]
GENRES = ["drama", "comedy"]


def corpus(users: int = 20) -> Corpus:
    """Everyone watches the films in a circle (i3 after i2, i0 after i9), starting anywhere: what
    comes next is always learnable, and never the last item seen."""
    items = {
        f"i{n}": Item(
            item_id=f"i{n}",
            title=WORDS[n].title(),
            categories=[GENRES[n % 2]],
            created_at=NOW,
        )
        for n in range(10)
    }
    sequences = {f"u{u}": [(f"i{(u + t) % 10}", float(t)) for t in range(8)] for u in range(users)}
    return Corpus(items=items, profiles={}, sequences=sequences)


@pytest.fixture(scope="module")
def data() -> Corpus:
    return corpus()


@pytest.fixture(scope="module")
def index(data: Corpus):
    return build_search_index(sorted(data.items.items()), RetrieverKind.bm25)


def test_held_out_searches_can_leave_users_out(data: Corpus) -> None:
    """A refresh's search gate leaves out the users it trains fresh examples of: their last item
    would be taught, then searched for."""
    builder = SearchExampleBuilder(data, Rendering.compact, history=3, typed_share=0)
    apart = {f"u{n}" for n in range(15)}

    held = builder.build(0, validation_users=10, seed=0, apart=apart).validation

    assert sorted(e.user_id for e in held) == [f"u{n}" for n in range(15, 20)]


def test_examples_hold_out_each_users_last_item_and_compose_a_query_that_finds_it(
    data: Corpus, index
) -> None:
    builder = SearchExampleBuilder(data, Rendering.compact, history=3, typed_share=0.5)
    examples = builder.build(count=1000, validation_users=5, seed=0)

    assert len(examples.validation) == 5
    for example in examples.validation:
        assert example.item_id == data.sequences[example.user_id][-1][0]
        assert example.typed == ""  # validation asks what comes next
        assert example.prompt.endswith("search\n")
    # positions 1..6 of each user's 8: never the last one
    assert len(examples.train) == 20 * 6
    typed = [e for e in examples.train if e.typed]
    assert 0.3 < len(typed) / len(examples.train) < 0.7
    for example in typed:
        assert example.typed in GENRES
        assert data.items[example.item_id].categories == [example.typed]
        assert example.prompt.endswith(f"search {example.typed}\n")

    example = builder.example("u0", 4)
    assert example.prompt == "\n#i1, #i2, #i3\nsearch\n"
    assert example.seen == ["i0", "i1", "i2", "i3"] and example.last_title == "Echo"
    assert example.target == "<think>#i4 drama</think><answer>#i4</answer>"
    three = SearchExampleBuilder(data, Rendering.compact, history=3, typed_share=0, items_named=3)
    assert (
        three.example("u0", 4).target
        == "<think>#i4 #i5 #i6 drama comedy</think><answer>#i4 #i5 #i6</answer>"
    )
    # the user's last item (held out for validation) is never in a training target
    assert three.example("u0", 6).target == "<think>#i6 drama</think><answer>#i6</answer>"
    assert three.example("u0", 7).target == "<think>#i7 comedy</think><answer>#i7</answer>"
    answer = parse_search(example.target)
    assert answer.well_formed and index.rank_of(answer.query, "i4", example.seen) == 1


def test_rich_reasoning_speaks_of_interests_and_the_item(data: Corpus) -> None:
    history = [data.items["i0"], data.items["i2"], data.items["i1"]]
    reasoning = compose_reasoning(history, [data.items["i3"], data.items["i4"]], Rendering.rich)
    assert reasoning == "They are into drama and comedy; Echo would fit."


@pytest.fixture(scope="module")
def tokenizer(data: Corpus):
    builder = SearchExampleBuilder(data, Rendering.compact, history=3, typed_share=0.3)
    texts = [e.prompt + e.target for e in builder.build(100, 2, 0).train]
    return train_tokenizer(texts, list(data.items), 300, {Task.search})


def test_untrained_samples_follow_the_search_grammar(data: Corpus, tokenizer) -> None:
    model = build_model(tokenizer, "tiny", seed=0).eval()
    builder = SearchExampleBuilder(data, Rendering.compact, history=3, typed_share=0.3)
    prompts = [e.prompt for e in builder.build(8, 2, 0).train]
    constraint = search_constraint(tokenizer, Rendering.compact)

    with constrained_generation(model, constraint):
        texts = sample(model, tokenizer, prompts, budget=constraint.length, seed=1)

    for text in texts:
        assert re.fullmatch(search_pattern(Rendering.compact), text), text
        assert parse_search(text).well_formed or not any(c.isalnum() for c in text), text
    free = sample(model, tokenizer, prompts, budget=constraint.length, seed=1)
    assert not any(parse_search(text).well_formed for text in free)


PRESET = SearchPreset(
    sft_examples=120,
    sft=SftSettings(epochs=12, batch_size=8, learning_rate=3e-3, progress=False),
    grpo_examples=8,
    grpo=GrpoSettings(max_steps=2, prompts_per_step=2, num_generations=4, progress=False),
    validation_users=10,
)


def trained(data: Corpus, tokenizer, index, scratch: Path):
    """A tiny model through `train_search` on the circle: the examples, the model, the model
    before GRPO and the stages' scores with the returned model's validation."""
    torch.manual_seed(0)
    model = build_model(tokenizer, "tiny", seed=0)
    builder = SearchExampleBuilder(data, Rendering.compact, history=3, typed_share=0.3)
    examples = builder.build(PRESET.sft_examples, PRESET.validation_users, 0)
    return examples, *train_search(
        model, tokenizer, examples, PRESET, index, scratch, keep_sft=True
    )


def test_sft_then_grpo_writes_queries_that_find_what_comes_next(
    data: Corpus, tokenizer, index, tmp_path: Path
) -> None:
    examples, model, after_sft, stages = trained(data, tokenizer, index, tmp_path)
    scores = validate_search(model, tokenizer, examples.validation, Rendering.compact, index)

    grpo = {"search_sft_ndcg@10", "search_grpo_ndcg@10", "search_grpo_kept"}
    assert set(stages) == grpo | set(scores)
    kept = stages["search_grpo_ndcg@10"] >= stages["search_sft_ndcg@10"]
    assert stages["search_grpo_kept"] == float(kept)
    served = "search_grpo_ndcg@10" if kept else "search_sft_ndcg@10"
    assert scores["search_ndcg@10"] == stages[served]
    # the bootstrap reads the returned model's validation from the stages, decoding nothing again
    assert {key: stages[key] for key in scores} == scores
    assert (after_sft is not model) == kept
    assert scores["search_validation_users"] == 10 and scores["search_failed"] == 0.0
    # the raw query finds the last item, which the user has seen: nothing left to find
    assert scores["search_raw_ndcg@10"] == 0.0
    # the circle is learnable: the model names the next film
    assert stages["search_sft_ndcg@10"] > 0.5
    assert scores["search_ndcg@10"] > 0.5 and scores["search_hr@10"] > 0.5


def test_a_grpo_stage_that_validates_below_sft_is_not_kept(
    data: Corpus, tokenizer, index, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # GRPO that forgets everything SFT taught: an untrained model comes out.
    untrained = build_model(tokenizer, "tiny", seed=1).eval()
    monkeypatch.setattr(trainer.search, "run_grpo", lambda *args, **kwargs: untrained)

    examples, model, after_sft, stages = trained(data, tokenizer, index, tmp_path)

    assert stages["search_grpo_ndcg@10"] < stages["search_sft_ndcg@10"]
    assert stages["search_grpo_kept"] == 0.0
    assert model is after_sft
    scores = validate_search(model, tokenizer, examples.validation, Rendering.compact, index)
    assert scores["search_ndcg@10"] == stages["search_sft_ndcg@10"] > 0.5
    assert {key: stages[key] for key in scores} == scores
