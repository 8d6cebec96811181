"""The actor's vLLM V1 engine: parity settings pinned, an engine report, per-token versions, in-flight updates.

`ActorEngine.start()` builds an AsyncLLM from `engine_args.engine_kwargs` (the one mapping from
config to vLLM arguments), refuses parity-breaking settings, then reads the *effective* settings back
from the running engine (some are changed silently, e.g. async scheduling is forced off on CPU) and
writes them to the log and `<run_dir>/engine_report.json`.

Versions: vLLM's engine core stamps every step's outputs with a weight-version label, and the output
processor turns label changes into per-request spans. An update sets the new label while the engine
is paused (no step runs), so every token sampled before the pause carries the old version and every
token sampled after the resume the new one, decided inside the engine, not by when the client reads.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from tether.actor.engine_args import (
    FP32_HEAD_QUANTIZATION,
    PARITY_RULES,
    check_parity,
    engine_kwargs,
)
from tether.common.config import EngineConfig, ModelConfig
from tether.common.errors import ConfigError
from tether.common.logging import get_logger
from tether.common.messages import WeightUpdate

log = get_logger(__name__)


@dataclass
class Completion:
    """One finished completion: sampled tokens, their processed logprobs and weight versions."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    logprobs: np.ndarray
    """float32, processed logprob of each sampled token."""
    versions: np.ndarray
    """int32, weight version that sampled each token."""
    finish_reason: str
    text: str = ""


@dataclass
class UpdateResult:
    """What one in-flight weight update cost."""

    version: int
    epoch: int
    pause_s: float
    """Pause call to resume returned: the time no token could be generated."""
    rpc_s: float
    """The commit inside the workers, called while paused (slowest worker, RPC included)."""
    transfer_s: float
    bytes: int
    workers: list[dict] = field(default_factory=list)
    """Per worker: join_s, receive_s (in the broadcasts), transfer_s, stage_s (vLLM's reload on the
    shadow model, CPU), all before the pause; load_s (the commit: swap on CPU, vLLM's reload on
    CUDA), in the pause; bytes, buckets."""
    pause_call_s: float = 0.0
    """Pausing the scheduler itself (it waits for the step in progress)."""
    resume_s: float = 0.0
    """resume_generation() itself."""
    ready_s: float = 0.0
    """update_weights() called to every worker's bytes in (and staged): generation went on meanwhile."""

    @property
    def mb_per_s(self) -> float:
        return self.bytes / 1e6 / self.transfer_s if self.transfer_s > 0 else 0.0


class WeightUpdateError(RuntimeError):
    """A weight update failed; the weights may be partly loaded (see ActorEngine.update_weights)."""


def _versions_from_spans(spans, n_tokens: int) -> np.ndarray:
    if spans is None:
        raise RuntimeError("vLLM returned no weight-version spans; the version label was never set")
    versions = np.full(n_tokens, -1, dtype=np.int32)
    for span in spans:
        versions[span.start:span.end] = int(span.version)
    if n_tokens and versions.min() < 0:
        raise RuntimeError(f"weight-version spans {spans} do not cover {n_tokens} tokens")
    return versions


def _token_logprobs(output) -> np.ndarray:
    """The logprob of each sampled token from a CompletionOutput (logprobs=0 gives just those)."""
    if output.logprobs is None:
        raise RuntimeError("completion has no logprobs; SamplingParams.logprobs must be set")
    return np.asarray(
        [position[token].logprob for token, position in zip(output.token_ids, output.logprobs, strict=True)],
        dtype=np.float32,
    )


def read_generation_config(model_path: str) -> dict:
    """generation_config.json of the model (empty when absent)."""
    path = Path(model_path) / "generation_config.json"
    return json.loads(path.read_text()) if path.is_file() else {}


