"""Methods tether adds to every vLLM worker (vLLM's `worker_extension_cls`), called via collective_rpc.

Weight updates run in two calls: `tether_begin_update` while the engine generates, and
`tether_commit_update` while it is paused (requests and KV cache kept); see tether.actor.engine.
"""

from __future__ import annotations

import os

import torch

# vLLM picks its AMX kernels (bf16 attention) whenever the CPU reports AMX tiles, but where the OS
# does not grant a process AMX tile state (seen in sandboxed VMs) they die with SIGILL. The engine
# sets this variable (EngineConfig.cpu_allow_amx=false); this module is imported in each worker
# before the model and its attention backend are built, so the vec kernels get chosen instead.
if os.environ.get("TETHER_CPU_DISABLE_AMX") == "1":
    torch.cpu._is_amx_tile_supported = lambda: False

import tether.actor.fp32_head  # noqa: F401  registers the fp32 head config inside the worker process
from tether.actor.worker_updates import WorkerUpdates


class TetherWorkerExtension:
    """Mixed into vLLM's Worker class: `self` is the worker (model_runner, rank, device, ...)."""

    def tether_begin_update(self, update_id: str, notify_address: str, host: str, port: int, group_key: str,
                            first_rank: int, world_size: int, specs: list[tuple[str, list[int], str]],
                            bucket_bytes: int, backend: str = "auto", timeout_s: float = 120.0) -> dict:
        """Start receiving an update as rank first_rank + worker rank, on a background thread.

        Returns at once: the engine keeps generating while the bytes arrive (and, on CPU, while
        vLLM's reload processes them on a shadow of the model). The thread reports to
        `notify_address`; `tether_commit_update` then makes the update live while the engine is
        paused. See tether.actor.worker_updates.
        """
        return self._tether_updates().begin(update_id, notify_address, host, port, group_key,
                                            first_rank + self.rank, world_size, specs, bucket_bytes, backend,
                                            timeout_s)

    def tether_commit_update(self, update_id: str) -> dict:
        """Make a received update live (the engine is paused); its timings for the pause report."""
        return self._tether_updates().commit(update_id)

    def _tether_updates(self) -> WorkerUpdates:
        updates = getattr(self, "_tether_worker_updates", None)
        if updates is None:
            updates = self._tether_worker_updates = WorkerUpdates(self)
        return updates

    def tether_head_info(self) -> dict:
        """The lm_head as the worker actually holds it (dtype, shape, method): proof for the engine report."""
        model = self.model_runner.get_model()
        head = model.lm_head
        return {
            "weight_dtype": str(head.weight.dtype).removeprefix("torch."),
            "weight_shape": list(head.weight.shape),
            "method": type(head.quant_method).__name__,
            "cpu_amx_kernels": bool(torch.cpu._is_amx_tile_supported()) if self.device.type == "cpu" else None,
        }

    def tether_param_checksum(self, name: str) -> float:
        """Sum of one parameter in fp64 (tests use it to see that an update landed)."""
        params = dict(self.model_runner.get_model().named_parameters())
        return float(params[name].detach().double().sum()) if name in params else float("nan")
