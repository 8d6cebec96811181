"""Device resolution shared by every daemon."""

from __future__ import annotations


def resolve_device(device: str) -> str:
    """`auto` -> cuda when a CUDA GPU is present, else cpu; other values pass through."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