class ActorEngine:
    """One vLLM V1 AsyncLLM with tether's parity settings, version labels and weight updates.

    Use `await ActorEngine.start(...)`; call `shutdown()` when done. Safe to use from one event loop.
    """

    def __init__(self, llm, engine: EngineConfig, report: dict, version: int, weight_backend: str,
                 weight_timeout_s: float):
        self.llm = llm
        self.engine_config = engine
        self.report = report
        self.version = version
        self.weight_backend = weight_backend
        self.weight_timeout_s = weight_timeout_s
        self.lineage = ""
        """Learner session whose weights are loaded (empty: the model on disk)."""
        self.healthy = True
        """False after a failed update: weights may be a mix of two versions; generation stays paused."""
        self._paused = False
        self._update_lock = asyncio.Lock()
        self._request_counter = 0
        self._reports: UpdateReports | None = None

    # ----------------------------------------------------------------- start-up
    @classmethod
    async def start(cls, engine: EngineConfig, model: ModelConfig, model_path: str, device: str = "cpu",
                    run_dir: str | Path | None = None, initial_version: int = 0,
                    weight_backend: str = "auto", weight_timeout_s: float = 120.0,
                    report_name: str = "engine_report.json") -> ActorEngine:
        """Check parity, start the engine, verify the effective settings, write the engine report
        to <run_dir>/<report_name>."""
        violations = check_parity(engine)  # raises unless allow_parity_break
        for message in violations:
            log.warning("parity_break_allowed", detail=message)
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        import tether.actor.fp32_head  # noqa: F401  registers the fp32 head config before vLLM parses it

        kwargs = engine_kwargs(engine, model, model_path, device)
        llm = AsyncLLM.from_engine_args(AsyncEngineArgs(**kwargs))
        try:
            # Label the initial weights so that every token ever produced carries a version span.
            await llm.update_weight_version(str(initial_version))
            report = await build_engine_report(llm, engine, kwargs, model_path, violations)
            effective_violations = report["parity"]["effective_violations"]
            if effective_violations and not engine.allow_parity_break:
                raise ConfigError("refusing to run: the running engine differs from the parity settings: "
                                  + "; ".join(effective_violations))
        except BaseException:
            llm.shutdown()
            raise
        log.info("engine_report", **{k: v for k, v in report.items() if k != "requested"})
        if run_dir is not None:
            out = Path(run_dir) / report_name
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(report, indent=2, sort_keys=True, default=str))
        return cls(llm, engine, report, initial_version, weight_backend, weight_timeout_s)

    def shutdown(self) -> None:
        self.llm.shutdown()
        if self._reports is not None:
            self._reports.close()
            self._reports = None

    # --------------------------------------------------------------- generation
    def new_request_id(self, prefix: str = "req") -> str:
        self._request_counter += 1
        return f"{prefix}-{self._request_counter}"

    async def stream(self, prompt_token_ids: list[int], params, request_id: str | None = None) -> AsyncIterator:
        """Yield vLLM RequestOutputs as they arrive (params decides DELTA/CUMULATIVE/FINAL_ONLY)."""
        from vllm.inputs import TokensPrompt

        request_id = request_id or self.new_request_id()
        async for output in self.llm.generate(TokensPrompt(prompt_token_ids=list(prompt_token_ids)),
                                              params, request_id):
            yield output

    async def generate(self, prompt_token_ids: list[int], params, request_id: str | None = None) -> Completion:
        """Run one completion (params.n must be 1) and return it with per-token logprobs and versions."""
        from vllm.sampling_params import RequestOutputKind

        if params.n != 1:
            raise ValueError("ActorEngine.generate runs one completion per request (n=1)")
        if params.logprobs is None:
            raise ValueError("params.logprobs must be set (0 returns the sampled token's logprob)")
        params.output_kind = RequestOutputKind.FINAL_ONLY
        request_id = request_id or self.new_request_id()
        final = None
        async for final in self.stream(prompt_token_ids, params, request_id):  # noqa: B007 - keep the last
            pass
        return completion_from_output(final)

    # ------------------------------------------------------------ weight updates
    async def update_weights(self, update: WeightUpdate) -> UpdateResult:
        """Receive `update` while generating, then pause (keep requests and KV cache), make it live in
        every worker, relabel the version, resume. No request is aborted.

        The bytes arrive on a background thread of each worker (and on CPU vLLM's reload processes
        them on a shadow of the model) while the engine keeps generating; only the commit runs in
        the pause (tether.actor.worker_updates). On failure the engine stays paused, `healthy`
        becomes False and WeightUpdateError is raised; the next successful update loads every
        tensor again and resumes. (A failure before the commit leaves the loaded weights whole, but
        a commit that failed half-way may not, and the contract is the same for both.)
        """
        async with self._update_lock:
            start = time.perf_counter()
            try:
                update_id = await self.receive_update(update)
            except Exception as exc:
                await self._pause()  # no token from here until a complete update (see docstring)
                raise self._failed(update, exc) from exc
            ready = time.perf_counter()
            await self._pause()
            paused = time.perf_counter()
            try:
                workers = await self.commit_update(update_id)
                rpc_s = time.perf_counter() - paused
                # Set while paused: the next step, the first on new weights, is the first with this label.
                await self.llm.update_weight_version(str(update.version))
            except Exception as exc:
                raise self._failed(update, exc) from exc
            self.version, self.lineage, self.healthy = update.version, update.lineage, True
            resume_start = time.perf_counter()
            await self.llm.resume_generation()
            self._paused = False
            done = time.perf_counter()
        result = UpdateResult(
            version=update.version, epoch=update.epoch, pause_s=done - ready, rpc_s=rpc_s,
            transfer_s=max(w["transfer_s"] for w in workers), bytes=sum(w["bytes"] for w in workers),
            workers=list(workers), pause_call_s=paused - ready, resume_s=done - resume_start,
            ready_s=ready - start,
        )
        log.info("weights_updated", version=result.version, epoch=result.epoch, pause_s=round(result.pause_s, 4),
                 ready_s=round(result.ready_s, 4), rpc_s=round(rpc_s, 4),
                 join_s=round(max(w["join_s"] for w in workers), 4),
                 receive_s=round(max(w["receive_s"] for w in workers), 4),
                 stage_s=round(max(w["stage_s"] for w in workers), 4),
                 load_s=round(max(w["load_s"] for w in workers), 4), mb_per_s=round(result.mb_per_s, 1))
        return result

    async def receive_update(self, update: WeightUpdate) -> str:
        """The part of an update that runs while the engine generates: every worker receives (and on
        CPU stages) `update`. Returns its id for `commit_update`; raises if a worker failed.
        Nothing of the loaded weights changes (update_weights is the whole update)."""
        specs = [(spec.name, list(spec.shape), spec.dtype) for spec in update.tensors]
        if self._reports is None:
            self._reports = UpdateReports()
        update_id = f"v{update.version}-e{update.epoch}-{uuid.uuid4().hex[:8]}"
        begun = await self.llm.collective_rpc(
            "tether_begin_update", timeout=self.weight_timeout_s,
            args=(update_id, self._reports.address, update.group_host, update.group_port, update.group_key,
                  update.first_rank, update.world_size, specs, update.bucket_bytes, self.weight_backend,
                  self.weight_timeout_s),
        )
        reports = await self._reports.wait(update_id, len(begun), timeout=self.weight_timeout_s * 2)
        failed = [r for r in reports if not r["ok"]]
        if failed:
            raise RuntimeError("; ".join(f"rank {r['rank']}: {r['error']}" for r in failed))
        return update_id

    async def commit_update(self, update_id: str) -> list[dict]:
        """Make a received update live in every worker; call it only while the engine is paused.
        Returns each worker's timings (receive_update's included)."""
        return await self.llm.collective_rpc("tether_commit_update", timeout=self.weight_timeout_s * 2,
                                             args=(update_id,))

    async def _pause(self) -> None:
        """Stop scheduling, keeping requests and KV cache; returns once no step runs.

        Calls the engine core directly: AsyncLLM.pause_generation adds a fixed 20 ms sleep after it
        (so that outputs of the last step reach the caller first, which vLLM notes is not needed for
        correctness), and that sleep alone would be three times the bare broadcast of the tiny model.
        """
        if not self._paused:
            await self.llm.engine_core.pause_scheduler_async(mode="keep", clear_cache=False)
            self._paused = True

    def _failed(self, update: WeightUpdate, exc: Exception) -> WeightUpdateError:
        self.healthy = False
        log.error("weight update failed; generation stays paused until a complete update",
                  version=update.version, epoch=update.epoch, error=str(exc)[:500])
        return WeightUpdateError(f"weight update to version {update.version} failed: {exc}")

    async def head_info(self) -> list[dict]:
        return await self.llm.collective_rpc("tether_head_info")


