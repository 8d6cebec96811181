"""Actor configuration: the vLLM engine settings that affect numerics, sampling, rollout flow."""

from __future__ import annotations

from dataclasses import dataclass, field

from tether.common.config.base import Section

LOGPROBS_MODES = ("processed_logprobs", "raw_logprobs", "processed_logits", "raw_logits")
GENERATION_CONFIG_SOURCES = ("vllm", "auto")


@dataclass(kw_only=True)
class EngineConfig(Section):
    """Every vLLM engine setting that changes numerics or scheduling, pinned explicitly.

    The defaults are tether's parity settings (README.md, "Why tether": the four corrections);
    changing one of the parity keys fails at start-up unless `allow_parity_break` is set.
    """

    SECTION = "actor.engine"

    logprobs_mode: str = "processed_logprobs"
    """Parity key. processed_logprobs: logprob of the distribution actually sampled from."""
    enable_prefix_caching: bool = False
    """Parity key. A cache hit would reuse KV written by older weights after an update."""
    async_scheduling: bool = False
    """Parity key. Forced off by vLLM on CPU anyway; the engine report shows the effective value."""
    generation_config: str = "vllm"
    """Parity key. vllm: ignore a model's generation_config.json sampling defaults."""
    seed: int = 0
    """Engine seed (sampling is also seeded per request from it)."""
    enforce_eager: str = "auto"
    """auto: false on CUDA (torch.compile and CUDA graphs: decode steps replay captured graphs), true on
    CPU (compilation costs start-up time there). true/false force it. The engine report shows the
    effective value and the CUDA graph mode."""
    enable_chunked_prefill: bool = True
    """Split long prefills across scheduler steps (vLLM default; pinned so it is explicit)."""
    max_num_seqs: int = 256
    """Upper bound of sequences scheduled together."""
    max_num_batched_tokens: int = 4096
    """Upper bound of tokens per scheduler step."""
    max_model_len: int = 512
    """Longest prompt plus completion in tokens."""
    gpu_memory_utilization: float = 0.5
    """Fraction of GPU memory vLLM may take (ignored on CPU)."""
    kv_cache_space_gib: float = 1.0
    """KV cache size on CPU (sets VLLM_CPU_KVCACHE_SPACE)."""
    tensor_parallel_size: int = 1
    """vLLM workers per actor; each joins the weight group as its own rank."""
    allow_parity_break: bool = False
    """Start even if a parity key is changed (for diagnosis, e.g. `tether parity`)."""
    cpu_allow_amx: bool = False
    """CPU only: let vLLM use its AMX kernels (bf16). Off by default because they die with SIGILL where the OS does not grant AMX tile state (sandboxed VMs); the engine report shows the attention kernel in use."""

    def __post_init__(self) -> None:
        self.require_choice("logprobs_mode", LOGPROBS_MODES)
        self.require_choice("generation_config", GENERATION_CONFIG_SOURCES)
        # YAML and overrides give booleans, which the str field holds as "True"/"False".
        self.enforce_eager = str(self.enforce_eager).lower()
        self.require_choice("enforce_eager", ("auto", "true", "false"))
        for key in ("max_num_seqs", "max_num_batched_tokens", "max_model_len", "tensor_parallel_size"):
            self.require(getattr(self, key) >= 1, key, "must be >= 1")
        self.require(0.0 < self.gpu_memory_utilization <= 1.0, "gpu_memory_utilization", "must be in (0, 1]")
        self.require(self.kv_cache_space_gib > 0, "kv_cache_space_gib", "must be > 0")


@dataclass(kw_only=True)
class SamplingConfig(Section):
    """Sampling for rollouts. The learner applies the same temperature, top-k and top-p."""

    SECTION = "actor.sampling"

    temperature: float = 1.0
    """Softmax temperature; logprobs are of the tempered, filtered distribution."""
    top_k: int = 0
    """0 disables top-k."""
    top_p: float = 1.0
    """Nucleus mass kept after top-k; 1 disables top-p."""
    max_tokens: int = 16
    """Completion length limit."""
    group_size: int = 8
    """Completions per prompt (n); advantages are normalised within a group."""

    def __post_init__(self) -> None:
        self.require(self.temperature > 0, "temperature", "must be > 0")
        self.require(self.top_k >= 0, "top_k", "must be >= 0 (0 disables)")
        self.require(0.0 < self.top_p <= 1.0, "top_p", "must be in (0, 1]")
        self.require(self.max_tokens >= 1, "max_tokens", "must be >= 1")
        self.require(self.group_size >= 1, "group_size", "must be >= 1")


@dataclass(kw_only=True)
class ActorConfig(Section):
    """An actor daemon: one vLLM engine generating rollouts for the broker."""

    SECTION = "actor"

    engine: EngineConfig = field(default_factory=EngineConfig)
    """The vLLM engine settings (actor.engine.*)."""
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    """How rollouts are sampled (actor.sampling.*)."""
    actor_id: str = ""
    """Unique id; empty: actor-<host>-<pid>."""
    max_groups_in_flight: int = 16
    """Prompt groups generating at once; bounds memory and creates backpressure."""
    max_unacked_rollouts: int = 512
    """Generation pauses while this many rollouts wait for the broker's ack."""
    resend_interval_s: float = 2.0
    """Unacked rollouts are sent again after this long."""
    num_threads: int = 1
    """torch/OMP threads of the actor process (vLLM's workers are pinned separately)."""
    max_update_failures: int = 3
    """Consecutive failed weight updates after which the actor exits (its supervisor restarts it with
    clean weights): generation stays paused after a failure, so a persistently failing actor is useless."""

    def __post_init__(self) -> None:
        self.require(self.max_groups_in_flight >= 1, "max_groups_in_flight", "must be >= 1")
        self.require(self.max_unacked_rollouts >= 1, "max_unacked_rollouts", "must be >= 1")
        self.require(self.resend_interval_s > 0, "resend_interval_s", "must be > 0")
        self.require(self.num_threads >= 1, "num_threads", "must be >= 1")
        self.require(self.max_update_failures >= 1, "max_update_failures", "must be >= 1")
