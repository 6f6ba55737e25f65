"""Rec-R1 (METHODS.md §3): teach a model to write the query a fixed retriever ranks with.

Examples come from the interaction sequences: at position t of a user's sequence the prompt shows
what came before, and the item at t is the one the query must find (the reward's `item_id`). A
share of the prompts carry a typed query derived from that item, one of its categories as a user
would type a genre (MovieLens logs no queries); the rest carry none, and the model writes what the
user wants next (Rec-R1's sequential recommendation). Each validation user's last interaction is
held out, with no typed query.

Stages, both with the retriever the gateway is configured with:

- SFT on composed answers naming the next `items_named` items: as reasoning, their references and
  categories (compact) or the user's interests and the first item's title (rich); as the query,
  their references (compact), which the retriever reads as their text, or their titles and
  categories (rich) (`contract.search.compose_query`). The embedded model has learnt, in
  pretraining, which item comes next; SFT teaches it to say so in a query.
- GRPO with the retriever's NDCG@1000 as the reward (`reward_rules.terms.SearchNdcg`), sampled
  under the search grammar (`trainer.constrained.search_constraint`). The GRPO model is kept only
  when it validates at least as well as the SFT model; otherwise the SFT model is published.

Validation decodes greedily under that grammar and scores NDCG@10 and HR@10 of the retriever's
list (seen items left out, as served), beside the raw-query baseline: the last history item's
title as the query.
"""

import copy
import logging
from collections import Counter
from collections.abc import Collection, Sequence
from pathlib import Path

import numpy as np
from pydantic import BaseModel, Field

from contract.prompt import ItemView, Rendering, ref
from contract.search import (
    RetrieverKind,
    build_search_prompt,
    compose_query,
    parse_search,
    render_search_answer,
    retriever_query,
    search_input,
)
from reward_rules.metrics import rank_ndcg
from reward_rules.terms import SearchNdcg
from server.search_index import Encoder, SearchIndex, build_search_index
from trainer.constrained import constrained_generation, greedy_after, search_constraint
from trainer.corpus import Corpus, latest_per_item
from trainer.dataset import sample_positions
from trainer.grpo import run_grpo, spread
from trainer.presets import SearchPreset
from trainer.sft import run_sft

log = logging.getLogger(__name__)
TRAIN_K = 1000  # the reward's NDCG cut-off in training (Rec-R1); evaluation uses 10
K = 10


class SearchExample(BaseModel):
    """One search prompt, the reward's columns and the SFT target."""

    user_id: str
    prompt: str
    item_id: str = Field(description="The item the query must find: what the user took next.")
    typed: str = Field("", description="What the user typed (sent before the model's query).")
    seen: list[str] = Field(description="Items before it: left out of the retriever's list.")
    last_title: str = Field("", description="The last history item's title: the raw query.")
    target: str = Field(description="The SFT completion: composed reasoning, composed query.")


class SearchExamples(BaseModel):
    rendering: Rendering
    train: list[SearchExample]
    validation: list[SearchExample]


def _interests(history: Sequence[ItemView]) -> list[str]:
    counts = Counter(category for item in history[-10:] for category in item.categories)
    return [category for category, _ in counts.most_common(2)]


def compose_reasoning(
    history: Sequence[ItemView], items: Sequence[ItemView], rendering: Rendering
) -> str:
    """The compact reasoning names the items (one token each: what the pretrained model
    predicts) and their categories; the rich one the user's recent interests and the first
    item's title."""
    if rendering is Rendering.compact:
        categories = dict.fromkeys(c for item in items for c in item.categories)
        return " ".join([*(ref(item.item_id) for item in items), *categories])
    interests = " and ".join(_interests(history)) or "a bit of everything"
    return f"They are into {interests}; {items[0].title} would fit."


def _target(history: Sequence[ItemView], items: Sequence[ItemView], rendering: Rendering) -> str:
    reasoning = compose_reasoning(history, items, rendering)
    return render_search_answer(reasoning, compose_query(items, rendering), rendering)


