"""Which tokens an answer may use: a candidate's own item token, never pieces that spell it."""

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from contract.prompt import ITEM_MARK
from server.vocabulary import ItemTokens
from trainer.tokenizer import train_tokenizer

ITEMS = ["2", "29", "294", "7"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer(["Film 29 and # 294", "Road #"], ITEMS, vocab_size=300).save_pretrained(path)
    return path


def test_only_the_candidates_item_tokens_and_mark_free_tokens(folder: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(folder)
    items = ItemTokens.load(folder)
    assert items is not None

    allowed = set(items.allowed(["294", "7"]))

    assert tokenizer.convert_tokens_to_ids("#294") in allowed
    assert tokenizer.convert_tokens_to_ids("#7") in allowed
    # "#29" followed by "4" spells "#294" too: the regex alone would accept it.
    assert tokenizer.convert_tokens_to_ids("#29") not in allowed
    spelled = {token for token in allowed if ITEM_MARK in tokenizer.decode([token])}
    assert spelled == {tokenizer.convert_tokens_to_ids(t) for t in ("#294", "#7")}
    assert tokenizer.convert_tokens_to_ids("<answer>") in allowed
    assert tokenizer.eos_token_id in allowed


def test_a_candidate_that_is_not_one_token_is_not_nameable(folder: Path) -> None:
    items = ItemTokens.load(folder)

    assert items is not None and items.allowed(["294", "not-in-the-vocabulary"]) is None
    assert items.nameable(["new", "294", "not-in-the-vocabulary", "7"]) == ["294", "7"]


def test_a_tokenizer_without_item_tokens_has_none(tmp_path: Path) -> None:
    plain = train_tokenizer(["just words"], [], vocab_size=300)
    plain.save_pretrained(tmp_path)

    assert ItemTokens.load(tmp_path) is None
    assert ItemTokens.load(tmp_path / "missing") is None
