"""Map tether's EngineConfig to vLLM engine arguments, and refuse settings that break parity.

One function builds the keyword arguments for every engine tether starts (actor daemon, eval,
parity doctor), so the pinned settings cannot drift between them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from tether.common.config import EngineConfig, ModelConfig
from tether.common.device import resolve_dtype
from tether.common.errors import ConfigError

FP32_HEAD_QUANTIZATION = "tether_fp32_head"
"""Name under which tether.actor.fp32_head registers its config with vLLM."""
WORKER_EXTENSION = "tether.actor.worker_ext.TetherWorkerExtension"
"""Mixed into every vLLM worker: weight receive and introspection methods (collective_rpc)."""


@dataclass(frozen=True)
class ParityRule:
    key: str
    required: object
    why: str


PARITY_RULES = (
    ParityRule("logprobs_mode", "processed_logprobs",
               "other modes report logprobs of a distribution other than the one sampled from (raw ignores temperature, top-k and top-p)"),
    ParityRule("enable_prefix_caching", False,
               "a cache hit after a weight update reuses KV computed by older weights"),
    ParityRule("async_scheduling", False,
               "overlapping scheduling with an in-flight pause makes the version boundary of tokens ambiguous"),
    ParityRule("generation_config", "vllm",
               "'auto' lets the model's generation_config.json silently change sampling defaults"),
)


def parity_violations(engine: EngineConfig) -> list[str]:
    """One message per parity key that differs from tether's required value."""
    return [
        f"actor.engine.{rule.key}={getattr(engine, rule.key)!r} breaks parity (required {rule.required!r}): {rule.why}"
        for rule in PARITY_RULES
        if getattr(engine, rule.key) != rule.required
    ]


def check_parity(engine: EngineConfig) -> list[str]:
    """Raise ConfigError on a parity-breaking setting unless allow_parity_break; return the violations."""
    violations = parity_violations(engine)
    if violations and not engine.allow_parity_break:
        raise ConfigError(
            "refusing to start: " + "; ".join(violations) + " (set actor.engine.allow_parity_break=true to override)"
        )
    return violations


def resolve_enforce_eager(setting: str, device: str) -> bool:
    """actor.engine.enforce_eager: auto is eager on CPU only (CUDA graphs on CUDA)."""
    if setting == "auto":
        return device != "cuda"
    return setting == "true"


def engine_kwargs(engine: EngineConfig, model: ModelConfig, model_path: str, device: str = "cpu") -> dict:
    """Keyword arguments for vllm.LLM / AsyncEngineArgs with every numerics setting explicit.

    With `model.fp32_lm_head` the head gets true fp32 weights and an fp32 matmul through the
    quantization config registered by tether.actor.fp32_head (import it before starting an engine;
    tether.actor.engine does). The worker extension is always installed, so every engine can take
    in-flight weight updates.
    """
    if device == "cpu":
        # vLLM's CPU backend sizes its KV cache from this variable (GiB); spawned workers inherit it.
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(max(1, round(engine.kv_cache_space_gib)))
        # Read by tether.actor.worker_ext inside the spawned workers (see EngineConfig.cpu_allow_amx).
        os.environ["TETHER_CPU_DISABLE_AMX"] = "0" if engine.cpu_allow_amx else "1"
    return dict(
        model=model_path,
        tokenizer=model_path,
        dtype=resolve_dtype(model.dtype, device),
        seed=engine.seed,
        logprobs_mode=engine.logprobs_mode,
        enable_prefix_caching=engine.enable_prefix_caching,
        async_scheduling=engine.async_scheduling,
        generation_config=engine.generation_config,
        enforce_eager=resolve_enforce_eager(engine.enforce_eager, device),
        enable_chunked_prefill=engine.enable_chunked_prefill,
        max_num_seqs=engine.max_num_seqs,
        max_num_batched_tokens=engine.max_num_batched_tokens,
        max_model_len=engine.max_model_len,
        gpu_memory_utilization=engine.gpu_memory_utilization,
        tensor_parallel_size=engine.tensor_parallel_size,
        quantization=FP32_HEAD_QUANTIZATION if model.fp32_lm_head else None,
        worker_extension_cls=WORKER_EXTENSION,
    )
