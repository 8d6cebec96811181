"""Staged reloads: vLLM's in-place reload run on a shadow of the live model, then swapped in.

On CPU, loading an update is mostly post-processing: vLLM prepacks every linear weight for oneDNN
(a new handler per layer, about two thirds of the reload of a 100M model here), and its layerwise
reload replaces the live layers' tensors while it runs, so it cannot overlap generation. A
`ShadowModel` is a second module tree over the same layer classes, with its own parameter and
buffer dicts and its own copies of the kernel tensors. vLLM's reload (initialize/load/finalize, the
real weight loaders and process_weights_after_loading) runs on it while the live model keeps
generating; `commit()` then makes the result live with pointer swaps: each processed tensor's data
is exchanged with the live tensor's, and each attribute the processing set (the oneDNN handler
behind `cpu_linear`, for instance) is copied over. Only `commit()` runs while the engine is paused.

Memory: the kernel tensors are copied once (small on CPU, where prepacked linear layers keep an
empty weight and the data lives in the handler), and a staged update holds a second set of
handlers until it is committed. On CUDA the kernel tensors are the full weights, so tether does
not stage there (tether.actor.worker_updates reloads in the pause instead).
"""

from __future__ import annotations

import copy
import time

import torch
from torch import nn

_MODULE_STATE = ("_parameters", "_buffers", "_modules", "_non_persistent_buffers_set")
"""nn.Module internals the shadow owns separately; every other attribute starts shared."""


class ShadowModel:
    """A shadow of `model` that vLLM's reload can process without touching the live layers."""

    def __init__(self, model: nn.Module, vllm_config):
        from vllm.model_executor.model_loader.reload.layerwise import get_layerwise_info
        from vllm.model_executor.model_loader.reload.meta import to_meta_tensor

        self.live = model
        self.vllm_config = vllm_config
        self._get_info = get_layerwise_info
        self._to_meta = to_meta_tensor
        self._tensors: dict[int, torch.Tensor] = {}
        self._modules: dict[int, nn.Module] = {}
        self.pairs: list[tuple[nn.Module, nn.Module]] = []
        self.root = self._clone(model)
        self._changes: list[tuple[dict, list[str]]] = []
        """Per pair, after `stage`: attributes the reload set or replaced, and those it removed."""

    def _clone(self, module: nn.Module) -> nn.Module:
        if id(module) in self._modules:  # a module reachable twice (tied weights) stays one module
            return self._modules[id(module)]
        shadow = copy.copy(module)
        self._modules[id(module)] = shadow
        shadow._parameters = {n: self._clone_tensor(p) for n, p in module._parameters.items()}
        shadow._buffers = {n: self._clone_tensor(b) for n, b in module._buffers.items()}
        shadow._non_persistent_buffers_set = set(module._non_persistent_buffers_set)
        shadow._modules = {n: None if c is None else self._clone(c) for n, c in module._modules.items()}
        # The model-format metadata vLLM recorded at load time, as the shadow's own meta tensors:
        # the reload rebinds their weight loaders to the layer it restores, which must not be the
        # live one.
        live_info, info = self._get_info(module), self._get_info(shadow)
        params, buffers = live_info.restore_metadata
        info.restore_metadata = ({n: self._to_meta(t) for n, t in params.items()},
                                 {n: self._to_meta(t) for n, t in buffers.items()})
        info.restore_device = live_info.restore_device
        self.pairs.append((module, shadow))
        return shadow

    def _clone_tensor(self, tensor: torch.Tensor | None) -> torch.Tensor | None:
        """A copy of a kernel tensor with its class and attributes (as vLLM materialises them)."""
        if tensor is None:
            return None
        if id(tensor) not in self._tensors:
            clone = tensor.data.clone()
            clone.__class__ = tensor.__class__
            clone.__dict__ = tensor.__dict__.copy()
            self._tensors[id(tensor)] = clone
        return self._tensors[id(tensor)]

    @torch.no_grad()
    def stage(self, weights) -> float:
        """Run vLLM's in-place reload of `weights` ((name, tensor) pairs in checkpoint format) on
        the shadow. Safe while the live model generates: nothing of the live model is written."""
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload.inplace import reload_weights

        start = time.perf_counter()
        self._changes = []
        before = []
        for live, shadow in self.pairs:
            # Start from the live layers' current attributes, so that the commit carries exactly what
            # this reload's processing changed and never reverts something the engine set since.
            shadow.__dict__.update((k, v) for k, v in vars(live).items() if k not in _MODULE_STATE)
            before.append(dict(vars(shadow)))
        with set_current_vllm_config(self.vllm_config):
            reload_weights(self.vllm_config, self.root, weights_iterator=weights, weights_path=None,
                           is_checkpoint_format=True)
        for (_, shadow), old in zip(self.pairs, before, strict=True):
            now = vars(shadow)
            changed = {k: v for k, v in now.items() if k not in _MODULE_STATE and old.get(k, _MISSING) is not v}
            removed = [k for k in old if k not in now and k not in _MODULE_STATE]
            self._changes.append((changed, removed))
        return time.perf_counter() - start

    def close(self) -> None:
        """Forget the shadow (after a failed stage, which leaves it half-restored)."""
        from vllm.model_executor.model_loader.reload.layerwise import LAYERWISE_INFO

        for _, shadow in self.pairs:
            # The reload binds weight loaders in the shadow's metadata to its layers, so the
            # WeakKeyDictionary alone would keep them alive.
            LAYERWISE_INFO.pop(shadow, None)
        self.pairs, self._changes, self.root = [], [], None

    @property
    def staged(self) -> bool:
        return bool(self._changes)

    @torch.no_grad()
    def commit(self) -> float:
        """Make the staged weights live: swap tensor data, apply the attributes processing changed.

        Pointer work only (no tensor data is copied). Call it while no forward runs (the engine is
        paused). Afterwards the shadow holds the previous weights' data, overwritten by the next stage.
        """
        if not self.staged:
            raise RuntimeError("no staged weights to commit")
        start = time.perf_counter()
        swapped: set[int] = set()
        for (live, shadow), (changed, removed) in zip(self.pairs, self._changes, strict=True):
            for kind in ("_parameters", "_buffers"):
                live_tensors = getattr(live, kind)
                for name, staged in getattr(shadow, kind).items():
                    target = live_tensors.get(name)
                    if staged is None or target is None or id(target) in swapped:
                        continue
                    if target.shape != staged.shape or target.dtype != staged.dtype:
                        raise RuntimeError(f"staged {name} of {type(live).__name__} does not match the live tensor")
                    target.data, staged.data = staged.data, target.data
                    swapped.add(id(target))
            for key, value in changed.items():
                setattr(live, key, value)
            for key in removed:
                live.__dict__.pop(key, None)
        self._changes = []
        return time.perf_counter() - start


_MISSING = object()
