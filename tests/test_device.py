"""common/device.py and common/net.py: the one home of device/dtype resolution and free ports."""

from __future__ import annotations

import socket

import pytest
import torch

from tether.common.device import resolve_device, resolve_dtype, torch_device, torch_dtype
from tether.common.net import free_port


def test_auto_device_follows_cuda_availability_and_explicit_choices_win(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == "cpu" and torch_device("auto") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == "cuda"
    assert resolve_device("cpu") == "cpu" and torch_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize(("dtype", "device", "expected"), [
    ("auto", "cuda", "bfloat16"), ("auto", "cpu", "float32"), ("float16", "cpu", "float16"), ("float32", "cuda", "float32"),
])
def test_actor_and_learner_resolve_the_body_dtype_the_same_way(dtype, device, expected):
    """The actor passes a dtype name to vLLM, the learner a torch.dtype to its model: both from one rule."""
    from tether.actor.engine_args import engine_kwargs
    from tether.common.config import EngineConfig, ModelConfig

    assert resolve_dtype(dtype, device) == expected
    actor = engine_kwargs(EngineConfig(), ModelConfig(dtype=dtype), "model-dir", device=device)["dtype"]
    learner = torch_dtype(dtype, torch.device(device))
    assert actor == expected and learner is getattr(torch, expected)


def test_free_port_can_be_bound():
    port = free_port()
    assert 0 < port < 65536
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))
