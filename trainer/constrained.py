"""The serving constraint, applied to the trainer's own sampling with transformers' `generate`.

The gateway decodes with vLLM structured outputs (`contract.prompt.answer_pattern`): an answer is
always `<think>…</think><answer>` and k distinct candidate ids. GRPO samples with transformers,
where nothing held a weak model to that shape: at temperature 1 it rarely closed its tags, every
completion of a group scored 0, and with no reward variance GRPO learns nothing. So sampling here
follows the same grammar, in token space: which completions the policy is rewarded for are the
ones it could be served, and the reward differences are about which items it picks.

This token-space grammar needs every tag and candidate reference to be one token, as
`trainer.tokenizer` makes them. For any other tokenizer (a pretrained base, whose ids are written
as text) `answer_constraint` gives `PatternConstraint`: the gateway's own regex
(`contract.prompt.answer_pattern`), compiled by xgrammar, the library vLLM's structured outputs
use, so the trainer samples exactly what vLLM would let the model serve.
"""

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import xgrammar
from tqdm.auto import tqdm
from transformers import LogitsProcessor, PreTrainedModel, PreTrainedTokenizerBase

from contract.prompt import MAX_RATIONALE_CHARS, Rendering, answer_pattern, ref, render_answer
from contract.rating import DIGITS, STEPS
from contract.search import QUERY_CHARS, THINK_CHARS
from trainer.examples import Example

log = logging.getLogger(__name__)
TAGS = ("<think>", "</think>", "<answer>", "</answer>")
GREEDY_BATCH = 8  # prompts `greedy_after` decodes together (validation)


class Grammar:
    """Token ids of the answer's fixed parts, read off the tokenizer."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, item_ids: Sequence[str]):
        self.think, self.end_think, self.answer, self.end_answer = (
            _single(tokenizer, tag) for tag in TAGS
        )
        self.eos = tokenizer.eos_token_id
        a, b = item_ids[0], item_ids[1] if len(item_ids) > 1 else item_ids[0]
        tokens = tokenizer(render_answer("", [a, b]), add_special_tokens=False)["input_ids"]
        first, second = _single(tokenizer, ref(a)), _single(tokenizer, ref(b))
        start = tokens.index(first)
        # What the contract writes between two ids (", "), however the tokenizer splits it.
        self.separator = tokens[start + 1 : start + 1 + tokens[start + 1 :].index(second)]
        self.free = free_text(tokenizer)

    def answer_length(self, k: int) -> int:
        """Tokens from `</think>` to the end of sequence, both included."""
        return 1 + 1 + k + (k - 1) * len(self.separator) + 1 + 1


def free_text(tokenizer: PreTrainedTokenizerBase) -> torch.Tensor:
    """Tokens a rationale or a reasoning step may hold: any but a tag, an end of sequence, the
    padding or an angle bracket."""
    free = torch.ones(len(tokenizer), dtype=torch.bool)
    banned = [tokenizer.eos_token_id, tokenizer.pad_token_id]
    free[[token for token in banned if token is not None]] = False
    for token_id in range(len(tokenizer)):
        if any(c in tokenizer.decode([token_id]) for c in "<>"):
            free[token_id] = False
    return free


def _single(tokenizer: PreTrainedTokenizerBase, text: str) -> int:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise ValueError(f"{text!r} is {len(ids)} tokens")
    return ids[0]


def answer_choices(tokenizer: PreTrainedTokenizerBase, candidates: Sequence[str]) -> list[str]:
    """The candidates an answer may name, as the gateway chooses them
    (`server.recommend.answer_choices`): those that are one token, every candidate when none is.
    One id that is not a token (an item the tokenizer left out) put every prompt under the regex,
    where ids are spelled in pieces and repeated."""
    named = [
        item
        for item in candidates
        if len(tokenizer(ref(item), add_special_tokens=False)["input_ids"]) == 1
    ]
    return named or list(candidates)


@dataclass(frozen=True)
class Row:
    """One prompt's candidates (as token ids) and how many it must rank."""

    candidates: list[int]
    k: int


def unpadded(prompt: Sequence[int], pad: int | None) -> tuple[int, ...]:
    """A prompt's token ids without left padding: what a constraint's table is keyed by. The
    table's own prompts lose leading pad ids too, so that a prompt opening with the pad token
    (a tokenizer whose pad is its first chat token) is still found."""
    start = next((j for j, t in enumerate(prompt) if t != pad), len(prompt))
    return tuple(prompt[start:])


