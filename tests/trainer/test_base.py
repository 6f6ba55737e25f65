"""Items as new tokens of a pretrained base (`trainer.base.add_item_tokens`)."""

from pathlib import Path

import numpy as np
import pytest
import torch
from peft import PeftModel, get_peft_model

from contract.prompt import ANSWER_TAG, ItemView, ref
from reward_rules.terms import Format
from tests.trainer.conftest import one_thread
from tests.trainer.gguf_files import tiny_model, tiny_tokenizer
from trainer.base import add_item_tokens, for_grpo, servable
from trainer.examples import Example
from trainer.grpo import lora_config, run_grpo
from trainer.presets import GrpoSettings


def test_items_and_tags_become_tokens_whose_rows_start_from_the_index_vectors() -> None:
    tokenizer = tiny_tokenizer()
    model = tiny_model(len(tokenizer))
    before = len(tokenizer)
    old_rows = model.get_input_embeddings().weight[:before].detach().clone()
    rng = np.random.default_rng(0)
    vectors = {f"m{i}": rng.normal(size=8).astype(np.float32) for i in range(5)}
    vectors["twin"] = 3 * vectors["m0"]  # same direction, another length

    new = add_item_tokens(model, tokenizer, vectors, seed=0)

    assert new == list(range(before, len(tokenizer)))
    for text in [ANSWER_TAG, "</think>", *(ref(item) for item in vectors)]:
        assert len(tokenizer(text, add_special_tokens=False)["input_ids"]) == 1, text
    rows = model.get_input_embeddings().weight.detach()
    assert rows.shape[0] == len(tokenizer)
    assert torch.equal(rows[:before], old_rows)  # the base's own rows are untouched
    row = {item: rows[tokenizer.convert_tokens_to_ids(ref(item))] for item in vectors}
    # Rotated into the hidden size: similarities between items are the index's.
    for a, b in [("m0", "m1"), ("m2", "m3"), ("m0", "twin")]:
        index = (
            np.dot(vectors[a], vectors[b]) / np.linalg.norm(vectors[a]) / np.linalg.norm(vectors[b])
        )
        assert float(torch.cosine_similarity(row[a], row[b], dim=0)) == pytest.approx(
            index, abs=1e-5
        )


def test_grpo_trains_a_tied_base_given_item_tokens(
    toy_examples: list[Example], toy_catalog: dict[str, ItemView], tmp_path: Path
) -> None:
    """SmolLM2 ties its embeddings: TRL's GRPO read the output head past peft's trainable rows
    and failed ('TrainableTokensWrapper' has no 'bias'). Merged first, new adapters train."""
    tokenizer = tiny_tokenizer()
    model = tiny_model(len(tokenizer), tied=True)
    vectors = {item: np.ones(4, dtype=np.float32) * (i + 1) for i, item in enumerate(toy_catalog)}
    config = lora_config(4)
    config.trainable_token_indices = add_item_tokens(model, tokenizer, vectors, seed=0)
    adapted = get_peft_model(model, config)
    settings = GrpoSettings(
        max_steps=1, prompts_per_step=2, num_generations=2, lora_rank=4, progress=False
    )
    with one_thread():
        trained = run_grpo(
            for_grpo(adapted), tokenizer, toy_examples[:2], [(Format(), 1.0)], settings, tmp_path
        )
    assert isinstance(trained, PeftModel)
    merged = servable(trained, item_tokens=True)
    assert merged.get_input_embeddings().weight.shape[0] == len(tokenizer)
