"""The top-level run configuration: every daemon's section plus rules that span daemons."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from tether.common.config.actor import ActorConfig
from tether.common.config.base import Section
from tether.common.config.broker import BrokerConfig
from tether.common.config.learner import LearnerConfig
from tether.common.config.model import ModelConfig, TaskConfig
from tether.common.config.placement import PlacementConfig, parse_ids

METRICS_SINKS = ("jsonl", "tensorboard", "wandb")


@dataclass(kw_only=True)
class RunSection(Section):
    """The run as a whole: name, directory, seed, logging, device."""

    SECTION = "run"

    name: str = "tether"
    """Run name, shown in logs and metrics."""
    dir: str = "runs/tether"
    """Run directory: resolved configs, logs, metrics, checkpoints."""
    seed: int = 0
    """Seed for everything not seeded more specifically (learner init, data order, the actors'
    per-completion sampling seeds, which mix in each actor's actor_id)."""
    log_level: str = "info"
    """debug, info, warning or error (console and JSON lines alike)."""
    device: str = "auto"
    """auto: cuda when a CUDA GPU is present, else cpu."""
    report_to: list[str] = field(default_factory=lambda: ["jsonl"])
    """Metrics sinks the learner writes every step's record to, with the same keys in each (TRL's name):
    jsonl (<run.dir>/metrics.jsonl), tensorboard (event files under <run.dir>/tensorboard/),
    wandb (Weights & Biases, files under <run.dir>/wandb/)."""
    wandb_project: str = "tether"
    """W&B project of the run (the run is named run.name)."""
    wandb_mode: str = "auto"
    """W&B mode. offline: write locally, never touch the network (upload later with `wandb sync`);
    online: stream to the W&B server (needs a key); auto: the WANDB_MODE environment variable if set,
    else online when WANDB_API_KEY is set, else offline."""
    keep_rollouts: bool = False
    """Archive every rollout the learner trains on as Parquet under <run.dir>/rollouts/ (token ids and
    text, per-token logprobs and versions, reward, advantage, step); `tether rollouts` and `tether
    audit` read it."""
    rollouts_file_mb: float = 64.0
    """The archive starts a new Parquet part once the current one holds this many MB (a part is
    readable once closed: at rotation and when the learner stops)."""
    rollouts_max_mb: float = 0.0
    """Delete the oldest closed parts once the archive exceeds this many MB; 0 keeps everything."""

    def __post_init__(self) -> None:
        self.require(bool(self.dir), "dir", "must not be empty")
        self.require_choice("log_level", ("debug", "info", "warning", "error"))
        self.require_choice("device", ("auto", "cpu", "cuda"))
        unknown = [sink for sink in self.report_to if sink not in METRICS_SINKS]
        self.require(not unknown, "report_to", f"unknown sink(s) {unknown}; known: {', '.join(METRICS_SINKS)}")
        self.require(len(set(self.report_to)) == len(self.report_to), "report_to", "names a sink twice")
        self.require_choice("wandb_mode", ("auto", "offline", "online"))
        self.require(self.rollouts_file_mb > 0, "rollouts_file_mb", "must be > 0")
        self.require(self.rollouts_max_mb >= 0, "rollouts_max_mb", "must be >= 0 (0 keeps everything)")


@dataclass(kw_only=True)
class WeightSyncConfig(Section):
    """Weight updates: the broadcast group from learner rank 0 to every actor worker."""

    SECTION = "weights"

    backend: str = "auto"
    """torch.distributed backend of the weight group. auto: nccl on CUDA, gloo on CPU."""
    mode: str = "inflight"
    """inflight: actors keep generating across updates; stop_the_world: actors idle while the learner steps."""
    timeout_s: float = 60.0
    """Timeout of joining a weight group and of each broadcast in it. A member that misses it fails
    the update (on CUDA the NCCL communicator is aborted), reports the failure, and the broker
    re-sends the version to the survivors in a new epoch."""

    def __post_init__(self) -> None:
        self.require_choice("backend", ("auto", "gloo", "nccl"))
        self.require_choice("mode", ("inflight", "stop_the_world"))
        self.require(self.timeout_s > 0, "timeout_s", "must be > 0")


@dataclass(kw_only=True)
class RunConfig(Section):
    """Everything one tether run needs. Each daemon reads its own section plus the shared ones."""

    run: RunSection = field(default_factory=RunSection)
    """Name, directory, seed, logging and device of the run (every daemon)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The policy model (actor and learner)."""
    task: TaskConfig = field(default_factory=TaskConfig)
    """Prompts and rewards (actor)."""
    broker: BrokerConfig = field(default_factory=BrokerConfig)
    """The broker daemon, and where every other daemon finds it."""
    actor: ActorConfig = field(default_factory=ActorConfig)
    """Actor daemons."""
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    """The learner."""
    weights: WeightSyncConfig = field(default_factory=WeightSyncConfig)
    """Weight updates from the learner to the actors."""
    placement: PlacementConfig = field(default_factory=PlacementConfig)
    """Where each daemon runs: CPU sets and GPUs (launchers)."""

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
        self.broker.require(
            self.broker.update_timeout_s > self.weights.timeout_s,
            "update_timeout_s",
            f"must exceed weights.timeout_s ({self.weights.timeout_s}): members stuck in a broadcast must "
            "time out by themselves before the broker gives up on them",
        )
        if self.broker.journal_path == "auto":
            self.broker.journal_path = str(Path(self.run.dir) / "broker" / "journal.bin")
        tp = self.actor.engine.tensor_parallel_size
        self.placement.require(
            len(parse_ids(self.placement.actor_gpus)) % tp == 0, "actor_gpus",
            f"must hold whole sets of actor.engine.tensor_parallel_size ({tp}) GPUs",
        )
        if self.weights.mode == "stop_the_world":
            # Strictly on-policy: step s+1 trains only on tokens of version s, which needs every
            # version published (and published through the broker, which grants one step per version).
            stw = "weights.mode=stop_the_world trains on lag-0 tokens only"
            learner.require(learner.max_lag == 0, "max_lag", f"must be 0 when {stw}")
            learner.require(learner.publish_interval == 1, "publish_interval", f"must be 1 when {stw}")
            learner.require(learner.publish_to == "broker", "publish_to",
                            "must be broker when weights.mode=stop_the_world (the broker grants one step's worth per version)")
            learner.require(not learner.rollouts_path, "rollouts_path",
                            "must be empty when weights.mode=stop_the_world (rollouts come from the broker)")
