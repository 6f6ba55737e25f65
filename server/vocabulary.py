"""Which token ids an answer may use, for a model whose every item is one token.

The answer regex works on characters, not tokens, so it accepts an item written in pieces: with
`#29` and `#294` both single tokens, vLLM took the token `#29` (an item that was not a candidate)
and completed it with `4` to spell the candidate `#294` (seen with the compact tiny model: most
answers were made that way). Restricting the tokens to the candidates' own item tokens and to
tokens that hold no item mark at all leaves one way to write an item: its token. Except where one
candidate's id begins another's (`29` and `294` both candidates): `#29` then `4` still spells
`#294`. The served order reads the scores of the answer's first step, where only item tokens
count, and the answer's text only when that step is missing or the answer was cut.
"""

from collections.abc import Sequence
from pathlib import Path

from tokenizers import Tokenizer

from contract.prompt import ITEM_MARK, ref

TOKENIZER_FILE = "tokenizer.json"


class ItemTokens:
    """A tokenizer's item tokens; `load` gives None for a tokenizer without any."""

    def __init__(self, tokenizer: Tokenizer):
        self._tokenizer = tokenizer
        size = tokenizer.get_vocab_size(with_added_tokens=True)
        # Tokens whose text holds no item mark: the rationale, tags and separators are made of
        # these, and no sequence of them can spell an item.
        self.plain = [i for i in range(size) if ITEM_MARK not in tokenizer.decode([i])]

    @classmethod
    def load(cls, folder: Path) -> "ItemTokens | None":
        path = folder / TOKENIZER_FILE
        if not path.is_file():
            return None
        tokenizer = Tokenizer.from_file(str(path))
        added = tokenizer.get_added_tokens_decoder().values()
        if not any(token.content.startswith(ITEM_MARK) for token in added):
            return None
        return cls(tokenizer)

    def nameable(self, candidate_ids: Sequence[str]) -> list[str]:
        """The candidates that are one token, in their order (an item added after the tokenizer
        was built is not)."""
        return [i for i in candidate_ids if self._token(i) is not None]

    def allowed(self, candidate_ids: Sequence[str]) -> list[int] | None:
        """The token ids an answer naming these candidates may use, or None when a candidate is
        not one token (the answer is then constrained by the regex alone)."""
        tokens = [self._token(item_id) for item_id in candidate_ids]
        if any(token is None for token in tokens):
            return None
        return self.plain + tokens

    def _token(self, item_id: str) -> int | None:
        return self._tokenizer.token_to_id(ref(item_id))
