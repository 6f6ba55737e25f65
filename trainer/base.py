"""A pretrained base to train from (`reasonrec bootstrap --base VERSION`).

The base's weights stay frozen under new LoRA adapters, and it keeps its own tokenizer. Items are
written one of two ways:

- as text (`#1234`, several tokens of the base's vocabulary): the result is a LoRA version of
  the base, served as a vLLM runtime adapter;
- with `item_tokens`, as one new token each, and the answer tags too, as the embedded model
  writes them. Each item's embedding row starts from its vector in the candidate index
  (`trainer.model.seed_item_embeddings`), and the new rows train beside the adapters. vLLM
  serves no adapter that adds tokens, so the result is merged into a full version.
"""

from collections.abc import Mapping

import numpy as np
import torch
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from contract.tasks import Task
from server.registry import Manifest, Registry, RegistryError
from trainer.grpo import lora_config
from trainer.model import seed_item_embeddings
from trainer.tokenizer import answer_tokens

ONLY_RANKING = (
    "a pretrained base learns ranking only (rating and search start from the embedded model for "
    "now)"
)


def base_manifest(registry: Registry, version: str, tasks: frozenset[Task]) -> Manifest:
    """The base `bootstrap --base` starts from; raises RegistryError for one it cannot train
    from."""
    manifest = registry.manifest(version)
    if manifest.kind != "full":
        raise RegistryError(f"base {version} is a LoRA adapter; give the full version it adapts")
    if tasks != {Task.rank}:
        raise RegistryError(ONLY_RANKING)
    return manifest


def load_base(
    registry: Registry,
    base: Manifest,
    rank: int,
    device: torch.device,
    item_vectors: Mapping[str, np.ndarray] | None = None,
    seed: int = 0,
) -> tuple[PeftModel, PreTrainedTokenizerBase]:
    """The base's weights, frozen, under new LoRA adapters of `rank`, and its tokenizer; with
    `item_vectors` (item id -> index vector), every item and answer tag a new token whose
    embedding row trains too."""
    path = registry.path(base.version)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # batches pad; the answer ends with eos anyway
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    config = lora_config(rank)
    if item_vectors is not None:
        config.trainable_token_indices = add_item_tokens(model, tokenizer, item_vectors, seed)
    return get_peft_model(model.to(device), config), tokenizer


def add_item_tokens(
    model, tokenizer: PreTrainedTokenizerBase, item_vectors: Mapping[str, np.ndarray], seed: int
) -> list[int]:
    """Add the answer tags and item references to the vocabulary; returns the new token ids.

    New rows start at the mean of the old ones (transformers' resizing), then items at their
    index vectors, scaled to the norm of an existing row; with tied embeddings (SmolLM2) the
    same rows score items at the output.
    """
    before = len(tokenizer)
    tokenizer.add_tokens(answer_tokens(list(item_vectors)))
    model.resize_token_embeddings(len(tokenizer))
    seed_item_embeddings(model, tokenizer, item_vectors, seed)
    return list(range(before, len(tokenizer)))


def for_grpo(model: PeftModel):
    """The SFT'd model with its adapters and new token rows merged in, for GRPO to train new
    adapters on. TRL's GRPO scores completions with the output head's weight read directly,
    which misses peft's trainable rows; with tied embeddings (SmolLM2) the head is peft's wrapper
    and TRL fails on it."""
    return model.merge_and_unload()


def servable(model: PeftModel, item_tokens: bool):
    """What is published: the adapters as they are, or, for a base given item tokens, the
    model with adapters and new rows merged in (vLLM cannot serve an adapter that adds
    tokens)."""
    return model.merge_and_unload() if item_tokens else model
