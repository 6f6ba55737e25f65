"""Turn interaction sequences into training and validation examples, the way the gateway serves.

A position t in a user's sequence gives one example: the history is what came before t, the
candidates are retrieved for that history exactly as `server.candidates` does at serving time,
and the positives are the next k items. Each user's last interaction is held out for validation.
"""

import heapq
from collections.abc import Collection, Iterator

import numpy as np
from pydantic import BaseModel, Field

from contract.candidates import OVERFETCH, allowed, candidate_order
from contract.prompt import Contract, prompt_input
from reward_rules.policy import DEFAULT_POLICY, Policy
from server.item_index import ItemIndex
from server.policy import servable
from server.schemas import Item
from trainer.corpus import Corpus, latest_per_item
from trainer.examples import Example, build_example


class Shape(BaseModel):
    """How examples are cut: the same numbers the gateway is configured with."""

    candidates: int
    history: int = Field(description="History items retrieval is queried with.")
    k: int = 10
    contract: Contract = Field(default_factory=Contract, description="How prompts are written.")


class Examples(BaseModel):
    train: list[Example]
    validation: list[Example]


def sample_positions(corpus: Corpus, rng: np.random.Generator, count: int) -> list[tuple[str, int]]:
    """Sample (user, t) with 1 <= t < len - 1: the last interaction stays held out."""
    pool = [(u, t) for u, seq in corpus.sequences.items() for t in range(1, len(seq) - 1)]
    if len(pool) <= count:
        return pool
    return [pool[i] for i in sorted(rng.choice(len(pool), size=count, replace=False))]


class ExampleBuilder:
    def __init__(
        self, corpus: Corpus, index: ItemIndex, shape: Shape, policy: Policy = DEFAULT_POLICY
    ):
        """`policy`: candidates are what it would serve, as the gateway's are."""
        self.corpus, self.index, self.shape = corpus, index, shape
        # Judged once: every example's candidates ask again of the same items.
        self.unservable = {i for i, item in corpus.items.items() if not servable(policy, item)}
        popularity = corpus.popularity
        self.popularity = popularity
        self.popular = [
            (i, float(c)) for i, c in popularity.most_common(shape.candidates * OVERFETCH)
        ]
        by_time = sorted(corpus.items.values(), key=lambda item: item.created_at, reverse=True)
        self.newest = [item.item_id for item in by_time[: shape.candidates]]

    def candidates(self, history: list[str]) -> list[str]:
        exclude = set(history)
        recent = history[-self.shape.history :] if self.shape.history else []
        hits = self.index.search(recent, self.shape.candidates * OVERFETCH, exclude=exclude)
        ranked = candidate_order(hits, self.popular, self.newest)
        items = self.corpus.items
        chosen = [i for i, _ in ranked if i in items and self._offered(items[i], exclude)]
        return chosen[: self.shape.candidates]

    def _offered(self, item: Item, exclude: set[str]) -> bool:
        return allowed(item, exclude) and item.item_id not in self.unservable

    def example(self, user_id: str, t: int, need_positive: bool = True) -> Example | None:
        """The example at position t; None when no candidate is left, or when no positive made
        it into the candidates and `need_positive` (a training example without one teaches
        nothing)."""
        seq = self.corpus.sequences[user_id]
        before = latest_per_item(seq[:t])
        history = [item for item, _ in before]
        # A training position's next k items stop before the user's last one, which validation
        # holds out (it would be taught as the answer of a prompt one item shorter than its own).
        end = len(seq) if t == len(seq) - 1 else len(seq) - 1
        positives = [item for item, _ in seq[t : min(t + self.shape.k, end)]]
        candidates = self.candidates(history)
        if not candidates:  # nothing left to recommend (a small catalog the user has seen)
            return None
        if need_positive and not set(positives) & set(candidates):
            return None
        items = self.corpus.items
        contract = self.shape.contract
        data = prompt_input(
            self.corpus.profiles.get(user_id, {}),
            [(items[i], ts) for i, ts in before],
            [items[i] for i in candidates],
            self.shape.k,
            contract.history,
        )
        return build_example(user_id, data, positives, self.popularity, contract.rendering)

    def sample(self, count: int, seed: int) -> Iterator[Example]:
        rng = np.random.default_rng(seed)
        for user_id, t in sample_positions(self.corpus, rng, count):
            if (example := self.example(user_id, t)) is not None:
                yield example

    def fresh(self, users: int, exclude: Collection[str] = ()) -> list[Example]:
        """The latest interaction of the `users` who interacted most recently, given everything
        before it: what users did lately, organic feedback included, which no logged list holds.
        Users in `exclude` are passed over (the next most recent take their place)."""
        sequences = self.corpus.sequences
        active = [
            (seq[-1][1], u) for u, seq in sequences.items() if len(seq) >= 2 and u not in exclude
        ]
        recent = heapq.nlargest(users, active)
        found = (self.example(user, len(sequences[user]) - 1) for _, user in recent)
        return [example for example in found if example is not None]

    def validation(self, users: int, seed: int) -> list[Example]:
        """Each sampled user's last interaction, given everything before it; users whose item
        retrieval missed are kept (they score 0 for every ranker), so that the lists' novelty is
        measured over users as the gateway meets them."""
        eligible = sorted(u for u, seq in self.corpus.sequences.items() if len(seq) >= 3)
        rng = np.random.default_rng(seed + 1)
        chosen = rng.choice(len(eligible), size=min(users, len(eligible)), replace=False)
        sequences = self.corpus.sequences
        found = (
            self.example(eligible[i], len(sequences[eligible[i]]) - 1, need_positive=False)
            for i in chosen
        )
        return [example for example in found if example is not None]