def completion_from_output(final) -> Completion:
    """A Completion from vLLM's final RequestOutput of an n=1 request."""
    if final is None or not final.finished:
        raise RuntimeError("request ended without a final output")
    output = final.outputs[0]
    token_ids = list(output.token_ids)
    return Completion(
        request_id=final.request_id,
        prompt_token_ids=list(final.prompt_token_ids),
        token_ids=token_ids,
        logprobs=_token_logprobs(output),
        versions=_versions_from_spans(output.weight_versions, len(token_ids)),
        finish_reason=output.finish_reason or "length",
        text=output.text,
    )


async def build_engine_report(llm, engine: EngineConfig, requested: dict, model_path: str,
                              violations: list[str]) -> dict:
    """Every effective setting that can change numerics or scheduling, read back from the running engine."""
    import vllm

    config = llm.vllm_config
    model_cfg, cache, sched, parallel = (config.model_config, config.cache_config,
                                         config.scheduler_config, config.parallel_config)
    effective = {
        "logprobs_mode": str(model_cfg.logprobs_mode),
        "enable_prefix_caching": bool(cache.enable_prefix_caching),
        "async_scheduling": bool(sched.async_scheduling),
        "generation_config": str(model_cfg.generation_config),
        "dtype": str(model_cfg.dtype).removeprefix("torch."),
        "head_dtype_builtin": str(model_cfg.head_dtype).removeprefix("torch."),
        "quantization": model_cfg.quantization,
        "seed": model_cfg.seed,
        "enforce_eager": bool(model_cfg.enforce_eager),
        "enable_chunked_prefill": bool(sched.enable_chunked_prefill),
        "max_num_seqs": sched.max_num_seqs,
        "max_num_batched_tokens": sched.max_num_batched_tokens,
        "max_model_len": model_cfg.max_model_len,
        "block_size": cache.block_size,
        "num_kv_blocks": cache.num_gpu_blocks,
        "kv_cache_dtype": str(cache.cache_dtype),
        "tensor_parallel_size": parallel.tensor_parallel_size,
        "worker_extension_cls": parallel.worker_extension_cls,
        "compilation_mode": str(getattr(config.compilation_config, "mode", "")),
        # "NONE" with enforce_eager; on CUDA otherwise the mode decode steps replay captured graphs in.
        "cudagraph_mode": getattr(getattr(config.compilation_config, "cudagraph_mode", None), "name", "NONE"),
    }
    # What the model's generation_config.json still does with generation_config="vllm": its
    # eos_token_id entries become extra stop tokens (the sampling defaults are ignored).
    gen = read_generation_config(model_path)
    eos = gen.get("eos_token_id")
    extra_stop = sorted(set(eos if isinstance(eos, list) else [eos] if eos is not None else []))
    required = {rule.key: rule.required for rule in PARITY_RULES}
    effective_violations = [
        f"{key}: effective {effective[key]!r}, required {value!r}"
        for key, value in required.items() if effective[key] != value
    ]
    changed_silently = {
        key: {"requested": requested.get(key), "effective": effective[key]}
        for key in ("async_scheduling", "enable_prefix_caching", "enable_chunked_prefill", "max_num_seqs",
                    "max_num_batched_tokens", "seed", "enforce_eager")
        if key in requested and requested[key] != effective[key]
    }
    try:
        sampling_defaults = model_cfg.get_diff_sampling_param()
    except Exception as exc:  # report, never fail start-up on introspection
        sampling_defaults = {"error": str(exc)}
    head = await llm.collective_rpc("tether_head_info")
    if requested.get("quantization") == FP32_HEAD_QUANTIZATION:
        # An architecture whose logits do not go through a ParallelLMHead never gets the fp32 head.
        effective_violations += [
            f"lm_head: worker {i} holds {h['weight_dtype']} head weights, model.fp32_lm_head needs float32"
            for i, h in enumerate(head) if h["weight_dtype"] != "float32"
        ]
    return {
        "vllm_version": vllm.__version__,
        "model_path": str(model_path),
        "enforce_eager_setting": engine.enforce_eager,
        "effective": effective,
        "requested": {k: v for k, v in requested.items() if k not in ("model", "tokenizer")},
        "changed_by_engine": changed_silently,
        "generation_config_json": {
            "extra_stop_token_ids": extra_stop,
            "sampling_defaults_applied": sampling_defaults,
            "ignored_sampling_fields": sorted(k for k in gen if k not in ("eos_token_id", "bos_token_id",
                                                                      "pad_token_id", "transformers_version",
                                                                      "_from_model_config")),
        },
        "lm_head": head,
        "parity": {"configured_violations": violations, "effective_violations": effective_violations,
                   "allow_parity_break": engine.allow_parity_break},
    }


