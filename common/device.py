"""Which device and which body dtype a daemon computes on: one rule for the actor and the learner.

`run.device` and `model.dtype` may say `auto`; both sides must resolve them the same way, or the
actor and the learner would compute in different dtypes. torch is imported only when needed (the
broker loads the same config and never computes).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def resolve_device(device: str) -> str:
    """run.device -> "cuda" or "cpu" (or the name given): auto is cuda when a CUDA GPU is present."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(dtype: str, device: str) -> str:
    """model.dtype -> a dtype name for a resolved `device`: auto is bfloat16 on CUDA, float32 on CPU."""
    if dtype != "auto":
        return dtype
    return "bfloat16" if device == "cuda" else "float32"


def torch_device(device: str) -> torch.device:
    """resolve_device as a torch.device; cuda is this process's current CUDA device (torchrun ranks set it)."""
    import torch

    resolved = resolve_device(device)
    if resolved == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(resolved)


def torch_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """resolve_dtype as a torch.dtype for a torch.device."""
    import torch

    return getattr(torch, resolve_dtype(dtype, device.type))
