"""Methods tether adds to every vLLM worker (vLLM's `worker_extension_cls`), called via collective_rpc.

The engine is paused (requests and KV cache kept) while these run; see tether.actor.engine.
"""

from __future__ import annotations

import os
import time

import torch

# vLLM picks its AMX kernels (bf16 attention) whenever the CPU reports AMX tiles, but where the OS
# does not grant a process AMX tile state (seen in sandboxed VMs) they die with SIGILL. The engine
# sets this variable (EngineConfig.cpu_allow_amx=false); this module is imported in each worker
# before the model and its attention backend are built, so the vec kernels get chosen instead.
if os.environ.get("TETHER_CPU_DISABLE_AMX") == "1":
    torch.cpu._is_amx_tile_supported = lambda: False

import tether.actor.fp32_head  # noqa: F401  registers the fp32 head config inside the worker process
from tether.common.messages import TensorSpec
from tether.common.weight_group import WeightReceiver, join_weight_group


class TetherWorkerExtension:
    """Mixed into vLLM's Worker class: `self` is the worker (model_runner, rank, device, ...)."""

    def tether_receive_weights(self, host: str, port: int, group_key: str, first_rank: int, world_size: int,
                               specs: list[tuple[str, list[int], str]], bucket_bytes: int,
                               backend: str = "auto", timeout_s: float = 120.0) -> dict:
        """Join the epoch's weight group as rank first_rank + worker rank, receive and load every tensor.

        Loading goes through vLLM's in-place reload in checkpoint format: on CPU the linear weights are
        prepacked, so writing parameters directly would be ignored or fail; the reload path re-runs
        the per-layer post-processing. Returns timings for the pause report: join, receive (time in
        the broadcasts) and load (the rest of receive-and-load: vLLM's reload consuming the tensors).
        """
        start = time.perf_counter()
        tensor_specs = [TensorSpec(name=name, shape=tuple(shape), dtype=dtype) for name, shape, dtype in specs]
        device = self.device if getattr(self.device, "type", "cpu") == "cuda" else torch.device("cpu")
        rank = first_rank + self.rank
        receiver = self._tether_weight_receiver(host, port, group_key, rank, world_size, backend, device, timeout_s)
        joined = time.perf_counter()
        try:
            self.reload_weights(weights_iterator=receiver.receive(tensor_specs, bucket_bytes),
                                is_checkpoint_format=True)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        except BaseException:
            # A failed collective leaves the group unusable; the broker re-forms the epoch anyway.
            self._tether_drop_weight_group()
            raise
        done = time.perf_counter()
        return {
            "rank": rank,
            "join_s": joined - start,
            "receive_and_load_s": done - joined,
            "receive_s": receiver.stats.broadcast_s,
            "load_s": (done - joined) - receiver.stats.broadcast_s,
            "transfer_s": receiver.stats.seconds,
            "bytes": receiver.stats.bytes,
            "buckets": receiver.stats.buckets,
        }

    def _tether_weight_receiver(self, host, port, group_key, rank, world_size, backend, device, timeout_s):
        """The receiver of this epoch's group, formed on first use and kept while the epoch lasts.

        The learner keeps its group per epoch too (docs/wire-protocol.md). Forming a second group
        under the same rendezvous key would read the first one's stale addresses, so re-joining per
        update is not an option; the receiver keeps its bucket buffers for the epoch's later updates.
        """
        receiver = getattr(self, "_tether_receiver", None)
        if receiver is not None:
            group = receiver.group
            if (group.key, group.rank, group.world_size) == (group_key, rank, world_size):
                return receiver
        self._tether_drop_weight_group()
        group = join_weight_group(host, port, group_key, rank, world_size, backend=backend, device=device,
                                  timeout_s=timeout_s)
        self._tether_receiver = WeightReceiver(group)
        return self._tether_receiver

    def _tether_drop_weight_group(self) -> None:
        receiver = getattr(self, "_tether_receiver", None)
        self._tether_receiver = None
        if receiver is not None:
            receiver.group.abort()

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
        return float(params[name].double().sum()) if name in params else float("nan")
