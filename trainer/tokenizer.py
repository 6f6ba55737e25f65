"""The tokenizer of the embedded model: byte-level BPE trained on the catalog and the prompt text.

Three choices matter to the rest of the system:

- Every item reference (`ref(item_id)`, "#<id>") is one added token, so naming an item costs one
  token and a model cannot half-write an id. It is an *ordinary* added token, not a special one:
  TRL and vLLM decode completions with special tokens skipped, and the ids must survive that.
  It matches only as a whole word, so "#12" is not found inside "#123" or "x#12", and a bare
  number ("123" in a title or a profile) stays ordinary text.
- The answer tags (`<think>`, `</think>`, `<answer>`, `</answer>`, and for a model that rates
  `<user>`, `<item>`, `<match>`, `<rating>` and their closings) are ordinary added tokens for the
  same reason: the parser must see them in decoded text.
- The BPE is trained on the fixed prompt text as well as the catalog, so instructions that every
  prompt repeats cost few tokens.

The result is a plain `PreTrainedTokenizerFast` with no chat template: prompts are raw text, which
is how the trainer, TRL and vLLM all feed this model. Its normalizer, pre-tokenizer and decoder are
exactly Qwen2's: for a folder whose config.json says `qwen2`, transformers 5's `AutoTokenizer` (and
so vLLM) ignores the saved tokenizer class and rebuilds a `Qwen2Tokenizer` from the vocabulary and
merges with Qwen2's pipeline. Any other pipeline would tokenize differently once served.
"""

from collections.abc import Collection, Iterable, Iterator, Sequence

from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    trainers,
)
from transformers import PreTrainedTokenizerFast
from transformers.models.qwen2 import tokenization_qwen2

from contract.prompt import INSTRUCTIONS, KEY_ATTRIBUTES, OUTPUT_FORMAT, ref
from contract.rating import TAGS as RATING_TAGS
from contract.tasks import Task

EOS = "<|endoftext|>"
PAD = "<|pad|>"
TAGS = ("<think>", "</think>", "<answer>", "</answer>")

# Lines of `contract.prompt.build_prompt` that do not depend on the data. Repeated so that BPE
# merges their words even when the catalog is large; the catalog's own words are counted once per
# item.
_BOILERPLATE = (
    INSTRUCTIONS,
    *(OUTPUT_FORMAT.format(k=k) for k in (1, 5, 10, 20)),
    "User: new user, nothing known yet.",
    "History: none.",
    "History, oldest first:",
    "same day as the latest:",
    "the week before:",
    "earlier:",
    "Candidates (50):",
    "no category",
    "".join(f" | {key}: " for key in KEY_ATTRIBUTES),  # as in a candidate line
)
_BOILERPLATE_REPEAT = 100
# The 256 byte symbols and the two special tokens come first; below this there is nothing to merge.
MIN_VOCAB_SIZE = 256 + 2 + 1


def _corpus(texts: Iterable[str]) -> Iterator[str]:
    for _ in range(_BOILERPLATE_REPEAT):
        yield from _BOILERPLATE
    yield from texts


def _one_token(text: str) -> bool:
    """Whether `text` can be an added token that decodes back to itself.

    The byte-level decoder maps printable ASCII other than space to itself and mangles everything
    else (it is applied to added tokens too), so an id with other characters is left to the BPE:
    it then costs several tokens but still round-trips.
    """
    return all(33 <= ord(char) <= 126 for char in text)


def _item_tokens(item_ids: Sequence[str]) -> list[AddedToken]:
    refs = dict.fromkeys(ref(item_id) for item_id in item_ids)  # dedupe, keep order
    return [
        AddedToken(text, single_word=True, normalized=False, special=False)
        for text in refs
        if _one_token(text)
    ]


def answer_tokens(item_ids: Sequence[str], tasks: Collection[Task] = (Task.rank,)) -> list:
    """The tokens added to a vocabulary so that every answer tag of `tasks` and every item
    reference is one token (not special: decoded completions keep them)."""
    names = TAGS + (RATING_TAGS if Task.rate in tasks else ())
    tags = [AddedToken(tag, normalized=False, special=False) for tag in names]
    return tags + _item_tokens(item_ids)


def _qwen2_pipeline(backend: Tokenizer) -> Tokenizer:
    """What `transformers.Qwen2Tokenizer.__init__` sets up (transformers 5.x); see the docstring."""
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            # Qwen2's regex: words, single digits, punctuation runs, whitespace.
            pre_tokenizers.Split(Regex(tokenization_qwen2.PRETOKENIZE_REGEX), behavior="isolated"),
            # add_prefix_space=False: a prompt is fed as is, and a completion continues it.
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    return backend


def train_tokenizer(
    texts: Iterable[str],
    item_ids: Sequence[str],
    vocab_size: int,
    tasks: Collection[Task] = (Task.rank,),
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE of `vocab_size` tokens on `texts` and the prompt boilerplate.

    The returned tokenizer is larger than `vocab_size` by the item references and the answer
    tags of `tasks`.
    """
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"vocab_size must be at least {MIN_VOCAB_SIZE} (bytes + specials)")
    backend = _qwen2_pipeline(Tokenizer(models.BPE()))
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_corpus(texts), trainer=trainer)
    backend.add_tokens(answer_tokens(item_ids, tasks))
    # bos = eos as in GPT-2/Qwen; nothing adds it automatically (no post-processor), so prompts
    # tokenize the same way in the trainer, in TRL and in vLLM.
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token=EOS, bos_token=EOS, pad_token=PAD
    )
