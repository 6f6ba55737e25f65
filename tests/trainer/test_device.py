"""Training runs on CUDA (bf16 where supported) when torch sees a GPU, on the CPU otherwise, and
GRPO's accelerate settings follow the model's device (nothing says `use_cpu=True` regardless)."""

from pathlib import Path

import pytest
import torch

from trainer.device import accelerated_bf16, select_device
from trainer.grpo import grpo_config
from trainer.presets import GrpoSettings
from trainer.sft import use_bf16


@pytest.fixture
def gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)


@pytest.fixture
def no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.mark.usefixtures("gpu")
def test_with_a_gpu_auto_and_cuda_train_there_in_bf16_and_cpu_stays_on_the_cpu() -> None:
    assert select_device("auto") == torch.device("cuda") == select_device("cuda")
    assert select_device("cpu") == torch.device("cpu")
    assert accelerated_bf16(torch.device("cuda"))
    assert use_bf16(False, torch.device("cuda"))  # the presets' CPU choice does not apply


@pytest.mark.usefixtures("no_gpu")
def test_without_a_gpu_auto_is_the_cpu_and_cuda_is_an_error() -> None:
    assert select_device("auto") == torch.device("cpu")
    with pytest.raises(RuntimeError, match="sees no CUDA device"):
        select_device("cuda")
    assert not accelerated_bf16(torch.device("cpu"))
    assert use_bf16(False, torch.device("cpu")) is False
    assert use_bf16(True, torch.device("cpu")) is True


def test_grpo_on_the_cpu_says_so_and_stays_in_float32(tmp_path: Path) -> None:
    config = grpo_config(GrpoSettings(), [1.0], 32, tmp_path, torch.device("cpu"))
    assert config.use_cpu and not config.bf16
