"""The tokenizer keeps item references whole and visible, and numbers ordinary."""

from pathlib import Path

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from contract.prompt import INSTRUCTIONS, parse_answer, render_answer
from trainer.model import build_model
from trainer.tokenizer import EOS, PAD, TAGS, train_tokenizer

ITEMS = ["1", "12", "123", "a-b", "x_y"]
TEXTS = ["Toy Story (1995) Animation Comedy", "Twelve Monkeys (1995) Sci-Fi", "Heat 123 Crime"]


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    return train_tokenizer(TEXTS * 10, ITEMS, vocab_size=2000)


def tokens(tok: PreTrainedTokenizerFast, text: str) -> list[str]:
    return tok.convert_ids_to_tokens(tok(text)["input_ids"])


class TestItemReferences:
    @pytest.mark.parametrize("item_id", ITEMS)
    def test_a_reference_is_one_token(self, tok: PreTrainedTokenizerFast, item_id: str) -> None:
        assert tokens(tok, f"#{item_id}") == [f"#{item_id}"]

    def test_not_split_inside_an_answer(self, tok: PreTrainedTokenizerFast) -> None:
        pieces = tokens(tok, "<think>ok</think><answer>#123, #12, #1</answer>")
        assert {"#123", "#12", "#1", *TAGS} <= set(pieces)

    def test_a_longer_id_is_not_cut_into_a_known_one(self, tok: PreTrainedTokenizerFast) -> None:
        # "#1234" is not an item: it must not read as item #123 followed by "4"
        assert "#123" not in tokens(tok, "#1234")
        assert "#12" not in tokens(tok, "x#12")  # only as a whole word

    def test_a_bare_number_stays_a_number(self, tok: PreTrainedTokenizerFast) -> None:
        pieces = tokens(tok, "Heat 123 (1995) rated 12 by 1 user")
        assert not any(piece.startswith("#") for piece in pieces)

    def test_references_are_ordinary_tokens(self, tok: PreTrainedTokenizerFast) -> None:
        # TRL and vLLM decode completions with special tokens skipped: ids and tags must stay
        assert {"#123", *TAGS}.isdisjoint(tok.all_special_tokens)

    def test_an_id_the_byte_decoder_would_mangle_is_left_to_bpe(self) -> None:
        tok = train_tokenizer(TEXTS, ["café"], vocab_size=300)
        ids = tok("<answer>#café</answer>")["input_ids"]
        assert tok.decode(ids) == "<answer>#café</answer>"


class TestRoundTrip:
    def test_decode_skipping_special_tokens_keeps_the_answer(
        self, tok: PreTrainedTokenizerFast
    ) -> None:
        answer = render_answer("Likes Heat 123; #12 fits", ["123", "12", "a-b"])
        ids = [*tok(answer)["input_ids"], tok.eos_token_id, tok.pad_token_id]
        text = tok.decode(ids, skip_special_tokens=True)
        assert text == answer
        assert parse_answer(text).items == ("123", "12", "a-b")

    def test_save_and_load_beside_the_model(
        self, tok: PreTrainedTokenizerFast, tmp_path: Path
    ) -> None:
        # The served layout: next to a qwen2 config.json, AutoTokenizer (and so vLLM) ignores the
        # saved class and rebuilds a Qwen2Tokenizer from vocab and merges. It must be the same.
        build_model(tok, "tiny").save_pretrained(tmp_path)
        tok.save_pretrained(tmp_path)
        loaded = AutoTokenizer.from_pretrained(tmp_path)
        text = f"{INSTRUCTIONS}\n#1 | Heat 123 (1995) | Crime | year: 1995\n#1234 x#12 café"
        text += render_answer("Likes Heat, 12 times", ["123", "x_y", "a-b"])
        assert loaded(text)["input_ids"] == tok(text)["input_ids"]
        assert loaded.decode(loaded(text)["input_ids"], skip_special_tokens=True) == text
        assert (loaded.eos_token, loaded.bos_token, loaded.pad_token) == (EOS, EOS, PAD)
        assert len(loaded) == len(tok)


def test_instructions_tokenize_compactly(tok: PreTrainedTokenizerFast) -> None:
    # trained on the boilerplate: about one token per word, not one per few bytes
    assert len(tok(INSTRUCTIONS)["input_ids"]) <= 1.5 * len(INSTRUCTIONS.split())


def test_no_special_tokens_are_added(tok: PreTrainedTokenizerFast) -> None:
    # prompts must tokenize the same in the trainer, TRL and vLLM: nothing prepended or appended
    assert tok("Heat")["input_ids"] == tok("Heat", add_special_tokens=False)["input_ids"]


def test_vocab_size_too_small_is_refused() -> None:
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(TEXTS, ITEMS, vocab_size=100)
