"""Where training runs: the accelerator when one is visible (CUDA, bf16 where it computes in
bf16), the CPU otherwise. The model is placed once, where it is built or loaded; every training
and validation step then follows `model.device`."""

from typing import Literal

import torch

TrainDevice = Literal["auto", "cpu", "cuda"]


class DeviceError(RuntimeError):
    """The training device asked for is not there."""


def select_device(choice: TrainDevice = "auto") -> torch.device:
    """`auto`: CUDA when a device is visible, else the CPU. Raises DeviceError for `cuda`
    without one, rather than training for hours on the CPU of a GPU node by mistake."""
    if choice == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    if choice == "cuda":
        raise DeviceError("REASONREC_TRAIN_DEVICE=cuda, but torch sees no CUDA device")
    return torch.device("cpu")


def accelerated_bf16(device: torch.device) -> bool:
    """bf16 mixed precision on an accelerator that supports it (the CPU's choice is the
    presets' `bf16` setting: measured slower or noisier for the small models here)."""
    return device.type == "cuda" and torch.cuda.is_bf16_supported()
