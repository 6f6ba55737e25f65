"""Model presets are servable by vLLM on CPU and the model matches its toy_tokenizer."""

from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from contract.prompt import ref
from trainer.model import (
    SIZES,
    VLLM_CPU_HEAD_SIZES,
    ModelSize,
    build_model,
    parameter_count,
    seed_item_embeddings,
)


@pytest.mark.parametrize("name", sorted(SIZES))
def test_presets_fit_vllm(name: str) -> None:
    size = SIZES[name]
    assert size.head_dim in VLLM_CPU_HEAD_SIZES
    assert size.num_attention_heads % size.num_key_value_heads == 0
    assert size.max_position_embeddings >= 2048


def test_tiny_preset_size(toy_tokenizer: PreTrainedTokenizerFast) -> None:
    model = build_model(toy_tokenizer, "tiny")
    assert 0.2e6 <= parameter_count(model) <= 0.5e6
    assert model.config.vocab_size == len(toy_tokenizer)
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_default_preset_size(toy_tokenizer: PreTrainedTokenizerFast) -> None:
    # with this test's small vocabulary: the layers alone; MovieLens adds ~2.5M of embedding
    assert 2e6 <= parameter_count(build_model(toy_tokenizer, "default")) <= 8e6


def test_generation_stops_on_the_tokenizers_eos(toy_tokenizer: PreTrainedTokenizerFast) -> None:
    model = build_model(toy_tokenizer, "tiny")
    assert model.generation_config.eos_token_id == toy_tokenizer.eos_token_id
    assert model.generation_config.pad_token_id == toy_tokenizer.pad_token_id


def test_same_seed_same_weights(toy_tokenizer: PreTrainedTokenizerFast) -> None:
    a, b = build_model(toy_tokenizer, "tiny", seed=1), build_model(toy_tokenizer, "tiny", seed=1)
    assert torch.equal(a.model.embed_tokens.weight, b.model.embed_tokens.weight)


def test_save_and_load(toy_tokenizer: PreTrainedTokenizerFast, tmp_path: Path) -> None:
    model = build_model(toy_tokenizer, "tiny").eval()
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.tensor([toy_tokenizer("#100 | Road Drama")["input_ids"]])
    assert torch.allclose(model(ids).logits, loaded(ids).logits)


@pytest.mark.parametrize(
    ("hidden", "heads", "kv_heads", "message"),
    [
        (48, 2, 1, "head size 24"),  # vLLM's CPU attention has no 24
        (64, 3, 1, "multiple of num_attention_heads"),
        (128, 4, 3, "multiple of num_key_value_heads"),
    ],
)
def test_unservable_shapes_are_refused(
    hidden: int, heads: int, kv_heads: int, message: str
) -> None:
    with pytest.raises(ValidationError, match=message):
        ModelSize(
            hidden_size=hidden,
            num_hidden_layers=1,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            intermediate_size=64,
        )


def test_item_embeddings_start_at_the_index_vectors(
    toy_tokenizer: PreTrainedTokenizerFast, toy_catalog: dict
) -> None:
    """The rotation keeps the vectors' geometry: similar items start with similar embeddings."""
    model = build_model(toy_tokenizer, "tiny", seed=0)
    fresh_norm = float(model.get_input_embeddings().weight.detach().norm(dim=1).mean())
    rng = np.random.default_rng(0)
    vectors = {item_id: rng.normal(size=8) for item_id in list(toy_catalog)[:5]}
    vectors["not-a-token"] = rng.normal(size=8)
    assert seed_item_embeddings(model, toy_tokenizer, vectors) == 5
    weight = model.get_input_embeddings().weight.detach()
    rows = {i: weight[toy_tokenizer.convert_tokens_to_ids(ref(i))] for i in list(vectors)[:5]}
    for a, b in [(x, y) for x in rows for y in rows]:
        expected = vectors[a] @ vectors[b] / np.linalg.norm(vectors[a]) / np.linalg.norm(vectors[b])
        got = torch.nn.functional.cosine_similarity(rows[a], rows[b], dim=0)
        assert float(got) == pytest.approx(float(expected), abs=1e-5)
    for row in rows.values():
        assert float(row.norm()) == pytest.approx(fresh_norm, rel=1e-4)