def built_for(table: dict[tuple[int, ...], Any], prompt: list[int], pad: int | None) -> Any:
    """What `table` holds for this prompt's token ids, left padding removed; KeyError for a
    prompt the constraint was not built for."""
    if (found := table.get(unpadded(prompt, pad))) is None:
        raise KeyError("a prompt the answer constraint was not built for")
    return found


class AnswerConstraint(LogitsProcessor):
    """Masks every token the answer grammar does not allow next; no candidate twice.

    Rows are recognised by their prompt's token ids, so one processor serves any batch of the
    examples it was built for, left-padded or not. `start` must be called before each
    `generate` (`constrained_generation` does): the first call after it sees the prompts.
    """

    def __init__(
        self,
        grammar: Grammar,
        rows: dict[tuple[int, ...], Row],
        max_new_tokens: int,
        pad: int | None,
    ):
        self.grammar, self.rows, self.max_new_tokens, self.pad = grammar, rows, max_new_tokens, pad
        self._batch: list[Row] = []
        self._prompt_length = 0

    def start(self) -> None:
        self._batch = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.Tensor:
        if not self._batch:
            self._prompt_length = input_ids.shape[1]
            self._batch = [self._row(prompt) for prompt in input_ids.tolist()]
        allowed = torch.zeros_like(scores, dtype=torch.bool)
        completions = input_ids[:, self._prompt_length :].tolist()
        for i, (row, done) in enumerate(zip(self._batch, completions, strict=True)):
            allowed[i] = self._allowed(row, done, scores.shape[1])
        return scores.masked_fill(~allowed, float("-inf"))

    def _row(self, prompt: list[int]) -> Row:
        return built_for(self.rows, prompt, self.pad)

    def _allowed(self, row: Row, done: list[int], vocab: int) -> torch.Tensor:
        g = self.grammar
        mask = torch.zeros(vocab, dtype=torch.bool)
        if g.eos in done:  # finished rows are padded by generate; leave them any token
            mask[:] = True
            return mask
        if not done:
            mask[g.think] = True
        elif g.end_think not in done:
            left = self.max_new_tokens - len(done)
            if left > g.answer_length(row.k):
                mask[: len(g.free)] = g.free
            mask[g.end_think] = True
        else:
            mask[self._answer_step(row, done[done.index(g.end_think) + 1 :])] = True
        return mask

    def _answer_step(self, row: Row, answer: list[int]) -> list[int]:
        """`<answer>` id (separator id) k-1 times `</answer>` eos, ids distinct candidates."""
        g = self.grammar
        if not answer:
            return [g.answer]
        body = answer[1:]
        chosen = [t for t in body if t in row.candidates]
        if len(chosen) == row.k:
            return [g.eos] if body[-1] == g.end_answer else [g.end_answer]
        since = len(body) - (body.index(chosen[-1]) + 1) if chosen else None
        if since is None or since == len(g.separator):
            return [t for t in row.candidates if t not in chosen]
        return [g.separator[since]]


def answer_constraint(
    tokenizer: PreTrainedTokenizerBase, examples: Sequence[Example], max_new_tokens: int
) -> "AnswerConstraint | PatternConstraint":
    """The constraint for these examples' prompts: in token space where the tokenizer can carry
    it (each prompt's `answer_choices`), else the gateway's regex (`PatternConstraint`)."""
    choices = [answer_choices(tokenizer, e.candidates) for e in examples]
    try:
        grammar = Grammar(tokenizer, [item for named in choices for item in named])
        rows = {
            _prompt_ids(tokenizer, e.prompt): Row(
                [_single(tokenizer, ref(i)) for i in named], min(e.k, len(named))
            )
            for e, named in zip(examples, choices, strict=True)
        }
    except ValueError:
        return PatternConstraint(tokenizer, examples)
    k = max(row.k for row in rows.values())
    if grammar.answer_length(k) >= max_new_tokens:
        raise ValueError(f"{max_new_tokens} new tokens cannot hold a {k}-item answer")
    return AnswerConstraint(grammar, rows, max_new_tokens, tokenizer.pad_token_id)


def _prompt_ids(tokenizer: PreTrainedTokenizerBase, prompt: str) -> tuple[int, ...]:
    return unpadded(tokenizer(text=prompt)["input_ids"], tokenizer.pad_token_id)


def answer_budget(tokenizer: PreTrainedTokenizerBase, examples: Sequence[Example]) -> int:
    """New tokens that always hold an answer of the gateway's regex in a tokenizer that writes
    ids as text: the longest k ids of these examples, a rationale of MAX_RATIONALE_CHARS
    characters (a token writes one or more) and the end of sequence. A model that closes its
    rationale sooner stops sooner."""
    ids = max(
        len(
            tokenizer(render_answer("", e.candidates[: e.k]), add_special_tokens=False)["input_ids"]
        )
        for e in examples
    )
    return ids + MAX_RATIONALE_CHARS + 1


