"""The learner: one optimizer step per batch, algorithm-blind, FSDP2 across the torchrun ranks.

Driver API (every rank runs the same calls; see learner/__main__.py):

    learner = Learner(config, model_dir, source=..., rendezvous=...)   # loads, shards, resumes
    while learner.version < config.learner.steps:
        metrics = learner.step()         # fetch this rank's share, forward/backward, optimizer step
        learner.maybe_publish()          # broadcast the new version (publish_interval, or asked for)
        learner.maybe_checkpoint()       # save, then commit the step's rollouts to the broker
    learner.close()

The weight version is the number of optimizer steps taken; `step()` increments it. A batch that
trains nothing (every sample stale or empty) or whose gradients are not finite is not a step: it is
counted and the step goes on with the next batch, so the version never advances without training.

While a rank waits for its batch, the ranks check together every `POLL_S` whether the broker asked
for weights (an actor joined, came back or missed an update) and publish the current version at
once, so a learner waiting for rollouts never starves the actors that would produce them.
"""

from __future__ import annotations

import functools
import math
import time
from pathlib import Path

import torch
import torch.distributed as dist

from tether.common.config import RunConfig
from tether.common.device import torch_device, torch_dtype
from tether.common.logging import get_logger
from tether.learner.algorithms import LossInput, LossParams, get_algorithm
from tether.learner.algorithms.core import AdvantageParams
from tether.learner.archive import open_archive
from tether.learner.batch import MicroBatch, prepare_batch
from tether.learner.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
)
from tether.learner.completion import completion_logprobs
from tether.learner.consumption_log import ConsumptionLog
from tether.learner.gradients import clip_gradients
from tether.learner.metrics import StepMetrics, drop_records_after
from tether.learner.model import load_policy
from tether.learner.publish import (
    PublishStats,
    Rendezvous,
    WeightPublisher,
    broadcast_flags,
    broadcast_int,
)
from tether.learner.schedule import learning_rate
from tether.learner.sinks import build_sinks
from tether.learner.source import BatchSource

log = get_logger(__name__)

_LOSS_METRICS = ("pg_loss", "ratio_outside_trust_region", "clipped_fraction", "kl_ref")
MAX_EMPTY_FETCHES = 100
"""Consecutive batches without a trainable token after which the learner gives up."""
POLL_S = 0.1
"""How often waiting ranks check together whether to publish."""
_STOP, _WAIT, _PUBLISH = 0, 1, 2  # rank 0's decisions in deliver_final_weights
MAX_NONFINITE_SKIPS = 10
"""Batches in a row whose gradients may be skipped as non-finite before the learner gives up: one
is an outlier; a run of them means the model or the data is broken, and more skipping would only
consume rollouts."""
_CARRIED = ("samples_received", "samples_dropped", "samples_empty", "samples_skipped_nonfinite")
"""Counts of a skipped batch that the next step's record carries (every rollout is accounted for)."""


def _dummy_micro_batch() -> MicroBatch:
    """A one-token batch with zero weight, for a rank that got no rollouts this step."""
    return MicroBatch(
        input_ids=torch.zeros(1, 2, dtype=torch.long), attention_mask=torch.ones(1, 2, dtype=torch.long),
        prompt_lengths=torch.ones(1, dtype=torch.long), completion_ids=torch.zeros(1, 1, dtype=torch.long),
        mask=torch.zeros(1, 1), behaviour_logprobs=torch.zeros(1, 1), versions=torch.zeros(1, 1, dtype=torch.long),
        advantages=torch.zeros(1), sampling=((1.0, 0, 1.0),),
    )


def _finite_or_nan(value: float) -> float:
    """The value, or NaN for the neutral +-inf a step with no scored token leaves in a min or max."""
    return value if math.isfinite(value) else float("nan")


