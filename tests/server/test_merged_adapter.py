"""REASONREC_MERGE_ADAPTERS: a LoRA version runs on its adapter merged into the base's weights,
computing what the adapter on the base computes, written once and pruned."""

import os
import time
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from pydantic import ValidationError
from safetensors import SafetensorError, safe_open
from transformers import AutoModelForCausalLM, PreTrainedModel

from server import active_model
from server.active_model import placement, vllm_on_cpu
from server.config import Settings
from server.merged_adapter import KEEP
from server.registry import Manifest, Registry
from tests.trainer.gguf_files import tiny_model, tiny_tokenizer

INPUT = torch.tensor([[5, 17, 42, 9, 3]])


def publish_base(registry: Registry, version: str, dtype: torch.dtype = torch.float32) -> None:
    tokenizer = tiny_tokenizer()
    staging = registry.staging()
    tiny_model(len(tokenizer)).to(dtype).save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    registry.publish(staging, Manifest(version=version))


def publish_adapter(registry: Registry, version: str, base: str, seed: int) -> None:
    """An adapter whose weights are all random (peft starts B at zero: a no-op adapter)."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(registry.path(base))
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    staging = registry.staging()
    get_peft_model(model, config).save_pretrained(staging)
    registry.publish(staging, Manifest(version=version, kind="lora", base_model=base))


def adapter_on_base(settings: Settings, seed: int) -> Registry:
    """The registry of `settings` with a base "v1" and an adapter of it, "v2"."""
    registry = Registry(settings.registry_path)
    publish_base(registry, "v1")
    publish_adapter(registry, "v2", base="v1", seed=seed)
    return registry


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(INPUT).logits


def test_a_lora_version_runs_on_merged_weights_equal_to_the_adapter(settings: Settings) -> None:
    registry = adapter_on_base(settings, seed=1)
    merging = settings.model_copy(update={"merge_adapters": True, "refresh_lora_min_params": 0})

    where = placement(merging, "v2")

    assert where.base == "v2" and where.base_dir == settings.data_dir / "merged" / "v2"
    assert where.adapter is None and where.lora_room is None
    base = AutoModelForCausalLM.from_pretrained(registry.path("v1")).eval()
    adapted = PeftModel.from_pretrained(base, registry.path("v2")).eval()
    merged = AutoModelForCausalLM.from_pretrained(where.base_dir).eval()
    assert torch.allclose(logits(merged), logits(adapted), atol=1e-5)
    with adapted.disable_adapter():
        assert not torch.allclose(logits(merged), logits(adapted), atol=1e-3)
    assert (where.base_dir / "tokenizer_config.json").is_file()  # vLLM reads the folder alone
    # The full base reserves no adapter room either: nothing runs as a runtime adapter.
    assert placement(merging, "v1").lora_room is None
    # Without the setting: the adapter on its base, with room for refreshes.
    runtime = placement(settings.model_copy(update={"refresh_lora_min_params": 0}), "v2")
    assert (runtime.base, runtime.adapter, runtime.lora_room) == ("v1", registry.path("v2"), 16)


def stored_dtypes(folder: Path) -> set[torch.dtype]:
    with safe_open(folder / "model.safetensors", "pt") as weights:
        names = weights.keys()  # a safetensors file handle is not iterable
        return {weights.get_tensor(name).dtype for name in names}


def test_merged_weights_are_stored_in_the_engines_dtype(settings: Settings) -> None:
    """'auto' (vLLM's choice, the base's dtype): a bfloat16 base's copy stays its size; a float32
    engine (the CPU default) gets float32, all of the adapter's update kept."""
    registry = Registry(settings.registry_path)
    publish_base(registry, "v1", dtype=torch.bfloat16)
    publish_adapter(registry, "v2", base="v1", seed=1)
    publish_adapter(registry, "v3", base="v1", seed=2)
    merging = settings.model_copy(update={"merge_adapters": True, "engine_dtype": "auto"})

    where = placement(merging, "v2")
    on_float32 = placement(merging.model_copy(update={"engine_dtype": "float32"}), "v3")

    assert stored_dtypes(where.base_dir) == {torch.bfloat16}
    assert stored_dtypes(on_float32.base_dir) == {torch.float32}
    merged = AutoModelForCausalLM.from_pretrained(where.base_dir).eval()
    assert merged.dtype == torch.bfloat16
    base = AutoModelForCausalLM.from_pretrained(registry.path("v1"), dtype=torch.float32)
    adapted = PeftModel.from_pretrained(base, registry.path("v2")).eval()
    expected = logits(adapted)
    with adapted.disable_adapter():
        unadapted = logits(adapted)
    # bfloat16 keeps about 3 significant digits: the merged copy is nearer the adapter's output
    # than the base's, the adapter's update survives the rounding.
    error = (logits(merged).float() - expected).abs().mean()
    assert error < (unadapted - expected).abs().mean() / 4


