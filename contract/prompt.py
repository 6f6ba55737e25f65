"""The model contract: how prompts are written and answers are read.

One module, used by the gateway, the trainer and the evaluator, so that a model is always asked
the way it was taught. Changing anything a model can see bumps `CONTRACT_VERSION`; every model's
manifest records the version and the `Contract` (rendering, history length) it was trained on,
and the gateway refuses versions it does not speak. Cleaning what no training data should hold
(markup and invisible characters in titles, attributes and queries) does not bump it: a version
trained before reads the same prompts for all other text.

Two renderings of the same `PromptInput`:

- `rich`, for pretrained LMs that read English (stable instructions first, the user-specific part
  last, so vLLM's prefix cache reuses the shared part):

      instructions · output format · user profile · recent history (oldest first, grouped by time
      before the latest interaction) · candidates (`#id | title | categories | key attributes`)

- `compact`, for the embedded model whose tokenizer the bootstrap trains (every item is one
  token): a line of profile attributes, then the history as item references, oldest first:

      age=24 gender=F
      #12, #7, #301

  No candidates: the serving grammar restricts the answer to them, and a model pretrained on item
  sequences picks the next item best from the history alone (candidates in the input measured
  worse). A history of 50 items is about 160 tokens.

Answer, both renderings: ``<think>rationale</think><answer>#id, #id, …</answer>``. Items are
written as ``#`` and their id everywhere, so that no tokenizer confuses an item with a number in a
title or a profile, and the list separator is the same in the history and in the answer.
"""

import re
from collections.abc import Sequence
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Protocol

from pydantic import BaseModel, Field

from contract.answer import Answer
from contract.ranking import Blend
from contract.tasks import Task

CONTRACT_VERSION = "1"
SUPPORTED_CONTRACTS = frozenset({CONTRACT_VERSION})
SEPARATOR = ", "  # between item references, in a compact history and in every answer
ANSWER_TAG = "<answer>"

ITEM_MARK = "#"
# Printable characters no id holds (server.schemas.Id): where a reference in free text ends.
ID_EXCLUDED = ":/,<>"
MAX_RATIONALE_CHARS = 300
# Attributes worth their tokens (a year is usually in the title already); values are cut short.
KEY_ATTRIBUTES = ("brand", "price", "tags")
MAX_ATTRIBUTE_CHARS = 40
_TIME_GROUPS = ((86_400, "same day as the latest"), (7 * 86_400, "the week before"))

INSTRUCTIONS = (
    "You are a recommender. Read what the user liked, think briefly about their tastes, "
    "then rank the candidates that fit them best."
)
OUTPUT_FORMAT = (
    "Answer as <think>one or two sentences about the user and your picks</think>"
    "<answer>{k} candidate ids, best first, separated by commas</answer>."
)
# No '<' or '>' inside either part: a stray or repeated tag makes the answer malformed.
_ANSWER = re.compile(r"^\s*<think>([^<>]*)</think>\s*<answer>([^<>]*)</answer>\s*$")
# An answer cut by the token budget: its rationale, the ids before the cut, and the start of
# the closing tag when the cut fell inside it (then every id is whole).
_CUT_ANSWER = re.compile(r"^\s*<think>([^<>]*)</think>\s*<answer>([^<>]*)(<[^<>]*)?$")
MAX_TEXT_CHARS = 120
# A rich profile line shows this many attributes, so that no user can make every prompt long.
MAX_PROFILE_ATTRIBUTES = 20
# What shows one thing in a prompt and reads as another: control and format characters (Unicode
# categories Cc and Cf: zero-width, bidirectional, tag characters), variation selectors and the
# Hangul fillers, which render as nothing (tests check the list against unicodedata). Whitespace
# is not here: it is folded into single spaces. Written as regex escapes, so that the id rule
# (server.schemas) can put the same class in its pattern.
INVISIBLE = (
    r"\x00-\x08\x0e-\x1f\x7f-\x9f\u00ad\u0600-\u0605\u061c\u06dd\u070f\u0890\u0891"
    r"\u08e2\u115f\u1160\u180b-\u180f\u200b-\u200f\u202a-\u202e\u2060-\u2064\u2066-\u206f"
    r"\u3164\ufe00-\ufe0f\ufeff\uffa0\ufff9-\ufffb\U000110bd\U000110cd\U00013430-\U0001343f"
    r"\U0001bca0-\U0001bca3\U0001d173-\U0001d17a\U000e0001\U000e0020-\U000e007f"
    r"\U000e0100-\U000e01ef"
)
_INVISIBLE = re.compile(f"[{INVISIBLE}]")
# Every character `str.isspace()` is true of, as regex escapes: a grammar's `\s` is ASCII in
# vLLM's (xgrammar), so a step it let start with U+3000 was then read back as blank.
SPACES = r"\s\x1c-\x1f\x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
# The first character of a grammar's free-text part: visible, and not the start of a tag.
VISIBLE = f"[^<>{SPACES}]"
# In rich text, what could pose as the template's tags or as a reference to another item.
_MARKUP = re.compile(r"[<>]|(?<!\w)#")