class PatternConstraint(LogitsProcessor):
    """The gateway's answer regex for each prompt (its candidates, k ids), compiled by xgrammar
    and applied in transformers' `generate`: masks every token the regex does not allow next,
    and after a complete answer allows only the end of sequence.

    Unlike the token-space grammar it cannot exclude repeated ids (the gateway's regex cannot
    either: its parser drops them), nor fit the answer to the token budget. Rows are recognised
    by their prompt's token ids, as in `AnswerConstraint`.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, examples: Sequence[Example]):
        self.info = xgrammar.TokenizerInfo.from_huggingface(tokenizer)
        compiler = xgrammar.GrammarCompiler(self.info)
        self.grammars = {
            _prompt_ids(tokenizer, e.prompt): compiler.compile_regex(
                answer_pattern(e.candidates, e.k)
            )
            for e in examples
        }
        self.pad = tokenizer.pad_token_id
        self._matchers: list[xgrammar.GrammarMatcher] = []
        self._prompt_length = 0

    def start(self) -> None:
        self._matchers = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.Tensor:
        if not self._matchers:
            self._prompt_length = input_ids.shape[1]
            self._matchers = [self._matcher(prompt) for prompt in input_ids.tolist()]
        elif input_ids.shape[1] > self._prompt_length:
            for matcher, token in zip(self._matchers, input_ids[:, -1].tolist(), strict=True):
                if not matcher.is_terminated():
                    matcher.accept_token(token)
        mask = xgrammar.allocate_token_bitmask(len(self._matchers), self.info.vocab_size)
        for i, matcher in enumerate(self._matchers):
            if matcher.is_terminated():  # finished rows are padded by generate: any token
                mask[i] = -1
            else:
                matcher.fill_next_token_bitmask(mask, i)
        width = min(scores.shape[1], self.info.vocab_size)
        head = scores[:, :width].contiguous()
        xgrammar.apply_token_bitmask_inplace(head, mask.to(scores.device), vocab_size=width)
        masked = torch.full_like(scores, float("-inf"))  # beyond the tokenizer: padding rows
        masked[:, :width] = head
        return masked

    def _matcher(self, prompt: list[int]) -> xgrammar.GrammarMatcher:
        return xgrammar.GrammarMatcher(built_for(self.grammars, prompt, self.pad))


class TaggedSteps(LogitsProcessor):
    """A grammar of tagged steps in token space: each step's open tag, free text of 1 to its
    character limit (the first character visible), its close tag; then a fixed `tail`, one set
    of allowed tokens per position (ending with the end of sequence). Every prompt gets the same
    grammar. The rating answer and the search answer are two such grammars."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        steps: Sequence[tuple[str, int]],
        tail: Sequence[Sequence[int]],
    ):
        self.free = free_text(tokenizer)
        texts = [tokenizer.decode([token]) for token in range(len(self.free))]
        self.chars = torch.tensor([len(text) for text in texts])
        # A step's first character is not whitespace.
        self.opening = self.free & torch.tensor([bool(t) and not t[0].isspace() for t in texts])
        self.decoded = texts
        self.eos = tokenizer.eos_token_id
        self.steps = [
            (_single(tokenizer, f"<{name}>"), _single(tokenizer, f"</{name}>"), chars)
            for name, chars in steps
        ]
        self.tail = [list(allowed) for allowed in tail]
        self._prompt_length: int | None = None

    @property
    def length(self) -> int:
        """The most tokens an answer takes (every token at least a character), end of sequence
        included."""
        return sum(chars + 2 for _, _, chars in self.steps) + len(self.tail)

    def start(self) -> None:
        self._prompt_length = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.Tensor:
        if self._prompt_length is None:
            self._prompt_length = input_ids.shape[1]
        allowed = torch.zeros_like(scores, dtype=torch.bool)
        for i, done in enumerate(input_ids[:, self._prompt_length :].tolist()):
            allowed[i] = self._allowed(done, scores.shape[1])
        return scores.masked_fill(~allowed, float("-inf"))

    def _allowed(self, done: list[int], vocab: int) -> torch.Tensor:
        mask = torch.zeros(vocab, dtype=torch.bool)
        if self.eos in done:  # finished rows are padded by generate
            mask[:] = True
            return mask
        fixed, open_step = self._next(done)
        mask[fixed] = True
        if open_step is not None:
            written, limit = open_step
            room = self.chars <= limit - len(written)
            mask[: len(self.free)] |= (self.opening if not written else self.free) & room
        return mask

    def _next(self, done: list[int]) -> tuple[list[int], tuple[str, int] | None]:
        """The fixed tokens allowed after `done`, and the open step's text and character limit
        when a step is being written."""
        position = 0
        for opening, closing, chars in self.steps:
            if len(done) == position:
                return [opening], None
            end = done.index(closing, position) if closing in done[position:] else None
            if end is None:
                text = "".join(self.decoded[token] for token in done[position + 1 :])
                return ([closing] if text else []), (text, chars)
            position = end + 1
        return self.tail[min(len(done) - position, len(self.tail) - 1)], None


