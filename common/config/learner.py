"""Learner configuration: algorithm, optimisation, batches, publishing and checkpoints."""

from __future__ import annotations

from dataclasses import dataclass

from tether.common.config.base import Section
from tether.learner.algorithms import ADVANTAGE_STDS, AGGREGATIONS, available_algorithms
from tether.learner.schedule import SCHEDULES


@dataclass(kw_only=True)
class LearnerConfig(Section):
    """The learner: algorithm, optimisation, batches, publishing and checkpoints."""

    SECTION = "learner"

    algorithm: str = "grpo"
    """Registered loss, a module of tether.learner.algorithms: grpo, gspo, ppo, rloo, reinforce."""
    steps: int = 100
    """Optimizer steps to take; the weight version equals the step count."""
    rollouts_per_step: int = 64
    """Rollouts in one optimizer step, over all ranks (a multiple of the group size)."""
    micro_batch_size: int = 16
    """Rollouts per forward/backward on one rank."""
    lr: float = 1e-4
    """AdamW learning rate (the peak, when lr_schedule decays it)."""
    lr_schedule: str = "constant"
    """constant, linear or cosine: after warmup_steps, keep lr or decay it to lr * min_lr_ratio at the
    last step (learner/schedule.py). A function of the version, so a resumed run continues it."""
    warmup_steps: int = 0
    """Steps of linear warm-up from lr / warmup_steps to lr; 0: none."""
    min_lr_ratio: float = 0.0
    """Where linear and cosine decay end, as a fraction of lr (0 <= ratio <= 1)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping (the norm is still reported
    as grad_norm). A step whose gradient norm is not finite is never applied: see steps_skipped_nonfinite
    in docs/learner.md."""
    max_lag: int = 4
    """Rollouts with a token older than learner_version - max_lag are dropped and counted."""
    clip_low: float = 0.2
    """Ratio clip below 1 (PPO epsilon)."""
    clip_high: float = 0.28
    """Ratio clip above 1 (clip-higher); equal to clip_low for symmetric PPO."""
    loss_aggregation: str = "token"
    """token: mean over all tokens of the batch; sequence: mean of per-sequence means."""
    kl_coef: float = 0.0
    """Weight of the KL penalty to the reference (initial) policy; 0 disables it."""
    dual_clip: float = 2.0
    """grpo, ppo, gspo: dual-clip constant c (dual-clip PPO, Ye et al. 2020; verl's clip_ratio_c, TRL's
    delta). A negative-advantage token's loss -A * ratio is capped at -A * c, so a token whose ratio
    pi/pi_behaviour has exploded cannot dominate the step. 0 disables; otherwise it must be >=
    1 + clip_high, or the cap would zero the gradient of tokens inside the trust region."""
    tis_cap: float = 2.0
    """rloo, reinforce: truncated importance sampling against the behaviour policy; each token's
    weight min(pi/pi_behaviour, tis_cap) is held constant in the gradient. 0 disables (weight 1);
    otherwise it must be >= 1 so that on-policy tokens keep weight 1."""
    advantage_std: str = "sample"
    """grpo, gspo: the group std that divides (r - group mean). sample (n - 1, Bessel) is what TRL's
    GRPOTrainer and torch.std use, so an engineer coming from TRL gets the same advantages for the same
    rewards; population divides by n (larger advantages in small groups)."""
    advantage_eps: float = 1e-4
    """grpo, gspo: added to the group std before dividing (> 0). TRL's 1e-4: rewards that differ only
    by float noise (1e-7 apart) stay near-zero advantages, where 1e-6 turned them into up to 0.085."""
    empty_completions: str = "group"
    """A completion with no token trains on nothing either way. group (as TRL): its reward still
    counts in its group's mean and std, so the other members' advantages are those of the whole group
    as sampled; drop: it is removed first and the group is normalised over its other members."""
    skip_zero_advantage: bool = True
    """Leave rollouts whose advantage is exactly 0 out of forward and backward. In a GRPO group whose
    completions all got the same reward every advantage is 0, and with kl_coef 0 such a rollout adds
    nothing to the gradient: the update is the same (the loss is still divided by the step's full
    token count) and the step costs less, by the share of such groups (often half, late in a run).
    Token metrics (entropy, kl_new_old, lag, parity) then cover the tokens trained on;
    samples_zero_advantage counts the skipped. Ignored when kl_coef > 0 or the algorithm's loss does
    not vanish with the advantage."""
    publish_interval: int = 1
    """Broadcast weights every this many steps."""
    bucket_mb: int = 64
    """Bucket size when gathering and broadcasting full tensors."""
    checkpoint_interval: int = 50
    """Save a checkpoint every this many steps (and at the end); 0: only at the end. A checkpoint is
    also the commit point of exactly-once delivery: the broker holds the rollouts of the steps since
    the last one as leases (in memory and in its journal) and serves them again to a learner that
    resumes from it, so the interval bounds both what a restart retrains and what the broker holds."""
    keep_checkpoint_every: int = 0
    """Retention: after each save, keep the checkpoints whose version is a multiple of this (plus the
    latest keep_last_checkpoints) and delete the rest; 0 keeps every checkpoint written. `tether audit`
    can only check rollouts of versions whose checkpoint is kept (version 0 is model.path)."""
    keep_last_checkpoints: int = 1
    """Retention: the newest this many checkpoints are always kept (resume needs the latest)."""
    resume: bool = True
    """Continue from the newest checkpoint in the run directory if there is one."""
    activation_checkpointing: bool = False
    """Recompute decoder-layer activations in backward to save memory."""
    logits_chunk_mb: float = 256.0
    """Largest chunk of fp32 logits (sequences x completion positions x vocabulary x 4 bytes) the lm_head
    and logprob processing compute at once; backward recomputes each chunk instead of keeping it."""
    rollouts_path: str = ""
    """Train on the rollouts saved in this file (tether.learner.source.save_rollouts) instead of the broker."""
    publish_to: str = "broker"
    """broker: announce versions to the broker and broadcast to its weight group; static: a fixed group
    at static_group without a broker; none: never publish."""
    static_group: str = ""
    """host:port:world_size of the TCPStore and size of the weight group when publish_to=static."""
    num_threads: int = 1
    """torch threads per learner rank on CPU."""

    def __post_init__(self) -> None:
        for key in ("steps", "rollouts_per_step", "micro_batch_size", "publish_interval", "bucket_mb", "num_threads"):
            self.require(getattr(self, key) >= 1, key, "must be >= 1")
        self.require_choice("algorithm", tuple(available_algorithms()))
        self.require(self.lr > 0, "lr", "must be > 0")
        self.require_choice("lr_schedule", SCHEDULES)
        self.require(0 <= self.warmup_steps < self.steps, "warmup_steps", f"must be in [0, learner.steps) ({self.steps})")
        self.require(0.0 <= self.min_lr_ratio <= 1.0, "min_lr_ratio", "must be in [0, 1]")
        self.require(self.grad_clip >= 0, "grad_clip", "must be >= 0 (0 disables clipping)")
        self.require(self.max_lag >= 0, "max_lag", "must be >= 0")
        self.require(0 <= self.clip_low < 1, "clip_low", "must be in [0, 1)")
        self.require(self.clip_high >= 0, "clip_high", "must be >= 0")
        self.require_choice("loss_aggregation", AGGREGATIONS)
        self.require(self.kl_coef >= 0, "kl_coef", "must be >= 0")
        self.require(self.dual_clip == 0 or self.dual_clip >= 1 + self.clip_high, "dual_clip",
                     f"must be 0 (off) or >= 1 + learner.clip_high ({1 + self.clip_high:g})")
        self.require(self.tis_cap == 0 or self.tis_cap >= 1, "tis_cap", "must be 0 (off) or >= 1")
        self.require_choice("advantage_std", ADVANTAGE_STDS)
        self.require(self.advantage_eps > 0, "advantage_eps",
                     "must be > 0 (equal rewards give r - mean and std of float rounding: 0/0 without it)")
        self.require_choice("empty_completions", ("group", "drop"))
        self.require_choice("publish_to", ("broker", "static", "none"))
        if self.publish_to == "static":
            parts = self.static_group.rsplit(":", 2)
            self.require(
                len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit() and int(parts[2]) >= 1,
                "static_group", "must be host:port:world_size when publish_to=static",
            )
        self.require(self.checkpoint_interval >= 0, "checkpoint_interval", "must be >= 0")
        self.require(self.keep_checkpoint_every >= 0, "keep_checkpoint_every", "must be >= 0 (0 keeps all)")
        self.require(self.keep_last_checkpoints >= 1, "keep_last_checkpoints", "must be >= 1 (resume needs the latest)")
        self.require(self.logits_chunk_mb > 0, "logits_chunk_mb", "must be > 0")
