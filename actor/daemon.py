"""The actor daemon: engine + weight updates + rollout pump, wired to the broker.

    ActorDaemon(config, model_path, client, task).run()

- the engine starts with the parity settings and writes <run_dir>/engine_report-<actor_id>.json,
- the client says hello with the loaded version, then heartbeats in its own thread,
- `_weights_loop` takes WeightsAnnounce messages, runs the in-flight update and acks the version
  (VersionAck ok=False with the error on failure; the daemon then stops, since its weights may be mixed),
- `RolloutPump` keeps max_groups_in_flight groups generating and sends each finished group
  (the client keeps rollouts until acked; generation waits while too many are unacked).
- weights.mode=stop_the_world: a `StopTheWorldGate` lets the pump start a group only while the
  loaded version has room in the broker's per-version quota; the actor idles until the next
  WeightsAnnounce is loaded. The in-flight mode has no gate.
"""

from __future__ import annotations

import asyncio
import os
import socket

from tether.actor.engine import ActorEngine, WeightUpdateError
from tether.actor.rollouts import GroupGenerator, RolloutPump, StopTheWorldGate
from tether.common.config.run import RunConfig
from tether.common.logging import get_logger

log = get_logger(__name__)


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def default_actor_id() -> str:
    return f"actor-{socket.gethostname()}-{os.getpid()}"


class ActorDaemon:
    """One actor: owns the engine, answers weight announcements, streams rollouts to the sink."""

    def __init__(self, config: RunConfig, model_path: str, client, task, initial_version: int = 0):
        self.config = config
        self.model_path = model_path
        self.client = client
        self.task = task
        self.initial_version = initial_version
        self.actor_id = config.actor.actor_id or default_actor_id()
        self.engine: ActorEngine | None = None
        self._stop = asyncio.Event()
        self.updates: list = []

    async def start_engine(self) -> ActorEngine:
        cfg = self.config
        backend = cfg.weights.backend
        self.engine = await ActorEngine.start(cfg.actor.engine, cfg.model, self.model_path,
                                              device=resolve_device(cfg.run.device), run_dir=cfg.run.dir,
                                              initial_version=self.initial_version, weight_backend=backend,
                                              weight_timeout_s=cfg.weights.timeout_s,
                                              report_name=f"engine_report-{self.actor_id}.json")
        return self.engine

    async def _weights_loop(self) -> None:
        while not self._stop.is_set():
            announce = await asyncio.to_thread(self.client.next_weights_announce, 0.5)
            if announce is None:
                continue
            try:
                result = await self.engine.update_weights(announce)
            except WeightUpdateError as exc:
                log.error("weight_update_failed", version=announce.version, error=str(exc))
                self.client.send_version_ack(announce.version, announce.epoch, ok=False, error=str(exc))
                self._stop.set()
                raise
            self.updates.append(result)
            self.client.send_version_ack(announce.version, announce.epoch, ok=True, pause_seconds=result.pause_s)

    async def run(self, max_groups: int | None = None) -> None:
        """Run until `max_groups` groups are sent (None: forever) or a weight update fails."""
        from transformers import AutoTokenizer

        if self.engine is None:
            await self.start_engine()
        self.client.hello(loaded_version=self.engine.version)
        tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        generator = GroupGenerator(self.engine, self.task, tokenizer, self.config.actor.sampling, self.actor_id,
                                   seed=self.config.run.seed)
        pump = RolloutPump(generator, self.client, self.config.actor.max_groups_in_flight, gate=self.build_gate())
        weights = asyncio.ensure_future(self._weights_loop())
        try:
            rollouts = asyncio.ensure_future(pump.run(self.task.train_prompts(self.config.task.seed), max_groups))
            done, _ = await asyncio.wait({rollouts, weights}, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()  # re-raise a failure
            await asyncio.to_thread(self.client.flush, 30.0)
        finally:
            self._stop.set()
            for task in (weights,):
                task.cancel()
            await asyncio.gather(weights, return_exceptions=True)
        log.info("actor_done", groups=pump.groups_done, rollouts=pump.rollouts_sent, updates=len(self.updates))

    def build_gate(self) -> StopTheWorldGate | None:
        """The stop-the-world gate for weights.mode=stop_the_world, else None (in-flight: no gate)."""
        if self.config.weights.mode != "stop_the_world":
            return None
        return StopTheWorldGate(
            version=lambda: self.engine.version,
            quota=lambda: getattr(self.client, "quota", None),
            unacked=lambda: self.client.unacked_count,
            rollouts_per_step=self.config.learner.rollouts_per_step,
            group_size=self.config.actor.sampling.group_size,
        )

    def shutdown(self) -> None:
        if self.engine is not None:
            self.engine.shutdown()
