"""The parsed form of a model completion, shared by rewards, serving policy and evaluation.

Parsing text into an `Answer` is `contract.prompt.parse_answer`; reward terms read only this type.
"""

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
