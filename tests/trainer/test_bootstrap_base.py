"""`reasonrec bootstrap --base VERSION`: LoRA SFT then LoRA GRPO on a pretrained-shaped model
(a tiny Llama with a byte-level tokenizer and a chat template, imported from GGUF), published as
a LoRA version of it (real Redis; the whole recipe runs, on the tiny preset's budget)."""

import asyncio
from pathlib import Path

import pytest
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from cli import app
from contract.tasks import Task
from server.config import Settings
from server.loaders.synthetic import generate
from server.loaders.writer import progress_bar, write
from server.registry import Registry, RegistryError
from server.store import open_store
from server.vocabulary import ItemTokens
from tests.trainer.evaluation.test_formats import plain
from tests.trainer.gguf_files import tiny_pretrained
from trainer.bootstrap import bootstrap
from trainer.gguf_import import import_gguf
from trainer.presets import PRESETS
from trainer.refresh import load_version

# Events of which about a third are positive (a rating below 4 is not): 16 a user leave enough
# users with 3+ positive events to cut examples from.
SYNTHETIC = {"users": 12, "items": 30, "events_per_user": 16, "seed": 5}


async def bootstrap_on(
    settings: Settings, base: str, tasks=frozenset({Task.rank}), preset="tiny", **options
):
    async with open_store(settings) as store:
        with progress_bar() as progress:
            await write(store, generate(**SYNTHETIC), progress)
        return await bootstrap(
            settings, store, preset, force=True, tasks=tasks, base=base, **options
        )


@pytest.fixture
def base(settings: Settings, tmp_path: Path) -> str:
    tiny = tiny_pretrained(tmp_path)
    return import_gguf(Registry(settings.registry_path), tiny.gguf_path).version


def test_lora_adapters_train_on_the_base_and_publish_as_a_version_of_it(
    settings: Settings, base: str
) -> None:
    settings = settings.model_copy(update={"candidates": 8, "prompt_history": 4})
    result = asyncio.run(bootstrap_on(settings, base, keep_stages=frozenset({Task.rank})))

    registry = Registry(settings.registry_path)
    manifest = registry.manifest(result.version)
    assert (manifest.kind, manifest.base_model) == ("lora", base)
    assert manifest.rendering == "rich" and manifest.chat_template
    assert manifest.training["method"] == f"lora-sft+grpo on {base}"
    assert manifest.training["lora_rank"] == 16
    assert result.activated  # forced: the serving side is tested with the real engine elsewhere
    assert 0.0 <= result.metrics["ndcg@10"] <= 1.0 and "invalid_rate" in result.metrics
    # Adapters only: the version folder holds no full weights, and they load on the base.
    assert not list(result.path.glob("model*.safetensors"))
    assert isinstance(load_version(registry, manifest), PeftModel)
    # The SFT stage, kept for `reasonrec eval`: a LoRA version of the same base, never active.
    stage = registry.manifest(result.stages["rank_sft"])
    assert (stage.kind, stage.base_model, stage.training["stage"]) == ("lora", base, "rank sft")
    assert isinstance(load_version(registry, stage), PeftModel)


def test_items_as_new_tokens_are_merged_into_a_full_version(
    settings: Settings, base: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    items = PRESETS["tiny"].model_copy(update={"item_tokens": True})
    monkeypatch.setitem(PRESETS, "tiny-items", items)
    settings = settings.model_copy(update={"candidates": 8, "prompt_history": 4})
    result = asyncio.run(bootstrap_on(settings, base, preset="tiny-items"))

    manifest = Registry(settings.registry_path).manifest(result.version)
    assert (manifest.kind, manifest.base_model, manifest.training["base"]) == ("full", None, base)
    assert manifest.training["method"].endswith("items as new tokens")
    # Validation sampled under the token-space grammar: k distinct candidates, nothing repaired.
    assert result.metrics["invalid_rate"] == 0.0
    # The gateway finds the item tokens (and so serves with first-pick scores and token masks).
    assert ItemTokens.load(result.path) is not None
    tokenizer = AutoTokenizer.from_pretrained(result.path)
    model = AutoModelForCausalLM.from_pretrained(result.path)
    assert model.get_input_embeddings().weight.shape[0] == len(tokenizer)
    assert len(tokenizer("#i00001", add_special_tokens=False)["input_ids"]) == 1


def test_a_base_it_cannot_train_from_is_refused_before_training(
    settings: Settings, base: str
) -> None:
    with pytest.raises(RegistryError, match="learns ranking only"):
        asyncio.run(bootstrap_on(settings, base, frozenset({Task.rank, Task.rate})))
    with pytest.raises(RegistryError, match="not in the registry"):
        asyncio.run(bootstrap_on(settings, "v-missing"))


def test_the_command_names_the_problem_with_a_base(env: Settings) -> None:
    result = CliRunner().invoke(app, ["bootstrap", "--base", "v-missing"])
    assert result.exit_code == 2
    assert "not in the registry" in result.output


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (["--recipe", "zero"], "how rating is learnt: give it with --task rate"),
        (["--preset", "pretrained"], "trains adapters on a pretrained model: give --base"),
    ],
)
def test_options_that_would_be_ignored_are_refused(
    env: Settings, args: list[str], error: str
) -> None:
    """They were accepted and ignored: an embedded model trained for ranking alone, or on a
    preset sized for a 135M base."""
    result = CliRunner().invoke(app, ["bootstrap", *args])
    assert result.exit_code == 2
    assert error in plain(result.output)


def test_a_packaged_base_for_another_task_is_refused_before_it_is_imported(env: Settings) -> None:
    result = CliRunner().invoke(app, ["bootstrap", "--base", "smollm2", "--task", "rate"])
    assert result.exit_code == 2
    assert "learns ranking only" in " ".join(result.output.split())
    assert Registry(env.registry_path).versions() == []  # minutes of importing, for nothing