class Rendering(StrEnum):
    rich = "rich"
    compact = "compact"


class Contract(BaseModel):
    """How a model reads its prompts and how its answers are read; recorded in its manifest,
    followed by whoever prompts it."""

    version: str = CONTRACT_VERSION
    rendering: Rendering = Rendering.rich
    history: int = Field(20, ge=0, description="Most recent history items in the prompt.")
    chat: bool = Field(
        False, description="Prompts go to it as one user turn of its tokenizer's chat template."
    )
    blend: Blend = Field(default_factory=Blend, description="How the served list is ordered.")
    tasks: frozenset[Task] = Field(frozenset({Task.rank}), description="What it may be asked.")
    rating_weight: float = Field(
        1.0,
        gt=0,
        le=1,
        description="Served rating: this much the model's, the rest the baseline's.",
    )


class ItemView(BaseModel):
    """What the model sees of an item."""

    item_id: str
    title: str
    categories: list[str] = Field(default_factory=list)
    attributes: dict[str, str | int | float | bool] = Field(default_factory=dict)


class HistoryView(BaseModel):
    item: ItemView
    timestamp: datetime


class PromptInput(BaseModel):
    profile: dict[str, str | int | float | bool] = Field(default_factory=dict)
    history: list[HistoryView] = Field(default_factory=list, description="Oldest first.")
    candidates: list[ItemView]
    k: int = Field(ge=1)


def prompt_input(
    profile: dict,
    history: Sequence[tuple[object, float]],
    candidates: Sequence[object],
    k: int,
    shown: int,
) -> PromptInput:
    """What the prompt shows: the profile, the last `shown` of `history` ((item, Unix time), oldest
    first) and the candidates; items are anything with an ItemView's attributes."""
    recent = history[-shown:] if shown else []
    return PromptInput(
        profile=profile,
        history=[
            HistoryView(item=_view(item), timestamp=datetime.fromtimestamp(ts, UTC))
            for item, ts in recent
        ],
        candidates=[_view(item) for item in candidates],
        k=k,
    )


def _view(item: object) -> ItemView:
    return ItemView.model_validate(item, from_attributes=True)


def ref(item_id: str) -> str:
    return f"{ITEM_MARK}{item_id}"


def visible(value: object) -> str:
    """The text without control, zero-width and bidirectional characters: what a reader of the
    prompt cannot see must not steer the model."""
    return _INVISIBLE.sub("", str(value))


def _text(value: object, limit: int = MAX_TEXT_CHARS) -> str:
    """One visible line, bounded: a newline or '|' in user or catalog text must not fake a
    prompt line, nor a tag or a '#' a reference to another item."""
    return " ".join(_MARKUP.sub(" ", visible(value)).replace("|", "/").split())[:limit]


def item_line(item: ItemView) -> str:
    categories = ", ".join(_text(c) for c in item.categories) or "no category"
    parts = [ref(item.item_id), _text(item.title), _text(categories)]
    keys = [
        f"{key}: {_text(item.attributes[key], MAX_ATTRIBUTE_CHARS)}"
        for key in KEY_ATTRIBUTES
        if key in item.attributes
    ]
    return " | ".join(parts + keys)


def profile_line(profile: dict) -> str:
    if not profile:
        return "User: new user, nothing known yet."
    shown = sorted(profile.items())[:MAX_PROFILE_ATTRIBUTES]
    pairs = (
        f"{_text(key, MAX_ATTRIBUTE_CHARS)} {_text(value, MAX_ATTRIBUTE_CHARS)}"
        for key, value in shown
    )
    return "User: " + ", ".join(pairs)


def _history_lines(history: Sequence[HistoryView]) -> list[str]:
    """Group by time before the latest interaction: the same at training and at serving time."""
    if not history:
        return ["History: none."]
    latest = history[-1].timestamp
    lines, current = ["History, oldest first:"], None
    for entry in history:
        age = (latest - entry.timestamp).total_seconds()
        group = next((label for limit, label in _TIME_GROUPS if age < limit), "earlier")
        if group != current:
            lines.append(f"{group}:")
            current = group
        lines.append(f"- {item_line(entry.item)}")
    return lines


# Profile values in a compact prompt: a few short words each, so that one attribute cannot crowd
# out the history.
COMPACT_PROFILE_ATTRIBUTES = 6
COMPACT_VALUE_CHARS = 16


_NOT_A_WORD = re.compile(r"[\s#<>=]+")  # no item reference, tag or second '=' from a value


def _word(value: object, limit: int) -> str:
    return _NOT_A_WORD.sub("_", visible(value).strip())[:limit]


def compact_profile(profile: dict) -> str:
    pairs = sorted(profile.items())[:COMPACT_PROFILE_ATTRIBUTES]
    return " ".join(
        f"{_word(key, COMPACT_VALUE_CHARS)}={_word(value, COMPACT_VALUE_CHARS)}"
        for key, value in pairs
    )