class SearchExampleBuilder:
    def __init__(
        self,
        corpus: Corpus,
        rendering: Rendering,
        history: int,
        typed_share: float,
        items_named: int = 1,
    ):
        self.corpus, self.rendering, self.history = corpus, rendering, history
        self.typed_share, self.items_named = typed_share, items_named

    def example(self, user_id: str, t: int, typed: str = "") -> SearchExample:
        items, sequence = self.corpus.items, self.corpus.sequences[user_id]
        seen = [item for item, _ in latest_per_item(sequence[:t])]
        history = [items[i] for i in seen]
        data = search_input(self.corpus.profiles.get(user_id, {}), history, typed, self.history)
        # A training target never names the user's last item: validation holds it out.
        end = len(sequence) if t == len(sequence) - 1 else len(sequence) - 1
        after = [
            ItemView.model_validate(items[i], from_attributes=True)
            for i, _ in sequence[t : min(t + self.items_named, end)]
        ]
        return SearchExample(
            user_id=user_id,
            prompt=build_search_prompt(data, self.rendering),
            item_id=after[0].item_id,
            typed=data.typed,
            seen=seen,
            last_title=history[-1].title if history else "",
            target=_target(data.history, after, self.rendering),
        )

    def _typed(self, item_id: str, rng: np.random.Generator) -> str:
        """A query a user could type for the item: one of its categories, lower case."""
        categories = self.corpus.items[item_id].categories
        if not categories or rng.random() >= self.typed_share:
            return ""
        return str(rng.choice(categories)).lower()

    def build(
        self, count: int, validation_users: int, seed: int, apart: Collection[str] = ()
    ) -> SearchExamples:
        """`count` training positions (never a user's last interaction) and the last interaction
        of up to `validation_users` users with at least three, none of them in `apart`."""
        rng = np.random.default_rng(seed + 2)
        sequences = self.corpus.sequences
        train = [
            self.example(u, t, self._typed(sequences[u][t][0], rng))
            for u, t in sample_positions(self.corpus, rng, count)
        ]
        eligible = sorted(u for u, seq in sequences.items() if len(seq) >= 3 and u not in apart)
        held = rng.choice(len(eligible), size=min(validation_users, len(eligible)), replace=False)
        validation = [self.example(eligible[i], len(sequences[eligible[i]]) - 1) for i in held]
        log.info(
            "search examples built", extra={"train": len(train), "validation": len(validation)}
        )
        return SearchExamples(rendering=self.rendering, train=train, validation=validation)


def catalog_retriever(corpus: Corpus, kind: RetrieverKind) -> SearchIndex:
    """The retriever of `kind` over the corpus's catalog, as the gateway builds it."""
    encoder = Encoder() if kind is RetrieverKind.dense else None
    return build_search_index(sorted(corpus.items.items()), kind, encoder)


def validate_search(
    model, tokenizer, examples: Sequence[SearchExample], rendering: Rendering, index: SearchIndex
) -> dict[str, float]:
    """NDCG@10 and HR@10 of the retriever's list for the model's greedy query and for the raw
    query (the last history item's title), and the share of answers the grammar's budget cut."""
    model.eval()
    constraint = search_constraint(tokenizer, rendering)
    ndcg, hits, raw, failed = [], [], [], 0
    prompts = [example.prompt for example in examples]
    with constrained_generation(model, constraint):
        greedy = greedy_after(
            model, tokenizer, prompts, constraint.length, None, "validation (search)"
        )
    for example, (text, _) in zip(examples, greedy, strict=True):
        answer = parse_search(text)
        failed += not answer.well_formed
        query = retriever_query(example.typed, answer.query) if answer.well_formed else ""
        rank = index.rank_of(query, example.item_id, example.seen) if query else None
        ndcg.append(rank_ndcg(rank, K))
        hits.append(float(rank is not None and rank <= K))
        typed = retriever_query(example.typed, example.last_title)
        raw.append(rank_ndcg(index.rank_of(typed, example.item_id, example.seen), K))
    n = max(len(examples), 1)
    return {
        "search_ndcg@10": sum(ndcg) / n,
        "search_hr@10": sum(hits) / n,
        "search_raw_ndcg@10": sum(raw) / n,
        "search_failed": failed / n,
        "search_validation_users": len(examples),
    }


def train_search(
    model,
    tokenizer,
    examples: SearchExamples,
    preset: SearchPreset,
    index: SearchIndex,
    scratch: Path,
    sft: bool = True,
    keep_sft: bool = False,
):
    """SFT (unless it already ran, joint with ranking's), then GRPO, kept only when it validates
    at least as well as the model it started from. Returns the model, the model before GRPO
    (with `keep_sft`, for evaluation; else None), and what each stage scored with the returned
    model's validation (`validate_search`: nothing trains after search, so the bootstrap reads
    its figures from here instead of decoding the validation users again)."""
    if sft:
        model = run_sft(model, tokenizer, examples.train, preset.sft)
    validation, rendering = examples.validation, examples.rendering
    before = validate_search(model, tokenizer, validation, rendering, index)
    after_sft = copy.deepcopy(model)
    constraint = search_constraint(tokenizer, rendering)
    model = run_grpo(
        model,
        tokenizer,
        spread(examples.train, preset.grpo_examples),
        [(SearchNdcg(index.rank_of, TRAIN_K), 1.0)],
        preset.grpo.model_copy(update={"max_completion_length": constraint.length}),
        scratch,
        constraint=constraint,
    )
    after = validate_search(model, tokenizer, validation, rendering, index)
    stages = {
        "search_sft_ndcg@10": before["search_ndcg@10"],
        "search_grpo_ndcg@10": after["search_ndcg@10"],
    }
    # GRPO's reward is a sampled query's NDCG@1000, validation the greedy query's NDCG@10: on
    # ML-100K it has scored below its start (docs/evaluation.md, "Search"), and a user wants the
    # better model served.
    kept = after["search_ndcg@10"] >= before["search_ndcg@10"]
    if not kept:
        log.warning("search GRPO validated below its start: the model before is kept", extra=stages)
        model = after_sft  # the same object as the SFT stage: both are only saved
    stages["search_grpo_kept"] = float(kept)
    return model, after_sft if keep_sft else None, stages | (after if kept else before)
