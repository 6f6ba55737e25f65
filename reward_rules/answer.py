"""The parsed form of a model completion, shared by rewards, serving policy and evaluation.

Parsing text into an `Answer` lives with the model contract (the prompt builder and parser); this
module only defines the type, so that reward terms can be scored without importing the parser.
"""

from collections.abc import Collection
from dataclasses import dataclass


@dataclass(frozen=True)
class Answer:
    """One completion, as parsed.

    `rationale` is the text inside `<think>…</think>` ("" if none). `items` are the item ids in the
    order the model wrote them, as parsed: they may repeat or name items that are not candidates.
    `well_formed` is true when the completion was exactly `<think>…</think><answer>…</answer>` with
    nothing but whitespace around.
    """

    rationale: str
    items: tuple[str, ...]
    well_formed: bool


def ranked(answer: Answer, candidates: Collection[str], k: int) -> list[str]:
    """The first `k` distinct ids of `answer` that are candidates, in the answer's order.

    >>> ranked(Answer("", ("b", "x", "b", "a", "c"), True), ["a", "b", "c"], 2)
    ['b', 'a']
    """
    allowed = candidates if isinstance(candidates, set | frozenset) else set(candidates)
    chosen: list[str] = []
    seen: set[str] = set()
    for item in answer.items:
        if len(chosen) >= k:
            break
        if item in allowed and item not in seen:
            seen.add(item)
            chosen.append(item)
    return chosen
