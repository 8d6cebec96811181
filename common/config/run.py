"""The top-level run configuration: every daemon's section plus rules that span daemons."""

from __future__ import annotations

from dataclasses import dataclass, field

from tether.common.config.actor import ActorConfig
from tether.common.config.base import Section
from tether.common.config.broker import BrokerConfig
from tether.common.config.learner import LearnerConfig
from tether.common.config.model import ModelConfig, TaskConfig
from tether.common.config.placement import PlacementConfig, parse_ids


@dataclass
class RunSection(Section):
    SECTION = "run"

    name: str = "tether"
    """Run name, shown in logs and metrics."""
    dir: str = "runs/tether"
    """Run directory: resolved configs, logs, metrics, checkpoints."""
    seed: int = 0
    """Seed for everything not seeded more specifically (learner init, data order)."""
    log_level: str = "info"
    """debug, info, warning or error (console and JSON lines alike)."""
    device: str = "auto"
    """auto: cuda when a CUDA GPU is present, else cpu."""

    def __post_init__(self) -> None:
        self.require(bool(self.dir), "dir", "must not be empty")
        self.require_choice("log_level", ("debug", "info", "warning", "error"))
        self.require_choice("device", ("auto", "cpu", "cuda"))


@dataclass
class WeightSyncConfig(Section):
    SECTION = "weights"

    backend: str = "auto"
    """torch.distributed backend of the weight group. auto: nccl on CUDA, gloo on CPU."""
    mode: str = "inflight"
    """inflight: actors keep generating across updates; stop_the_world: actors idle while the learner steps."""
    timeout_s: float = 120.0
    """Timeout of one broadcast; a peer that misses it is dropped from the epoch."""

    def __post_init__(self) -> None:
        self.require_choice("backend", ("auto", "gloo", "nccl"))
        self.require_choice("mode", ("inflight", "stop_the_world"))
        self.require(self.timeout_s > 0, "timeout_s", "must be > 0")


@dataclass
class RunConfig(Section):
    """Everything one tether run needs. Each daemon reads its own section plus the shared ones."""

    run: RunSection = field(default_factory=RunSection)
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    broker: BrokerConfig = field(default_factory=BrokerConfig)
    actor: ActorConfig = field(default_factory=ActorConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    weights: WeightSyncConfig = field(default_factory=WeightSyncConfig)
    placement: PlacementConfig = field(default_factory=PlacementConfig)

    def __post_init__(self) -> None:
        group = self.actor.sampling.group_size
        learner = self.learner
        learner.require(
            learner.rollouts_per_step % group == 0,
            "rollouts_per_step",
            f"must be a multiple of actor.sampling.group_size ({group}) so groups are never split",
        )
        learner.require(
            learner.micro_batch_size <= learner.rollouts_per_step,
            "micro_batch_size",
            "must not exceed learner.rollouts_per_step",
        )
        self.actor.engine.require(
            self.actor.engine.max_model_len >= self.actor.sampling.max_tokens + 1,
            "max_model_len",
            f"must leave room for a prompt plus actor.sampling.max_tokens ({self.actor.sampling.max_tokens})",
        )
        self.broker.require(
            self.broker.buffer_capacity >= learner.rollouts_per_step,
            "buffer_capacity",
            f"must hold at least one step's rollouts (learner.rollouts_per_step={learner.rollouts_per_step})",
        )
        tp = self.actor.engine.tensor_parallel_size
        self.placement.require(
            len(parse_ids(self.placement.actor_gpus)) % tp == 0, "actor_gpus",
            f"must hold whole sets of actor.engine.tensor_parallel_size ({tp}) GPUs",
        )
        if self.weights.mode == "stop_the_world":
            # Strictly on-policy: step s+1 trains only on tokens of version s, which needs every
            # version published (and published through the broker, which enforces the quota).
            stw = "weights.mode=stop_the_world trains on lag-0 tokens only"
            learner.require(learner.max_lag == 0, "max_lag", f"must be 0 when {stw}")
            learner.require(learner.publish_interval == 1, "publish_interval", f"must be 1 when {stw}")
            learner.require(learner.publish_to == "broker", "publish_to",
                            "must be broker when weights.mode=stop_the_world (the broker enforces the per-version quota)")
            learner.require(not learner.rollouts_path, "rollouts_path",
                            "must be empty when weights.mode=stop_the_world (rollouts come from the broker)")
