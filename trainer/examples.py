"""Training examples for the ranker: a prompt, its columns for the rewards, and an SFT target.

The prompt comes from `contract.prompt.build_prompt` (the contract the gateway serves), the target
from `contract.prompt.render_answer`. The SFT rationale is composed from the data itself (what the
user watched recently, the categories they keep coming back to, how the picks relate to that), so
SFT teaches the format and a grounded way of talking about a user without a teacher model.
"""

import re
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import TypeVar

from pydantic import BaseModel, Field

from contract.prompt import (
    ChatTokenizer,
    ItemView,
    PromptInput,
    Rendering,
    build_prompt,
    chat_prompt,
    render_answer,
)
from contract.ranking import target_items

MAX_RATIONALE_CHARS = 200
RECENT = 5  # how much of the history the rationale talks about (newest last)
_TITLE_CHARS = 24
_YEAR = re.compile(r"\s*\(\d{4}\)\s*$")


class Example(BaseModel):
    """One prompt with the columns the reward terms read (`candidates`, `positives`, `k`)."""

    user_id: str
    prompt: str
    candidates: list[str] = Field(description="Candidate item ids, in retrieval order.")
    positives: list[str] = Field(description="Items the user engaged with next, in time order.")
    k: int = Field(ge=1, description="How many items the answer ranks.")
    target: str = Field(description="The SFT completion: rationale and ranked ids.")


def _short(title: str) -> str:
    """A title short enough for a rationale: no trailing year, cut at a word boundary."""
    title = _YEAR.sub("", title).strip()
    if len(title) <= _TITLE_CHARS:
        return title
    cut = title[:_TITLE_CHARS].rsplit(" ", 1)[0]
    return cut.rstrip(" ,:;-")


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
    titles = [_short(item.title) for item in reversed(recent[-2:])]
    clause = "Recently liked " + " and ".join(titles)
    if interests:
        clause += ", into " + " and ".join(interests)
    return clause + "."


def _pick_clauses(
    picked: Sequence[ItemView], interests: Sequence[str], popularity: Mapping[str, int]
) -> list[str]:
    """At most one reason of each kind: a match with the interests, variety, popularity."""
    clauses: list[str] = []
    mentioned: set[str] = set()
    fits = [item for item in picked if set(item.categories) & set(interests)]
    if fits:
        shared = next(c for c in fits[0].categories if c in interests)
        clauses.append(f"{_short(fits[0].title)} fits {shared}")
        mentioned.add(fits[0].item_id)
    varied = [item for item in picked if item not in fits and item.categories]
    if varied and interests:
        clauses.append(f"{_short(varied[0].title)} adds {varied[0].categories[0]}")
        mentioned.add(varied[0].item_id)
    popular = max(picked, key=lambda item: popularity.get(item.item_id, 0), default=None)
    if popular is not None and popular.item_id not in mentioned and popularity.get(popular.item_id):
        clauses.append(f"{_short(popular.title)} is popular")
    return clauses


def _fit(head: str, clauses: list[str]) -> str:
    """Drop the last reasons until the rationale fits MAX_RATIONALE_CHARS."""
    while True:
        text = head if not clauses else f"{head} " + "; ".join(clauses) + "."
        if len(text) <= MAX_RATIONALE_CHARS or not clauses:
            return text[:MAX_RATIONALE_CHARS]
        clauses = clauses[:-1]


def sft_target(
    history: list[ItemView], picked: list[ItemView], popularity: Mapping[str, int]
) -> str:
    """The SFT completion: a short rationale grounded in the data, then the picked ids.

    `history` is oldest first; `popularity` maps item ids to interaction counts.
    """
    recent = history[-RECENT:]
    interests = _interests(recent)
    rationale = _fit(
        _history_clause(recent, interests), _pick_clauses(picked, interests, popularity)
    )
    return render_answer(rationale, [item.item_id for item in picked])


def compact_target(history: list[ItemView], positives: Sequence[str], k: int) -> str:
    """The compact rendering's SFT completion: the history's main categories, then the user's
    real next k items.

    The rationale depends on the history alone, so the first answer token is where the model
    chooses, exactly the next-item choice that pretraining taught.
    """
    shown = {item.item_id for item in history}
    nexts = [item for item in dict.fromkeys(positives) if item not in shown][:k]
    interests = _interests(history[-RECENT:])
    if not history:
        rationale = "New user: popular picks."
    elif interests:
        rationale = "Recently into " + " and ".join(interests) + "."
    else:
        rationale = "Like the recent history."
    return render_answer(rationale, nexts)


PromptT = TypeVar("PromptT", bound=BaseModel)  # an example of any task: it has a `prompt`


def in_chat(examples: Sequence[PromptT], tokenizer: ChatTokenizer) -> list[PromptT]:
    """Examples whose prompts are as the gateway sends them to a chat model: inside its chat
    template (`contract.prompt.chat_prompt`); targets and reward columns unchanged."""
    return [e.model_copy(update={"prompt": chat_prompt(tokenizer, e.prompt)}) for e in examples]


def build_example(
    user_id: str,
    data: PromptInput,
    positives: Sequence[str],
    popularity: Mapping[str, int],
    rendering: Rendering = Rendering.rich,
) -> Example:
    """An example for one prompt: the served prompt, its reward columns and its SFT target."""
    if not data.candidates:
        raise ValueError(f"user {user_id}: an example needs at least one candidate")
    candidates = [item.item_id for item in data.candidates]
    k = min(data.k, len(candidates))  # what the prompt asks for (build_prompt caps it the same)
    history = [entry.item for entry in data.history]
    if rendering is Rendering.compact:
        target = compact_target(history, positives, k)
    else:
        by_id = {item.item_id: item for item in data.candidates}
        picked = [by_id[item_id] for item_id in target_items(candidates, positives, k)]
        target = sft_target(history, picked, popularity)
    return Example(
        user_id=user_id,
        prompt=build_prompt(data, rendering),
        candidates=candidates,
        positives=list(positives),
        k=k,
        target=target,
    )