def completion_to_dict(completion: Completion) -> dict:
    data = asdict(completion)
    data["logprobs"] = completion.logprobs.tolist()
    data["versions"] = completion.versions.tolist()
    return data


class UpdateReports:
    """Where workers report the background phase of an update: a zmq PULL socket on loopback.

    vLLM's workers of one engine run on this host; each background thread pushes one JSON report
    per update. Waiting on a socket rather than polling the workers costs the engine nothing.
    """

    def __init__(self):
        import zmq
        import zmq.asyncio

        self._context = zmq.asyncio.Context()
        self._socket = self._context.socket(zmq.PULL)
        port = self._socket.bind_to_random_port("tcp://127.0.0.1")
        self.address = f"tcp://127.0.0.1:{port}"

    async def wait(self, update_id: str, count: int, timeout: float) -> list[dict]:
        """The `count` reports of `update_id`; reports of earlier updates (ones that timed out) are skipped."""
        reports: list[dict] = []
        deadline = time.monotonic() + timeout
        while len(reports) < count:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not await self._socket.poll(remaining * 1000):
                raise TimeoutError(f"{count - len(reports)} of {count} workers did not receive the update "
                                   f"within {timeout:.0f} s")
            report = json.loads(await self._socket.recv())
            if report.get("update_id") == update_id:
                reports.append(report)
        return sorted(reports, key=lambda r: r["rank"])

    def close(self) -> None:
        self._socket.close(linger=0)
        self._context.term()