def test_merged_weights_are_written_once_and_the_least_recently_used_pruned(
    settings: Settings,
) -> None:
    registry = Registry(settings.registry_path)
    publish_base(registry, "v1")
    versions = [f"v{n}" for n in range(2, 3 + KEEP)]
    for seed, version in enumerate(versions):
        publish_adapter(registry, version, base="v1", seed=seed)
    merging = settings.model_copy(update={"merge_adapters": True})

    merged = settings.data_dir / "merged"
    for name, age in [(".staging-killed", 2 * 3600), (".staging-merging", 60)]:
        (merged / name).mkdir(parents=True)  # a merge killed half-way, and one under way
        os.utime(merged / name, (time.time() - age, time.time() - age))

    first = placement(merging, versions[0]).base_dir
    written = (first / "model.safetensors").stat().st_mtime_ns
    for version in versions[1:-1]:
        placement(merging, version)
    assert placement(merging, versions[0]).base_dir == first  # served again: reused, not rewritten
    assert (first / "model.safetensors").stat().st_mtime_ns == written
    placement(merging, versions[-1])

    kept = sorted(path.name for path in merged.iterdir())
    assert kept == sorted([".staging-merging", versions[0], *versions[-KEEP + 1 :]])


def test_auto_merges_where_vllm_runs_on_the_cpu(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    registry = adapter_on_base(settings, seed=1)
    auto = settings.model_copy(update={"merge_adapters": "auto", "refresh_lora_min_params": 0})
    assert vllm_on_cpu()  # the installed vLLM is the CPU build

    assert placement(auto, "v2").base_dir == settings.data_dir / "merged" / "v2"
    monkeypatch.setattr(active_model, "vllm_on_cpu", lambda: False)  # as on a GPU
    on_gpu = placement(auto, "v2")
    assert (on_gpu.base, on_gpu.adapter, on_gpu.lora_room) == ("v1", registry.path("v2"), 16)


def test_auto_serves_the_adapter_at_runtime_where_it_cannot_write(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """A read-only data directory (a vLLM pod mounting the registry read-only) keeps serving, and
    an engine started on the base keeps room to swap the adapters in."""
    registry = adapter_on_base(settings, seed=1)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    (settings.data_dir / "merged").write_text("not a folder")  # where merged weights would go
    auto = settings.model_copy(update={"merge_adapters": "auto", "refresh_lora_min_params": 0})

    where = placement(auto, "v2")

    assert (where.base, where.adapter, where.lora_room) == ("v1", registry.path("v2"), 16)
    assert placement(auto, "v1").lora_room == 16
    assert "merged weights cannot be written" in caplog.text
    with pytest.raises(OSError):  # asked for explicitly: an error, not a slow adapter
        placement(auto.model_copy(update={"merge_adapters": True}), "v2")


@pytest.mark.parametrize(("value", "parsed"), [("auto", "auto"), ("true", True), ("0", False)])
def test_the_setting_reads_auto_or_a_boolean(
    monkeypatch: pytest.MonkeyPatch, value: str, parsed: object
) -> None:
    monkeypatch.setenv("REASONREC_MERGE_ADAPTERS", value)
    assert Settings().merge_adapters == parsed


def test_a_bad_merge_setting_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REASONREC_MERGE_ADAPTERS", "sometimes")
    with pytest.raises(ValidationError, match="merge_adapters"):
        Settings()


def test_merged_weights_are_on_disk_before_they_are_named(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A folder found under its version's name is reused for good: one a power cut left with
    truncated files would never open again."""
    adapter_on_base(settings, seed=0)
    flushed: list[str] = []
    flush = os.fsync
    monkeypatch.setattr(
        os, "fsync", lambda fd: flushed.append(os.readlink(f"/proc/self/fd/{fd}")) or flush(fd)
    )

    target = placement(settings.model_copy(update={"merge_adapters": True}), "v2").base_dir

    staging = Path(flushed[-2])
    assert staging.parent == target.parent and staging.name.startswith(".staging-")
    assert {str(staging / "model.safetensors"), str(staging / "config.json")} <= set(flushed)
    assert flushed[-1] == str(target.parent) and (target / "model.safetensors").is_file()


def test_a_merge_stopped_by_a_full_disk_leaves_nothing_and_says_where(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    adapter_on_base(settings, seed=0)

    def full_disk(*_: object, **__: object) -> None:
        raise SafetensorError("I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", full_disk)
    merging = settings.model_copy(update={"merge_adapters": True})
    with pytest.raises(OSError, match=r"weights not written to .*\.staging-.*No space left"):
        placement(merging, "v2")
    assert not any(active_model.merged_folder(merging).iterdir())
