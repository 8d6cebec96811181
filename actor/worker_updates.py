"""The worker's side of an in-flight weight update: the bytes move while the engine generates.

`WorkerUpdates.begin()` returns at once and runs the update's slow part on a background thread of
the vLLM worker process, while the worker's main thread keeps executing model steps:

0. move itself to the CPUs the model's steps do not use (vLLM pins each CPU worker to its cores),
1. join the epoch's weight group (once per group key; the group and its bucket buffers are kept
   for the epoch, as the learner keeps its side),
2. receive every bucket into the buffers (`WeightReceiver.receive_all`),
3. on CPU, stage the update: vLLM's reload runs on a shadow of the model
   (tether.actor.staging.ShadowModel), which is where the oneDNN prepacking happens.

The thread then reports to the engine client over a zmq PUSH socket (no polling of the engine).
Only `commit()` runs while the engine is paused: on CPU it swaps the staged tensors and handlers in
(pointer work); on CUDA, where a shadow would double the weights' memory, it runs vLLM's reload
from the received buffers (device copies). Nothing of the live model is written before `commit()`,
so a failed transfer or stage leaves the loaded weights whole.

On CUDA the thread receives on its own stream: NCCL's broadcast then waits on that stream only,
not on the model's kernels queued on the default stream, and the thread synchronises it before it
reports, so the buffers are complete before the main thread reads them.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time

import torch

from tether.actor.staging import ShadowModel
from tether.common.messages import TensorSpec
from tether.common.weight_group import WeightReceiver, join_weight_group


def _move_off_the_model_cpus() -> None:
    """Run the calling thread (and the threads it starts, gloo's among them) on the CPUs the engine
    process may use but this worker's model steps do not.

    vLLM's CPU backend binds each worker, every thread included, to its own cores and leaves the
    rest (VLLM_CPU_NUM_OF_RESERVED_CPU; one of the two here) to the engine core and the frontend.
    Receiving and prepacking on the model's cores would slow every step while they run; on the
    reserved cores the steps keep their pace. Where the worker has every CPU of its parent (no
    binding, e.g. on CUDA), nothing changes.
    """
    try:
        own = os.sched_getaffinity(0)
        spare = os.sched_getaffinity(os.getppid()) - own
        if spare:
            os.sched_setaffinity(0, spare)  # 0: the calling thread
    except OSError:  # affinity unsupported, or the parent is gone: keep the worker's CPUs
        pass


class WorkerUpdates:
    """Per vLLM worker: the epoch's receiver, the CPU shadow model, and the update in progress."""

    def __init__(self, worker):
        self.worker = worker
        self.receiver: WeightReceiver | None = None
        self.shadow: ShadowModel | None = None
        self.thread: threading.Thread | None = None
        self.report: dict | None = None
        """The last background phase's outcome (also sent to the engine client)."""
        self._push = None
        self._push_address = ""
        self._stream = None

    @property
    def device(self) -> torch.device:
        device = getattr(self.worker, "device", None)
        return device if getattr(device, "type", "cpu") == "cuda" else torch.device("cpu")

    def begin(self, update_id: str, notify_address: str, host: str, port: int, group_key: str, rank: int,
              world_size: int, specs: list[tuple[str, list[int], str]], bucket_bytes: int, backend: str,
              timeout_s: float) -> dict:
        """Start receiving `update_id` on a background thread; its report goes to `notify_address`."""
        tensor_specs = [TensorSpec(name=name, shape=tuple(shape), dtype=dtype) for name, shape, dtype in specs]
        group = (host, port, group_key, rank, world_size, backend, timeout_s)
        previous, self.report = self.thread, None
        self.thread = threading.Thread(
            target=self._run, args=(previous, update_id, notify_address, group, tensor_specs, bucket_bytes),
            name=f"tether-weights-{rank}", daemon=True)
        self.thread.start()
        return {"rank": rank, "staged": self.device.type == "cpu"}

    def _run(self, previous, update_id, notify_address, group, specs, bucket_bytes) -> None:
        report = {"update_id": update_id, "rank": group[3], "ok": False, "error": "", "wait_s": 0.0, "join_s": 0.0,
                  "receive_s": 0.0, "transfer_s": 0.0, "stage_s": 0.0, "bytes": 0, "buckets": 0}
        start = time.perf_counter()
        try:
            _move_off_the_model_cpus()
            if previous is not None:
                # A previous update that timed out on the client may still be in a broadcast; it ends
                # within its own timeout, and the two must not share the group or the buffers.
                previous.join()
            joined_at = time.perf_counter()
            report["wait_s"] = joined_at - start
            try:
                with self._stream_context():
                    receiver = self._receiver(*group)
                    report["join_s"] = time.perf_counter() - joined_at
                    stats = receiver.receive_all(specs, bucket_bytes)
            except BaseException:
                self.drop_group()  # a failed collective leaves the group unusable; the broker re-forms the epoch
                raise
            report.update(receive_s=stats.broadcast_s, transfer_s=stats.seconds, bytes=stats.bytes,
                          buckets=stats.buckets)
            if self.device.type == "cpu":
                report["stage_s"] = self._stage(receiver)
            report["ok"] = True
        except BaseException as exc:  # reported to the client, which fails the update
            report["error"] = f"{type(exc).__name__}: {exc}"[:2000]
        self.report = report
        self._notify(notify_address, report)

    def _stage(self, receiver: WeightReceiver) -> float:
        if self.shadow is None:
            runner = self.worker.model_runner
            self.shadow = ShadowModel(runner.get_model(), runner.vllm_config)
        try:
            return self.shadow.stage(receiver.tensors())
        except BaseException:
            self.shadow.close()  # a failed reload leaves the shadow half-restored: build a new one
            self.shadow = None
            raise

    def commit(self, update_id: str) -> dict:
        """Make `update_id` live (engine paused). Raises if its background phase did not succeed."""
        report = self.report
        if self.thread is not None and self.thread.is_alive():
            raise RuntimeError(f"weight update {update_id} is still being received")
        if report is None or report["update_id"] != update_id:
            raise RuntimeError(f"weight update {update_id} was not received")
        if not report["ok"]:
            raise RuntimeError(f"weight update {update_id} failed: {report['error']}")
        start = time.perf_counter()
        if self.device.type == "cpu":
            self.shadow.commit()
        else:
            assert self.receiver is not None
            self.worker.reload_weights(weights_iterator=self.receiver.tensors(), is_checkpoint_format=True)
            torch.cuda.synchronize(self.device)  # the load is done when the timer reads
        self.report = None  # a commit happens once
        return {**report, "load_s": time.perf_counter() - start}

    def _receiver(self, host, port, group_key, rank, world_size, backend, timeout_s) -> WeightReceiver:
        """The receiver of this epoch's group, formed on first use and kept while the epoch lasts.

        Forming a second group under the same rendezvous key would read the first one's stale
        addresses, so re-joining per update is not an option; the receiver keeps its bucket buffers
        for the epoch's later updates.
        """
        receiver = self.receiver
        if receiver is not None:
            group = receiver.group
            if (group.key, group.rank, group.world_size) == (group_key, rank, world_size):
                return receiver
        self.drop_group()
        group = join_weight_group(host, port, group_key, rank, world_size, backend=backend, device=self.device,
                                  timeout_s=timeout_s)
        self.receiver = WeightReceiver(group)
        return self.receiver

    def drop_group(self) -> None:
        """Leave the epoch's group (after a failure, or when a new epoch forms)."""
        receiver, self.receiver = self.receiver, None
        if receiver is not None:
            receiver.group.abort()

    def _stream_context(self):
        if self.device.type != "cuda":
            return contextlib.nullcontext()
        torch.cuda.set_device(self.device)  # the current device is per thread; this one starts on device 0
        if self._stream is None:
            self._stream = torch.cuda.Stream(self.device)
        return torch.cuda.stream(self._stream)

    def _notify(self, address: str, report: dict) -> None:
        """Send `report` to the engine client; a client that is gone is not waited for."""
        import zmq

        if self._push is None or self._push_address != address:
            if self._push is not None:
                self._push.close(linger=0)
            self._push = zmq.Context.instance().socket(zmq.PUSH)
            self._push.setsockopt(zmq.LINGER, 1000)
            self._push.connect(address)
            self._push_address = address
        with contextlib.suppress(zmq.ZMQError):
            self._push.send(json.dumps(report).encode(), flags=zmq.NOBLOCK)
