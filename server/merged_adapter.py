"""A LoRA version merged into its base's weights, for engines that run adapters slowly.

vLLM's CPU backend applies a runtime adapter token by token in PyTorch, several times slower than
the base alone (REASONREC_MERGE_ADAPTERS). Merged, the version is an ordinary model folder: one
per version under `<data dir>/merged`, written once, atomically, and reused.
"""

import logging
import os
import shutil
import time
import uuid
from pathlib import Path

from server.durable import fsync, fsync_tree, weights_written

log = logging.getLogger(__name__)
KEEP = 2  # the serving version's folder and the one a swap replaces it with
STALE_STAGING_SECONDS = 3600.0  # a merge takes minutes; an older staging folder was abandoned


def merged_weights(root: Path, version: str, base_dir: Path, adapter_dir: Path, dtype: str) -> Path:
    """The folder holding `version` (the adapter in `adapter_dir` on the weights in `base_dir`)
    merged, written if missing in `dtype` (the engine's, REASONREC_ENGINE_DTYPE; 'auto': the
    base's); all but the KEEP most recently used merged folders are removed."""
    target = root / version
    if target.is_dir():
        os.utime(target)  # in use again: newest for `_prune`
        return target
    root.mkdir(parents=True, exist_ok=True)
    staging = root / f".staging-{uuid.uuid4().hex}"
    try:
        _merge(base_dir, adapter_dir, staging, dtype)
        # On disk before it is named: a folder found under its name is reused for good, and one
        # a power cut left with truncated files would never open again.
        fsync_tree(staging)
        staging.rename(target)
        fsync(root)
    except OSError:
        if not target.is_dir():  # not a process beside this one that merged it first
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("adapter merged for serving", extra={"model_version": version, "path": str(target)})
    _prune(root, keep=target)
    return target


def _merge(base_dir: Path, adapter_dir: Path, out: Path, dtype: str) -> None:
    """Saved in the dtype the engine runs: float32 keeps all of the adapter's update (vLLM's CPU
    default), and a bfloat16 engine's copy takes the bfloat16 base's size, not twice it."""
    import torch
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if dtype == "auto":
        stored = AutoConfig.from_pretrained(base_dir).dtype or torch.float32
    else:
        stored = getattr(torch, dtype)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    with weights_written(out):  # a file that cannot be read says so itself
        merged.to(stored).save_pretrained(out)
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(out)


def _prune(root: Path, keep: Path) -> None:
    """Remove all but the KEEP most recently used merged folders (`keep` among them), and the
    staging folders of merges killed half-way (for memory, say: gigabytes each, for good); an
    engine that still runs on a removed one has its weights in memory already, and a restart on
    it merges it again."""
    now = time.time()
    for path in root.glob(".staging-*"):
        if now - path.stat().st_mtime > STALE_STAGING_SECONDS:
            shutil.rmtree(path, ignore_errors=True)
    folders = sorted(
        (path for path in root.iterdir() if path.is_dir() and not path.name.startswith(".")),
        key=lambda path: path.stat().st_mtime,
        reverse=True,
    )
    for path in folders[KEEP:]:
        if path != keep:
            shutil.rmtree(path, ignore_errors=True)