class Learner:
    """Holds the sharded policy, optimizer, algorithm and publisher of one learner rank."""

    def __init__(
        self,
        config: RunConfig,
        model_dir: str | Path,
        *,
        source: BatchSource,
        rendezvous: Rendezvous | None = None,
        shard: bool | None = None,
        session: str = "",
    ):
        """`session` names this training session (all ranks of one launch); with it, each rank logs
        which rollouts it received for which step (learner/consumption_log.py)."""
        self.config = config
        cfg = config.learner
        self.model_dir = Path(model_dir)
        self.run_dir = Path(config.run.dir)
        self.source = source
        distributed = dist.is_initialized()
        self.rank = dist.get_rank() if distributed else 0
        self.world_size = dist.get_world_size() if distributed else 1
        self.shard = distributed if shard is None else shard
        self.device = torch_device(config.run.device)
        self.body_dtype = torch_dtype(config.model.dtype, self.device)
        self.fp32_lm_head = config.model.fp32_lm_head
        torch.manual_seed(config.run.seed)
        self.model = load_policy(
            self.model_dir, self.device, self.body_dtype, fp32_lm_head=self.fp32_lm_head,
            activation_checkpointing=cfg.activation_checkpointing, shard=self.shard,
        )
        self.ref_model = None
        if cfg.kl_coef > 0:
            self.ref_model = load_policy(
                self.model_dir, self.device, self.body_dtype, fp32_lm_head=self.fp32_lm_head, shard=self.shard, trainable=False,
            )
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.algorithm = get_algorithm(cfg.algorithm)
        self.params = LossParams(
            clip_low=cfg.clip_low, clip_high=cfg.clip_high, dual_clip=cfg.dual_clip, tis_cap=cfg.tis_cap,
            kl_coef=cfg.kl_coef, aggregation=cfg.loss_aggregation,
        )
        self.advantage_params = AdvantageParams(std=cfg.advantage_std, eps=cfg.advantage_eps)
        self.skip_zero_advantage = cfg.skip_zero_advantage and cfg.kl_coef == 0 and self.algorithm.zero_advantage_is_inert
        self.version = 0
        self.committed_version = -1
        """Version of the newest checkpoint this run's lineage holds (-1: none)."""
        self.dropped_total = 0
        self._fetch_wait_s = 0.0
        self.steps_skipped_nonfinite = 0
        if cfg.resume and (path := latest_checkpoint(self.run_dir)) is not None:
            self.version = load_checkpoint(path, self.model, self.optimizer)
            self.committed_version = self.version
            log.info("resumed", checkpoint=str(path), version=self.version)
        if self.rank == 0 and rendezvous is None and cfg.publish_to != "none":
            raise ValueError("learner rank 0 needs a rendezvous to publish weights")
        self.rendezvous = rendezvous if self.rank == 0 else None
        self.publisher = None
        if cfg.publish_to != "none":
            self.publisher = WeightPublisher(
                self.model, rank=self.rank, bucket_bytes=cfg.bucket_mb * 1024 * 1024, body_dtype=self.body_dtype,
                fp32_lm_head=self.fp32_lm_head, backend=config.weights.backend,
                device=self.device, timeout_s=config.weights.timeout_s,
            )
        self.writer = None
        if self.rank == 0:
            # Steps above the checkpoint we resumed from belong to an abandoned lineage: keep them
            # out of the run's metrics (so no step is logged twice), but keep them for inspection.
            moved = drop_records_after(self.run_dir / "metrics.jsonl", self.version)
            if moved:
                log.warning("metrics of steps after the resumed checkpoint moved aside", steps=moved,
                            version=self.version)
            self.writer = build_sinks(config)  # run.report_to
        self.archive = open_archive(config, self.model_dir, self.rank, self.world_size)  # run.keep_rollouts
        self.consumption = ConsumptionLog(self.run_dir, self.rank, session) if session else None
        if self.consumption is not None:
            self.consumption.start(self.version)

    # ---- one optimizer step -------------------------------------------------------------------

    def step(self) -> dict:
        """Fetch this rank's rollouts, take one optimizer step, return the step's (global) metrics.

        Gradients that are not finite never reach the weights. Such a batch is skipped: no optimizer
        update, a warning, and a count in the record of the step that follows (`skipped_nonfinite`
        for this step, `steps_skipped_nonfinite` over the run); then the step starts over on the next
        batch. The version counts optimizer steps, so a skipped batch does not advance it, as a batch
        of stale samples does not (_fetch_trainable_batch): a skipped batch never looks like a trained
        step. Its rollouts were consumed; they are counted in `samples_received` and
        `samples_skipped_nonfinite`.
        """
        cfg = self.config.learner
        started = time.perf_counter()
        self._fetch_wait_s = 0.0
        carried = StepMetrics()
        for skips in range(MAX_NONFINITE_SKIPS + 1):
            m, prepared = self._forward_backward()
            # The norm is global (reduced over the ranks), so every rank skips or steps together.
            grad_norm = clip_gradients(self.model.parameters(), cfg.grad_clip)
            if math.isfinite(grad_norm):
                break
            self.optimizer.zero_grad(set_to_none=True)
            self.steps_skipped_nonfinite += 1
            m.add("samples_skipped_nonfinite", m.sums["sequences"])
            for name in _CARRIED:
                carried.add(name, m.sums[name])
            if self.rank == 0:
                log.warning("non-finite gradients: update skipped, fetching another batch", version=self.version,
                            grad_norm=grad_norm, in_a_row=skips + 1, steps_skipped_nonfinite=self.steps_skipped_nonfinite)
        else:
            raise RuntimeError(
                f"{MAX_NONFINITE_SKIPS + 1} consecutive batches gave non-finite gradients at version "
                f"{self.version}; no update was applied. The weights are finite (checkpoint them to "
                "inspect); look for extreme behaviour logprobs or rewards, or lower learner.lr"
            )
        for name in _CARRIED:
            m.add(name, carried.sums.get(name, 0.0))
        lr = self.learning_rate()
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.version += 1
        if self.archive is not None:
            self.archive.write(self.version, prepared.kept, prepared.advantages)

        m.max("fetch_wait_s", self._fetch_wait_s)
        g = m.reduce(self.device)
        seconds = time.perf_counter() - started
        self.dropped_total += int(g.sums["samples_dropped"])
        record = self._record(g, grad_norm, seconds, skips)
        record["lr"] = lr
        if self.writer is not None:
            self.writer.write(record)
            log.info("step", **{k: (round(v, 6) if isinstance(v, float) else v) for k, v in record.items() if not k.startswith("mixed_")})
        return record

    def learning_rate(self) -> float:
        """The learning rate of the next optimizer step (learner.lr_schedule at this version)."""
        cfg = self.config.learner
        return learning_rate(self.version, lr=cfg.lr, steps=cfg.steps, schedule=cfg.lr_schedule,
                             warmup_steps=cfg.warmup_steps, min_lr_ratio=cfg.min_lr_ratio)

    def _forward_backward(self):
        """Fetch a trainable batch and accumulate its gradients; this rank's (unreduced) metrics and
        the prepared batch."""
        cfg = self.config.learner
        batch, prepared, totals, skipped = self._fetch_trainable_batch()
        skipped_dropped, skipped_empty, skipped_received = skipped
        m = StepMetrics()
        m.add("samples_received", skipped_received + len(batch.rollouts))
        m.add("samples_dropped", skipped_dropped + batch.dropped_stale + prepared.dropped_stale)
        m.add("samples_empty", skipped_empty + prepared.dropped_empty)
        m.add("sequences", len(prepared.rewards))
        m.add("reward_sum", float(prepared.rewards.sum()))
        m.add("reward_sq_sum", float((prepared.rewards.astype("float64") ** 2).sum()))
        m.add("completion_tokens", sum(mb.num_tokens for mb in prepared.micro_batches))
        m.add("pad_tokens", prepared.pad_tokens)
        m.add("real_tokens", prepared.real_tokens)
        m.add("micro_batches_max", len(prepared.micro_batches))
        m.add("samples_zero_advantage", prepared.zero_advantage)
        total_tokens = max(totals.sums["tokens"], 1.0)
        total_sequences = max(totals.sums["sequences"], 1.0)
        micro_batches = list(prepared.micro_batches)
        filler = micro_batches[0] if micro_batches else _dummy_micro_batch()
        # At least one pass even when every sequence was skipped as zero-advantage: the gradients are
        # then zeros, not None, and the optimizer steps as it would have on the full batch.
        while len(micro_batches) < max(int(totals.maxes["micro_batches"]), 1):
            micro_batches.append(filler.with_zero_weight())  # FSDP needs the same collectives on every rank

        # Every rank reports every key, even with nothing to train on (the reduction packs by name).
        for name in ("loss", "entropy_sum", "kl_new_old_sum", "scored_tokens", "parity_lag0_sum",
                     "parity_lag0_tokens", "tokens_outside_support", "samples_skipped_nonfinite",
                     *(f"{n}_sum" for n in _LOSS_METRICS),
                     *(f"mixed_lag{k}_{s}" for k in range(cfg.max_lag + 1) for s in ("sum", "tokens"))):
            m.add(name, 0.0)
        m.max("parity_lag0_max", 0.0)
        # Lag describes every token the step consumed, trained on or skipped; a rank that kept none
        # reports neutral extremes, so every rank reduces the same keys.
        m.min("lag_min", prepared.lag_min)
        m.max("lag_max", prepared.lag_max)
        m.add("lag_sum", float(prepared.lag_sum))
        m.add("lag_tokens", float(prepared.total_tokens))
        for mb in micro_batches:
            self._micro_step(mb, total_tokens, total_sequences, m)
        return m, prepared

    def _fetch_trainable_batch(self):
        """This rank's batch for the next step, fetching again while no rank has a trainable token.

        A batch whose every sample is stale or empty must not become a step: the version is the
        number of optimizer steps, and advancing it without training would make the next batch
        staler still. Every rank sees the same global totals, so all ranks retry together. A broker
        delivers fresher rollouts on the next request; a fixed source that keeps serving nothing
        trainable is a configuration error and fails after MAX_EMPTY_FETCHES tries.
        """
        cfg = self.config.learner
        skipped_dropped = skipped_empty = skipped_received = 0
        for _ in range(MAX_EMPTY_FETCHES):
            batch = self._fetch()
            advantages = functools.partial(self.algorithm.advantages, params=self.advantage_params)
            prepared = prepare_batch(batch.rollouts, self.version, cfg.max_lag, cfg.micro_batch_size, advantages,
                                     empty_completions=cfg.empty_completions, skip_zero_advantage=self.skip_zero_advantage)
            totals = StepMetrics()
            totals.add("tokens", prepared.total_tokens)
            totals.add("sequences", len(prepared.rewards))
            totals.add("dropped", batch.dropped_stale + prepared.dropped_stale + prepared.dropped_empty)
            totals.max("micro_batches", len(prepared.micro_batches))
            totals = totals.reduce(self.device)
            if totals.sums["tokens"] > 0:
                return batch, prepared, totals, (skipped_dropped, skipped_empty, skipped_received)
            skipped_dropped += batch.dropped_stale + prepared.dropped_stale
            skipped_empty += prepared.dropped_empty
            skipped_received += len(batch.rollouts)
            if self.rank == 0:
                log.warning("no trainable sample in the batch; fetching another", version=self.version,
                            dropped=int(totals.sums["dropped"]), max_lag=cfg.max_lag)
        raise RuntimeError(
            f"{MAX_EMPTY_FETCHES} consecutive batches had no trainable sample at version {self.version} "
            f"(every rollout stale beyond learner.max_lag={cfg.max_lag}, or empty): the rollout source "
            "cannot supply this version"
        )

    def _fetch(self):
        """This rank's batch from the source, serving publish requests while any rank waits."""
        cfg = self.config.learner
        self.source.request(step=self.version, rank=self.rank, world_size=self.world_size,
                            size=cfg.rollouts_per_step, learner_version=self.version, max_lag=cfg.max_lag)
        batch = None
        waiting_since = time.perf_counter()
        while True:
            if batch is None:
                batch = self.source.poll(POLL_S)
            waiting, wanted = broadcast_flags(batch is None, self._publish_wanted(), self.device)
            if wanted:
                self.publish()
            if not waiting:
                self._fetch_wait_s += time.perf_counter() - waiting_since
                if self.consumption is not None:
                    self.consumption.record(self.version, batch.rollouts)
                return batch

    def _publish_wanted(self) -> bool:
        return self.rendezvous is not None and self.publisher is not None and self.rendezvous.publish_wanted()

    def _micro_step(self, mb: MicroBatch, total_tokens: float, total_sequences: float, m: StepMetrics) -> None:
        device = self.device
        positions = mb.logit_positions().to(device)
        input_ids, attention_mask = mb.input_ids.to(device), mb.attention_mask.to(device)
        chunk_bytes = int(self.config.learner.logits_chunk_mb * 2**20)
        logprobs, entropy = completion_logprobs(self.model, input_ids, attention_mask, positions, mb.completion_ids,
                                                mb.sampling, chunk_bytes=chunk_bytes)
        mask = mb.mask.to(device)
        behaviour = mb.behaviour_logprobs.to(device)
        # A behaviour token outside the learner's top-k/top-p set has logprob -inf: it cannot be
        # scored, so it leaves the loss and is counted rather than turning the step into NaN.
        supported = torch.isfinite(logprobs)
        m.add("tokens_outside_support", float(((~supported) & (mask > 0)).sum()))
        mask = mask * supported
        logprobs = torch.where(supported, logprobs, torch.zeros_like(logprobs))
        ref_logprobs = None
        if self.ref_model is not None:
            with torch.no_grad():
                ref_logprobs = completion_logprobs(self.ref_model, input_ids, attention_mask, positions,
                                                   mb.completion_ids, mb.sampling, chunk_bytes=chunk_bytes)[0]
                ref_logprobs = torch.where(torch.isfinite(ref_logprobs), ref_logprobs, logprobs.detach())
        inp = LossInput(
            logprobs=logprobs, old_logprobs=behaviour, advantages=mb.advantages.to(device), mask=mask,
            ref_logprobs=ref_logprobs, total_tokens=total_tokens, total_sequences=total_sequences,
        )
        out = self.algorithm.loss(inp, self.params)
        # Losses are normalised by the step's global totals; FSDP averages gradients over ranks,
        # so scaling by world size turns that average into the sum the normalisation expects.
        (out.loss * self.world_size).backward()

        tokens = float(mask.sum())
        m.add("loss", float(out.loss.detach()))
        for name in _LOSS_METRICS:
            value = out.metrics.get(name)
            m.add(f"{name}_sum", float(value) * tokens if value is not None else 0.0)
        self._token_metrics(mb, logprobs.detach(), behaviour, entropy, mask, m)

    def _token_metrics(self, mb: MicroBatch, logprobs, behaviour, entropy, mask, m: StepMetrics) -> None:
        """Entropy, mismatch KL and parity (by lag): learner (before the update) vs behaviour logprobs."""
        on = mask > 0
        d = (logprobs - behaviour).cpu()
        on_cpu = on.cpu()
        m.add("entropy_sum", float((entropy * mask).sum()))
        m.add("kl_new_old_sum", float(((torch.exp(d) - 1 - d) * on_cpu).sum()))
        m.add("scored_tokens", float(on_cpu.sum()))
        lag = self.version - mb.versions
        # A sequence is "pure" when all its tokens come from one version; only pure lag-0 sequences
        # are held to the parity floor (an in-flight update leaves old KV under new tokens).
        big = torch.iinfo(torch.long).max
        vmin = torch.where(on_cpu, mb.versions, big).min(-1).values
        vmax = torch.where(on_cpu, mb.versions, -1).max(-1).values
        pure = (vmin == vmax).unsqueeze(-1)
        abs_d = d.abs()
        lag0 = on_cpu & pure & (lag == 0)
        m.add("parity_lag0_sum", float(abs_d[lag0].sum()))
        m.add("parity_lag0_tokens", float(lag0.sum()))
        m.max("parity_lag0_max", float(abs_d[lag0].max()) if lag0.any() else 0.0)
        mixed = on_cpu & ~pure
        for k in range(self.config.learner.max_lag + 1):
            sel = mixed & (lag == k)
            m.add(f"mixed_lag{k}_sum", float(abs_d[sel].sum()))
            m.add(f"mixed_lag{k}_tokens", float(sel.sum()))

    def _record(self, g: StepMetrics, grad_norm: float, seconds: float, skipped_nonfinite: int) -> dict:
        n = g.sums["sequences"]
        mean = g.sums["reward_sum"] / n if n else float("nan")
        var = g.sums["reward_sq_sum"] / n - mean * mean if n else float("nan")
        record = {
            "step": self.version, "version": self.version,
            "fetch_wait_s": g.maxes["fetch_wait_s"],  # of step_seconds, the time spent waiting for rollouts
            "reward_mean": mean, "reward_std": math.sqrt(max(var, 0.0)) if n else float("nan"),
            "loss": g.sums["loss"],  # each rank's share is already normalised by the global totals
            "pg_loss": g.ratio("pg_loss_sum", "scored_tokens"),
            "kl_new_old": g.ratio("kl_new_old_sum", "scored_tokens"),
            "ratio_outside_trust_region": g.ratio("ratio_outside_trust_region_sum", "scored_tokens"),
            "clipped_fraction": g.ratio("clipped_fraction_sum", "scored_tokens"),
            "entropy": g.ratio("entropy_sum", "scored_tokens"),
            "grad_norm": grad_norm,
            "skipped_nonfinite": skipped_nonfinite, "steps_skipped_nonfinite": self.steps_skipped_nonfinite,
            "samples_skipped_nonfinite": int(g.sums["samples_skipped_nonfinite"]),
            "lag_min": _finite_or_nan(g.mins["lag_min"]), "lag_mean": g.ratio("lag_sum", "lag_tokens"),
            "lag_max": _finite_or_nan(g.maxes["lag_max"]),
            "tokens_per_s": g.sums["completion_tokens"] / seconds,
            "sequence_tokens_per_s": g.sums["real_tokens"] / seconds,
            "pad_fraction": g.sums["pad_tokens"] / max(g.sums["pad_tokens"] + g.sums["real_tokens"], 1.0),
            "samples": int(n), "samples_received": int(g.sums["samples_received"]), "samples_dropped": int(g.sums["samples_dropped"]), "samples_dropped_total": self.dropped_total,
            "samples_empty": int(g.sums["samples_empty"]), "samples_zero_advantage": int(g.sums["samples_zero_advantage"]), "tokens_outside_support": int(g.sums["tokens_outside_support"]),
            "parity_lag0_mean": g.ratio("parity_lag0_sum", "parity_lag0_tokens"),
            "parity_lag0_max": g.maxes["parity_lag0_max"] if g.sums["parity_lag0_tokens"] else float("nan"), "parity_lag0_tokens": int(g.sums["parity_lag0_tokens"]),
            "step_seconds": seconds,
        }
        if self.params.kl_coef > 0:
            record["kl_ref"] = g.ratio("kl_ref_sum", "scored_tokens")
        for k in range(self.config.learner.max_lag + 1):
            if g.sums[f"mixed_lag{k}_tokens"]:
                record[f"mixed_lag{k}_mean_abs_log_ratio"] = g.ratio(f"mixed_lag{k}_sum", f"mixed_lag{k}_tokens")
                record[f"mixed_lag{k}_tokens"] = int(g.sums[f"mixed_lag{k}_tokens"])
        return record

    # ---- publishing and checkpoints -------------------------------------------------------------

    def publish(self) -> PublishStats | None:
        """Offer the current version to the broker and broadcast it if asked to (collective).

        Rank 0 asks; every rank joins the gathers when there is something to send. A failed join or
        broadcast costs this publish only: rank 0 reports it and the broker re-sends the version to
        the survivors in a new epoch (it asks again with PublishWanted); the step is never lost.
        """
        if self.publisher is None:
            return None
        update = None
        if self.rendezvous is not None:
            update = self.rendezvous.publish(self.version, self.publisher.specs(), self.publisher.bucket_bytes)
        stats = self.publisher.broadcast(self.version, update)
        if self.rendezvous is not None and update is not None:
            self.rendezvous.report_update(update, ok=stats.ok, seconds=stats.seconds, error=stats.error)
            event = log.info if stats.ok else log.warning
            event("published" if stats.ok else "publish failed", version=stats.version, epoch=stats.epoch,
                  receivers=stats.receivers, mb=round(stats.bytes / 1e6, 3), seconds=round(stats.seconds, 4),
                  error=stats.error or None)
        return stats

    def maybe_publish(self) -> PublishStats | None:
        """Publish on the publish interval, or when the broker asked for weights (collective)."""
        if self.publisher is None:
            return None
        due = self.version % self.config.learner.publish_interval == 0
        _, wanted = broadcast_flags(False, self._publish_wanted(), self.device)
        return self.publish() if due or wanted else None

    def deliver_final_weights(self, timeout_s: float) -> bool:
        """After the last step (collective): keep publishing while the broker asks, until every live
        actor holds the final version or `timeout_s` passes, so a run ends with its actors on the
        trained weights (a publish deferred behind an update in flight would otherwise never happen)."""
        if self.publisher is None:
            return True
        deadline = time.monotonic() + timeout_s
        while True:
            decision = _STOP
            if self.rendezvous is not None:
                if self.rendezvous.publish_wanted():
                    decision = _PUBLISH
                elif not self.rendezvous.actors_hold(self.version) and time.monotonic() < deadline:
                    decision = _WAIT
            decision = broadcast_int(decision, self.device)
            if decision == _STOP:
                return self.rendezvous is None or self.rendezvous.actors_hold(self.version)
            if decision == _PUBLISH:
                self.publish()
            else:
                time.sleep(POLL_S)

    def save_checkpoint(self) -> Path:
        """Save the current version (collective), then commit the rollouts trained so far (rank 0):
        the broker counts them consumed only now, so a learner restarted from this checkpoint gets
        back exactly what it had not saved."""
        path = save_checkpoint(self.run_dir, self.version, self.model, self.optimizer, self.model_dir,
                               self.body_dtype, self.fp32_lm_head)
        self.committed_version = self.version
        if self.rendezvous is not None:
            self.rendezvous.commit(self.version)
        if self.rank == 0:
            cfg = self.config.learner
            prune_checkpoints(self.run_dir, cfg.keep_checkpoint_every, cfg.keep_last_checkpoints)
        return path

    def maybe_checkpoint(self) -> Path | None:
        cfg = self.config.learner
        due = (cfg.checkpoint_interval and self.version % cfg.checkpoint_interval == 0) or self.version == cfg.steps
        return self.save_checkpoint() if due else None

    def close(self) -> None:
        if self.publisher is not None:
            self.publisher.close()
        if self.archive is not None:
            self.archive.close()
        if self.writer is not None:
            self.writer.close()