class RatingConstraint(TaggedSteps):
    """The rating grammar (`contract.rating.rating_pattern`): the three reasoning steps of
    `step_chars` at most, then `<rating>`, one of the digits 1-5, `</rating>` and the end."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, step_chars: int):
        self.rating = (_single(tokenizer, "<rating>"), _single(tokenizer, "</rating>"))
        self.digits = [_single(tokenizer, digit) for digit in DIGITS]
        tail = [[self.rating[0]], self.digits, [self.rating[1]], [tokenizer.eos_token_id]]
        super().__init__(tokenizer, [(name, step_chars) for name in STEPS], tail)


def search_constraint(tokenizer: PreTrainedTokenizerBase, rendering: Rendering) -> TaggedSteps:
    """The search grammar (`contract.search.search_pattern`): reasoning, query, end."""
    steps = [("think", THINK_CHARS[rendering]), ("answer", QUERY_CHARS[rendering])]
    return TaggedSteps(tokenizer, steps, [[tokenizer.eos_token_id]])


def greedy_after(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    budget: int,
    tag: int | None = None,
    desc: str = "greedy decoding",
) -> list[tuple[str, torch.Tensor | None]]:
    """The greedy completion of each prompt, and the scores of the step right after token `tag`
    (after the logits processors in force: what vLLM's processed log-probabilities are), or None
    when the completion never writes `tag` (or no tag is asked for).

    Prompts are decoded GREEDY_BATCH at a time, left-padded: one forward pass serves a batch,
    where one prompt at a time left a GPU idle between the constraint's steps."""
    results: list[tuple[str, torch.Tensor | None]] = []
    with tqdm(total=len(prompts), desc=desc, unit="prompt") as bar:
        for start in range(0, len(prompts), GREEDY_BATCH):
            batch = prompts[start : start + GREEDY_BATCH]
            results += _greedy_batch(model, tokenizer, batch, budget, tag)
            bar.update(len(batch))
    return results


def _greedy_batch(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    budget: int,
    tag: int | None,
) -> list[tuple[str, torch.Tensor | None]]:
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        inputs = tokenizer(text=list(prompts), return_tensors="pt", padding=True)
    finally:
        tokenizer.padding_side = side
    width = inputs["input_ids"].shape[1]
    after = AfterTag(tag, len(prompts), width)
    output = model.generate(
        **inputs.to(model.device),
        max_new_tokens=budget,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
        logits_processor=[after],
    )
    texts = tokenizer.batch_decode(output[:, width:], skip_special_tokens=True)
    return list(zip(texts, after.kept, strict=True))


class AfterTag(LogitsProcessor):
    """Keeps each row's scores at the step right after its first `tag` (after the processors
    before it: the constraint's), changing nothing: what validation reads, without holding every
    step's scores (`output_scores`: steps x batch x vocabulary)."""

    def __init__(self, tag: int | None, rows: int, prompt_length: int):
        self.tag, self.prompt_length = tag, prompt_length
        self.kept: list[torch.Tensor | None] = [None] * rows

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.Tensor:
        if self.tag is None or input_ids.shape[1] <= self.prompt_length:
            return scores
        for row, last in enumerate(input_ids[:, -1].tolist()):
            if last == self.tag and self.kept[row] is None:
                self.kept[row] = scores[row].clone()
        return scores


@contextmanager
def constrained_generation(
    model: PreTrainedModel, constraint: AnswerConstraint | PatternConstraint | TaggedSteps | None
) -> Iterator[None]:
    """Make every `model.generate` call in the block apply `constraint`.

    GRPOTrainer calls `generate` itself and has no argument for a logits processor (its
    `generation_kwargs` become a GenerationConfig, which cannot hold one), so the instance's
    `generate` is wrapped for the duration and restored after.
    """
    if constraint is None:
        yield
        return

    def generate(*args, logits_processor=(), **kwargs):
        constraint.start()
        processors = [constraint, *logits_processor]
        return type(model).generate(model, *args, logits_processor=processors, **kwargs)

    model.generate = generate
    try:
        yield
    finally:
        del model.generate
