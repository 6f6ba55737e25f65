"""Training examples for the ranker: a prompt, its columns for the rewards, and an SFT target.

The prompt comes from `server.prompt.build_prompt` (the contract the gateway serves), the target
from `server.prompt.render_answer`. The SFT rationale is composed from the data itself (what the
user watched recently, the categories they keep coming back to, how the picks relate to that), so
SFT teaches the format and a grounded way of talking about a user without a teacher model.
"""

import statistics
from collections import Counter
from collections.abc import Mapping, Sequence

from pydantic import BaseModel, Field

from server.prompt import ItemView, PromptInput, build_prompt, ref, render_answer

MAX_RATIONALE_CHARS = 200
RECENT = 5  # how much of the history the rationale talks about (newest last)


class Example(BaseModel):
    """One prompt with the columns the reward terms read (`candidates`, `positives`, `k`)."""

    user_id: str
    prompt: str
    candidates: list[str] = Field(description="Candidate item ids, in retrieval order.")
    positives: list[str] = Field(description="Items the user engaged with next, in time order.")
    k: int = Field(ge=1, description="How many items the answer ranks.")
    target: str = Field(description="The SFT completion: rationale and ranked ids.")


def target_items(candidates: Sequence[str], positives: Sequence[str], k: int) -> list[str]:
    """The k ids an SFT target ranks: positives among the candidates, then the candidate order.

    Positives come first, in the order they happened: they are the only label we have that the
    user wanted these items, and the earliest one is the nearest "next item" after the history
    the prompt shows. The rest is backfilled from the retrieval order, so the target always names
    exactly k distinct candidates (the format the prompt asks for) and, where the data says
    nothing, imitates the retriever's ranking, which is also what the gateway backfills with.

    >>> target_items(["a", "b", "c", "d"], ["z", "c", "a"], 3)
    ['c', 'a', 'b']
    """
    allowed = set(candidates)
    chosen = list(dict.fromkeys(item for item in positives if item in allowed))[:k]
    for item in candidates:
        if len(chosen) >= k:
            break
        if item not in chosen:
            chosen.append(item)
    return chosen


def _interests(recent: Sequence[ItemView], count: int = 2) -> list[str]:
    """The categories seen most often in the recent history; ties go to the most recent."""
    weights: Counter[str] = Counter()
    for position, item in enumerate(recent):
        for category in item.categories:
            weights[category] += 1 + position / (10 * len(recent))  # recency breaks ties only
    return [category for category, _ in weights.most_common(count)]


def _history_clause(recent: Sequence[ItemView], interests: Sequence[str]) -> str:
    if not recent:
        return "New user, so popular and varied picks."
    clause = "Recently liked " + " and ".join(ref(item.item_id) for item in reversed(recent[-2:]))
    if interests:
        clause += ", into " + " and ".join(interests)
    return clause + "."


def _picks_clause(
    picked: Sequence[ItemView], interests: Sequence[str], popularity: Mapping[str, int]
) -> str:
    """What the list holds as a whole: its main categories, one it adds, how well known it is."""
    counts = Counter(category for item in picked for category in item.categories)
    lean = [category for category, _ in counts.most_common(2)]
    clause = "Picks lean to " + " and ".join(lean) if lean else "Picks"
    added = [c for c, _ in counts.most_common() if c not in lean and c not in interests]
    if added and interests:
        clause += f", adding {added[0]}"
    median = statistics.median(popularity.values()) if popularity else 0
    known = sum(popularity.get(item.item_id, 0) > median for item in picked)
    return clause + (", mostly well known." if 2 * known >= len(picked) else ", mostly niche.")


def sft_target(
    history: list[ItemView], picked: list[ItemView], popularity: Mapping[str, int]
) -> str:
    """The SFT completion: a short rationale grounded in the data, then the picked ids.

    `history` is oldest first; `popularity` maps item ids to interaction counts. The rationale
    names history items by id and the picks only as a whole (categories, how well known): a pick
    named before the answer would be chosen there, spelled out in word pieces, instead of among
    the item tokens whose embeddings carry what the index knows of each item.
    """
    recent = history[-RECENT:]
    interests = _interests(recent)
    rationale = (
        f"{_history_clause(recent, interests)} {_picks_clause(picked, interests, popularity)}"
    )
    return render_answer(rationale[:MAX_RATIONALE_CHARS], [item.item_id for item in picked])


def build_example(
    user_id: str, data: PromptInput, positives: Sequence[str], popularity: Mapping[str, int]
) -> Example:
    """An example for one prompt: the served prompt, its reward columns and its SFT target."""
    if not data.candidates:
        raise ValueError(f"user {user_id}: an example needs at least one candidate")
    candidates = [item.item_id for item in data.candidates]
    k = min(data.k, len(candidates))  # what the prompt asks for (build_prompt caps it the same)
    by_id = {item.item_id: item for item in data.candidates}
    picked = [by_id[item_id] for item_id in target_items(candidates, positives, k)]
    target = sft_target([entry.item for entry in data.history], picked, popularity)
    return Example(
        user_id=user_id,
        prompt=build_prompt(data),
        candidates=candidates,
        positives=list(positives),
        k=k,
        target=target,
    )
