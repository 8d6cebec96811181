"""Learner configuration: algorithm, optimisation, batches, publishing and checkpoints."""

from __future__ import annotations

from dataclasses import dataclass

from tether.common.config.base import Section


@dataclass
class LearnerConfig(Section):
    SECTION = "learner"

    algorithm: str = "grpo"
    """Registered loss (see tether.learner.algorithms): grpo, gspo, ppo, rloo, reinforce."""
    steps: int = 100
    """Optimizer steps to take; the weight version equals the step count."""
    rollouts_per_step: int = 64
    """Rollouts in one optimizer step, over all ranks (a multiple of the group size)."""
    micro_batch_size: int = 16
    """Rollouts per forward/backward on one rank."""
    lr: float = 1e-4
    """AdamW learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping."""
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
    tis_cap: float = 2.0
    """Truncated importance sampling cap on pi_old/pi_behaviour; 0 disables the correction."""
    publish_interval: int = 1
    """Broadcast weights every this many steps."""
    bucket_mb: int = 64
    """Bucket size when gathering and broadcasting full tensors."""
    checkpoint_interval: int = 0
    """Save a checkpoint every this many steps; 0: only at the end."""
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
        self.require(self.lr > 0, "lr", "must be > 0")
        self.require(self.max_lag >= 0, "max_lag", "must be >= 0")
        self.require(0 <= self.clip_low < 1, "clip_low", "must be in [0, 1)")
        self.require(self.clip_high >= 0, "clip_high", "must be >= 0")
        self.require_choice("loss_aggregation", ("token", "sequence"))
        self.require(self.kl_coef >= 0, "kl_coef", "must be >= 0")
        self.require(self.tis_cap >= 0, "tis_cap", "must be >= 0")
        self.require_choice("publish_to", ("broker", "static", "none"))
        if self.publish_to == "static":
            parts = self.static_group.rsplit(":", 2)
            self.require(
                len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit() and int(parts[2]) >= 1,
                "static_group", "must be host:port:world_size when publish_to=static",
            )
        self.require(self.checkpoint_interval >= 0, "checkpoint_interval", "must be >= 0")
        self.require(self.logits_chunk_mb > 0, "logits_chunk_mb", "must be > 0")