def compact_history(item_ids: Sequence[str]) -> str:
    return SEPARATOR.join(ref(item_id) for item_id in item_ids)


def _compact_prompt(data: PromptInput) -> str:
    history = compact_history([entry.item.item_id for entry in data.history])
    return f"{compact_profile(data.profile)}\n{history}\n"


def build_prompt(data: PromptInput, rendering: Rendering = Rendering.rich) -> str:
    if rendering is Rendering.compact:
        return _compact_prompt(data)
    return _rich_prompt(data)


def _rich_prompt(data: PromptInput) -> str:
    k = min(data.k, len(data.candidates))
    lines = [INSTRUCTIONS, OUTPUT_FORMAT.format(k=k), "", profile_line(data.profile)]
    lines += _history_lines(data.history)
    lines.append(f"Candidates ({len(data.candidates)}):")
    lines += [item_line(item) for item in data.candidates]
    lines.append("")
    return "\n".join(lines)


class ChatTokenizer(Protocol):
    def apply_chat_template(self, conversation: list[dict[str, str]], **kwargs: Any) -> Any: ...


def chat_prompt(tokenizer: ChatTokenizer, prompt: str) -> str:
    """A prompt as an instruction-tuned LM expects it: the user's turn in its chat template,
    up to where the assistant's answer starts (which the answer grammar then constrains)."""
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )


def render_answer(rationale: str, item_ids: Sequence[str]) -> str:
    """The text a model should produce (SFT targets are written with it)."""
    clean = re.sub(r"[<>]", "", rationale)[:MAX_RATIONALE_CHARS]
    return f"<think>{clean}</think><answer>{compact_history(item_ids)}</answer>"


def _cut_answer(text: str) -> Answer:
    """What a completion cut inside its answer still says: the ids before the last separator
    (the one after it may be cut short, and a cut id can spell another one: #12 -> #1), or all
    of them when only the closing tag was cut."""
    match = _CUT_ANSWER.match(text)
    if match is None:
        return Answer(rationale="", items=(), well_formed=False)
    ids = match.group(2) if match.group(3) else match.group(2).rpartition(",")[0]
    _, items = _marked(ids)
    return Answer(rationale=match.group(1).strip(), items=items, well_formed=False)


def _marked(ids: str) -> tuple[list[str], tuple[str, ...]]:
    """The comma-separated tokens of an answer, and the ids among them (item mark removed)."""
    tokens = [token.strip() for token in ids.split(",") if token.strip()]
    marked = [t for t in tokens if t.startswith(ITEM_MARK) and len(t) > len(ITEM_MARK)]
    return tokens, tuple(token[len(ITEM_MARK) :] for token in marked)


def answer_pattern(candidate_ids: Sequence[str], k: int, spare: int = 0) -> str:
    """A regex that only admits well-formed answers naming exactly k + `spare` candidate ids
    (all of them when there are fewer).

    Given to vLLM's structured outputs, it makes an answer outside the candidates impossible.
    Duplicates cannot be excluded by a regex of reasonable size: the parser drops them, and the
    spare ids take the place of the ones dropped.
    """
    count = min(k + spare, len(candidate_ids))
    # '#' needs no escape, and xgrammar warns on every '\#' that re.escape would write.
    choice = "(" + "|".join(ITEM_MARK + re.escape(item_id) for item_id in candidate_ids) + ")"
    think = f"<think>[^<>]{{0,{MAX_RATIONALE_CHARS}}}</think>"
    more = f"({SEPARATOR}{choice}){{{count - 1}}}" if count > 1 else ""
    return f"{think}<answer>{choice}{more}</answer>"


# The most tokens a byte-level tokenizer spends on one character: its UTF-8 bytes. Free text
# budgeted a token a character was cut short when written in another script.
MAX_CHAR_BYTES = 4


def text_answer_budget(candidate_ids: Sequence[str], k: int, spare: int = 0) -> int:
    """Tokens that hold any answer of `answer_pattern` written as text (a tokenizer without item
    tokens): at most one token per byte of the longest such answer, plus the end of sequence."""
    longest = sorted((len(ref(i).encode()) for i in candidate_ids), reverse=True)[: k + spare]
    tags = len("<think></think><answer></answer>")
    rationale = MAX_CHAR_BYTES * MAX_RATIONALE_CHARS
    return tags + rationale + sum(longest) + len(SEPARATOR) * len(longest) + 1


def parse_answer(text: str) -> Answer:
    """Read a completion; never raises. Ids are returned as written, minus the item mark."""
    match = _ANSWER.match(text)
    if match is None:
        return _cut_answer(text)
    tokens, items = _marked(match.group(2))
    well_formed = bool(tokens) and len(items) == len(tokens)
    return Answer(rationale=match.group(1).strip(), items=items, well_formed=well_formed)
