"""The actor daemon: engine + weight updates + rollout pump, wired to the broker.

    ActorDaemon(config, model_path, link, task).run()

- the engine starts with the parity settings and writes <run_dir>/engine_report-<actor_id>.json,
- the link registers with the version the engine holds, then heartbeats in its own thread,
- `_weights_loop` takes WeightUpdate records (the newest when several queued up), runs the in-flight
  update and reports it. A failed update leaves generation paused (the weights may be mixed) and is
  reported; the broker sends the version again in a new epoch, and the actor registers again so an
  exclusion is lifted. After `actor.max_update_failures` failures in a row the actor exits (its
  supervisor restarts it with fresh weights from disk).
- `RolloutPump` starts each group with a generation grant from the broker and sends it when done
  (the link keeps rollouts until acked).
"""

from __future__ import annotations

import asyncio

from tether.actor.broker_link import ActorLink
from tether.actor.engine import ActorEngine, WeightUpdateError
from tether.actor.rollouts import GroupGenerator, RolloutPump, actor_seed
from tether.common.config.run import RunConfig
from tether.common.device import resolve_device
from tether.common.logging import get_logger
from tether.common.messages import WeightUpdate

log = get_logger(__name__)


class ActorDaemon:
    """One actor: owns the engine, serves weight updates, streams rollouts to the broker."""

    def __init__(self, config: RunConfig, model_path: str, link: ActorLink, task, initial_version: int = 0):
        self.config = config
        self.model_path = model_path
        self.link = link
        self.task = task
        self.initial_version = initial_version
        self.actor_id = link.actor_id
        self.engine: ActorEngine | None = None
        self.pump: RolloutPump | None = None
        self._stop = asyncio.Event()
        self.updates: list = []
        self.failed_updates = 0

    async def start_engine(self) -> ActorEngine:
        cfg = self.config
        self.engine = await ActorEngine.start(cfg.actor.engine, cfg.model, self.model_path,
                                              device=resolve_device(cfg.run.device), run_dir=cfg.run.dir,
                                              initial_version=self.initial_version,
                                              weight_backend=cfg.weights.backend,
                                              weight_timeout_s=cfg.weights.timeout_s,
                                              report_name=f"engine_report-{self.actor_id}.json")
        return self.engine

    def _newest_update(self, update: WeightUpdate) -> WeightUpdate:
        """Skip updates a newer one superseded (the broker already gave up on them)."""
        while (newer := self.link.next_update(0.0)) is not None:
            self.link.report_update(update.version, update.epoch, ok=False, error="superseded by a newer update")
            update = newer
        return update

    async def _weights_loop(self) -> None:
        consecutive_failures = 0
        while not self._stop.is_set():
            update = await asyncio.to_thread(self.link.next_update, 0.5)
            if update is None:
                continue
            update = self._newest_update(update)
            if update.discard_above >= 0:
                self._void_above(update.discard_above)
            try:
                result = await self.engine.update_weights(update)
            except WeightUpdateError as exc:
                consecutive_failures += 1
                self.failed_updates += 1
                self.link.report_update(update.version, update.epoch, ok=False, error=str(exc))
                limit = self.config.actor.max_update_failures
                if consecutive_failures >= limit:
                    raise RuntimeError(f"{consecutive_failures} weight updates failed in a row; exiting so a "
                                       f"restart loads clean weights (last: {exc})") from exc
                self.link.conn.reregister()  # lift any exclusion: we are ready for the next attempt
                continue
            consecutive_failures = 0
            self.link.loaded_version, self.link.loaded_lineage = update.version, update.lineage
            self.updates.append(result)
            self.link.report_update(update.version, update.epoch, ok=True, seconds=result.pause_s)

    def _void_above(self, version: int) -> None:
        """The learner resumed from an older checkpoint: tokens above `version` name abandoned weights."""
        discarded = self.link.discard_unacked_above(version)
        if self.pump is not None:
            self.pump.void_above(version)
        log.warning("discarding work of an abandoned lineage", above_version=version, unacked_discarded=discarded)
        self.link.conn.reregister()  # the broker releases our grants; we ask afresh

    async def run(self, max_groups: int | None = None) -> None:
        """Run until `max_groups` groups are sent (None: forever) or weight updates keep failing."""
        from transformers import AutoTokenizer

        if self.engine is None:
            await self.start_engine()
        self.link.loaded_version, self.link.loaded_lineage = self.engine.version, self.engine.lineage
        await asyncio.to_thread(self.link.register, self.config.broker.connect_timeout_s)
        tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        generator = GroupGenerator(self.engine, self.task, tokenizer, self.config.actor.sampling, self.actor_id,
                                   seed=actor_seed(self.config.run.seed, self.actor_id))
        self.pump = RolloutPump(generator, self.link, self.config.actor.max_groups_in_flight)
        weights = asyncio.ensure_future(self._weights_loop())
        try:
            prompts = self.task.train_prompts(actor_seed(self.config.task.seed, self.actor_id))
            rollouts = asyncio.ensure_future(self.pump.run(prompts, max_groups))
            done, _ = await asyncio.wait({rollouts, weights}, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()  # re-raise a failure
            await asyncio.to_thread(self.link.flush, 30.0)
        finally:
            self._stop.set()
            weights.cancel()
            await asyncio.gather(weights, return_exceptions=True)
        log.info("actor_done", groups=self.pump.groups_done, rollouts=self.pump.rollouts_sent,
                 updates=len(self.updates))

    def shutdown(self) -> None:
        if self.engine is not None:
            self.engine.shutdown()
