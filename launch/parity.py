"""`tether parity`: the parity doctor. Same prompts, same sampled tokens, actor engine against learner.

    tether parity --model DIR [--out DIR] [--prompts N] [--max-tokens N] [--no-bf16] [--device auto|cpu|cuda]

The migration diagnosis made reproducible: **backend first, integration second, algorithm last**.
Before touching an RL hyper-parameter, check that the engine's logprobs mean what the learner
computes. The doctor runs real vLLM V1 engines (tether.actor.engine.ActorEngine) and the learner's
own model and logprob code (tether.learner.model, tether.learner.logprobs) on the same prompts, scores
the actor's sampled tokens with the learner, and prints one row per configuration: the four
corrections all on, then each one off in turn (`actor.engine.allow_parity_break=true`):

  (i)   logprobs_mode=raw_logprobs instead of processed_logprobs;
  (ii)  vLLM's runtime defaults: prefix caching on, async scheduling on (forced off by vLLM on CPU:
        the effective value is reported), generation_config=auto;
  (iii) the keep-the-requests in-flight update replaced by abort-and-reload: abort every in-flight
        request, load the new weights, reset the prefix cache, regenerate the aborted requests from
        scratch. Done right this keeps parity; what it changes is cost, so the row also reports
        the tokens thrown away and the time no useful token was produced;
  (iv)  lm_head in the body's dtype instead of fp32. With an fp32 body this is a no-op, so the head
        rows use a bfloat16 body ("all on, bf16" against "head off, bf16").

Protocol of every fp32 row (an RL step in miniature): start the engine on weights W0; generate a
batch A on prompts that share a long prefix (as a group shares its prompt); update the weights to W1
in flight while A is generating (the row's update path); then generate batch B on the same prompts.
Rows are measured on batch B: tokens sampled entirely at W1, which the learner holding W1 must
reproduce to the fp32 floor. A prefix cache that survived the update, a head copy that was not
reloaded, or the wrong logprob mode all show up there. The bf16 rows start directly on W1.

Columns: mean and max |delta| (learner minus actor, per token), KL(actor || learner) estimated on
the actor's samples (k1: mean of logp_actor - logp_learner), the fraction of tokens with
|delta| > 1e-3, and the learner's metrics for one step on that batch: kl_new_old (k3, as the trainer
computes it), ratio_outside_trust_region (`outside TR`) and clipped_fraction (`clipped`) from the
learner's algorithm code (learner.algorithm, grpo by default) with synthetic group-normalised
advantages (clip activity depends only on the ratio and the advantage's sign). Tokens the
learner's top-k/top-p could not have produced (logprob -inf) are counted apart (`outside`), as the
trainer does.

Update-path check: the batch B of the all-on engine (requests started after an in-flight update)
against an engine freshly started on W1 with the same prompts and seeds: tokens must be identical
and logprobs equal to the fp32 floor, and the worker's lm_head checksum must equal W1's. The same
comparison for the runtime-defaults engine is printed as the contrast (a prefix-cache hit on KV from
W0). Writes parity.json and parity.png to --out (default <run_dir>/parity or ./runs/parity).

Devices: both sides run on the same device type (--device, default auto: CUDA when present), as in
a run: the engines on the first visible device; the learner's scorer and its weight sender on the
second GPU when there is one, with the weight update over NCCL. With a single GPU the scorer shares
it and the update travels over gloo (NCCL cannot have two ranks on one GPU). The engines use the
actor's defaults there too (actor.engine.enforce_eager=auto: CUDA graphs on CUDA), so the all-on row
is the parity of the configuration a run uses. The report names the device of each side.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tether.common.net import free_port

FLOOR = 1e-5
"""Mean |delta| at or below this is the fp32 floor (measured ~1e-7; headroom for batch effects)."""
DELTA_THRESHOLD = 1e-3
UPDATE_CHECK_MAX = 1e-5
"""Post-update logprobs against a fresh engine: max |delta| allowed for the check to pass."""


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.7
    top_k: int = 20
    top_p: float = 0.9


@dataclass(frozen=True)
class Variant:
    """One engine configuration of the doctor."""

    key: str
    label: str
    engine_overrides: dict = field(default_factory=dict)
    dtype: str = "float32"
    fp32_lm_head: bool = True
    update: str = "keep"
    """keep: in-flight update W0 -> W1 with requests kept; abort: abort-and-reload; none: start on W1."""


FP32_VARIANTS = (
    Variant("all_on", "all on (fp32)"),
    Variant("raw_logprobs", "(i) raw logprobs", {"logprobs_mode": "raw_logprobs"}),
    Variant("runtime_defaults", "(ii) runtime defaults",
            {"enable_prefix_caching": True, "async_scheduling": True, "generation_config": "auto"}),
    Variant("abort_reload", "(iii) abort-and-reload", update="abort"),
)
BF16_VARIANTS = (
    Variant("all_on_bf16", "all on, bf16 body", dtype="bfloat16", update="none"),
    Variant("head_off_bf16", "(iv) head in body dtype (bf16)", dtype="bfloat16", fp32_lm_head=False, update="none"),
)


# ------------------------------------------------------------------------- weights and prompts
def write_model_dir(src: Path, dst: Path, state: dict) -> Path:
    """A copy of the HF model directory `src` whose weights are `state` (safetensors)."""
    from safetensors.torch import save_file

    dst.mkdir(parents=True, exist_ok=True)
    for item in src.iterdir():
        if item.is_file() and not item.name.endswith(".safetensors") and item.name != "model.safetensors.index.json":
            shutil.copy2(item, dst / item.name)
    save_file({k: v.contiguous() for k, v in state.items()}, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def make_prompts(n: int, prefix_len: int, seed: int) -> list[list[int]]:
    """Prompts sharing a `prefix_len`-token prefix (longer than a KV block, so a prefix cache can hit)."""
    rng = np.random.default_rng(seed)
    prefix = rng.integers(3, 250, prefix_len).tolist()
    return [prefix + rng.integers(3, 250, 4 + i % 5).tolist() for i in range(n)]


@dataclass(frozen=True)
class Devices:
    """Where each side of the doctor runs."""

    actor: str
    """Device type of the engines ("cpu" or "cuda"; vLLM takes the first visible device)."""
    learner: str
    """torch device of the learner's scorer and weight sender, e.g. "cuda:1"."""
    backend: str
    """Backend of the weight update: nccl between two GPUs, else gloo."""

    @classmethod
    def resolve(cls, device: str = "auto") -> Devices:
        import torch

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cpu":
            return cls("cpu", "cpu", "gloo")
        if not torch.cuda.is_available():
            raise SystemExit("tether parity: --device cuda, but torch sees no CUDA device")
        if torch.cuda.device_count() >= 2:
            return cls("cuda", "cuda:1", "nccl")
        return cls("cuda", "cuda:0", "gloo")

    def describe(self) -> dict:
        import torch

        def name(device: str) -> str:
            if device.startswith("cuda"):
                return f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
            return device

        return {"actor": name("cuda:0" if self.actor == "cuda" else "cpu"), "learner": name(self.learner),
                "weight_update_backend": self.backend}


class _UpdateSource:
    """A TCPStore (the broker's role) and a sender process (the learner's) for one weight update."""

    def __init__(self, state_path: Path, specs, epoch: int, version: int, devices: Devices,
                 bucket_bytes: int = 8 << 20):
        from torch.distributed import TCPStore

        from tether.actor.testing import local_group_key, send_states
        from tether.common.messages import WeightUpdate

        port = free_port()
        self.store = TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False)
        self.announce = WeightUpdate(version=version, lineage="local", epoch=epoch, group_key=local_group_key(epoch),
                                     group_host="127.0.0.1", group_port=port, world_size=2, first_rank=1,
                                     tensors=specs, bucket_bytes=bucket_bytes)
        self.process = mp.get_context("spawn").Process(
            target=send_states, args=(port, [(epoch, str(state_path))], bucket_bytes),
            kwargs={"backend": devices.backend, "device": devices.learner})
        # Started before the engine pauses, as a learner is ready before it announces.
        self.process.start()

    def close(self) -> None:
        self.process.join(120)
        if self.process.exitcode != 0:
            raise RuntimeError(f"weight sender exited with {self.process.exitcode}")
        del self.store


# ------------------------------------------------------------------------- actor side
def _params(sampling: Sampling, max_tokens: int, seed: int):
    from vllm import SamplingParams

    return SamplingParams(temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p,
                          max_tokens=max_tokens, logprobs=0, seed=seed, ignore_eos=True)


async def _batch(engine, prompts, sampling, max_tokens, seed0, tag):
    return await asyncio.gather(*[engine.generate(p, _params(sampling, max_tokens, seed0 + i), f"{tag}-{i}")
                                  for i, p in enumerate(prompts)])


async def _streaming(engine, prompts, sampling, max_tokens, seed0, tag, counts):
    """Start batch requests as streams; `counts[i]` tracks tokens so far. Returns the tasks."""
    from vllm.sampling_params import RequestOutputKind

    from tether.actor.engine import completion_from_output

    async def one(i, prompt):
        params = _params(sampling, max_tokens, seed0 + i)
        params.output_kind = RequestOutputKind.CUMULATIVE
        final = None
        async for final in engine.stream(prompt, params, f"{tag}-{i}"):
            counts[i] = len(final.outputs[0].token_ids)
        if final is None or final.outputs[0].finish_reason == "abort" or not final.finished:
            return None  # aborted
        return completion_from_output(final)

    tasks = [asyncio.ensure_future(one(i, p)) for i, p in enumerate(prompts)]
    while min(counts) < 2 and not all(t.done() for t in tasks):  # every request past prefill and decoding
        await asyncio.sleep(0.005)
    return tasks


async def keep_cycle(engine, prompts, sampling, max_tokens, source: _UpdateSource) -> dict:
    """Batch A at W0, in-flight keep-the-requests update to W1 mid-batch, then batch B at W1."""
    counts = [0] * len(prompts)
    tasks = await _streaming(engine, prompts, sampling, max_tokens, 1000, "A", counts)
    tokens_at_update = sum(counts)
    result = await engine.update_weights(source.announce)
    batch_a = await asyncio.gather(*tasks)
    source.close()
    batch_b = await _batch(engine, prompts, sampling, max_tokens, 2000, "B")
    spanning = sum(1 for c in batch_a if c is not None and len(set(c.versions.tolist())) > 1)
    discarded = sum(counts[i] for i, c in enumerate(batch_a) if c is None)  # measured, as in abort_cycle
    return {"batch_a": batch_a, "batch_b": batch_b, "pause_s": result.pause_s, "tokens_discarded": discarded,
            "tokens_at_update": tokens_at_update, "sequences_spanning_update": spanning,
            "update_to_batch_done_s": None}


async def abort_cycle(engine, prompts, sampling, max_tokens, source: _UpdateSource) -> dict:
    """Batch A at W0, then abort-and-reload mid-batch: abort all, load W1, reset the prefix cache,
    regenerate the aborted requests from scratch; batch B at W1 after that."""
    counts = [0] * len(prompts)
    tasks = await _streaming(engine, prompts, sampling, max_tokens, 1000, "A", counts)
    start = time.perf_counter()
    await engine.llm.pause_generation(mode="abort", clear_cache=True)
    batch_a = await asyncio.gather(*tasks)
    discarded = sum(counts[i] for i, c in enumerate(batch_a) if c is None)
    ann = source.announce
    # The same receive and load as an in-flight update, but with the requests already aborted.
    await engine.commit_update(await engine.receive_update(ann))
    await engine.llm.reset_prefix_cache()  # no KV written by W0 may be reused
    await engine.llm.update_weight_version(str(ann.version))
    engine.version = ann.version
    await engine.llm.resume_generation()
    pause_s = time.perf_counter() - start
    source.close()
    aborted = [i for i, c in enumerate(batch_a) if c is None]
    redo = await asyncio.gather(*[engine.generate(prompts[i], _params(sampling, max_tokens, 1000 + i), f"A2-{i}")
                                  for i in aborted])
    redo_s = time.perf_counter() - start
    batch_b = await _batch(engine, prompts, sampling, max_tokens, 2000, "B")
    return {"batch_a": batch_a, "batch_b": batch_b, "pause_s": pause_s, "tokens_discarded": discarded,
            "tokens_at_update": sum(counts), "sequences_spanning_update": 0, "regenerated": len(redo),
            "update_to_batch_done_s": redo_s}


# ------------------------------------------------------------------------- learner side
class LearnerScorer:
    """The learner's model (tether.learner.model.load_policy, unsharded, no grad) and logprob code,
    on the learner's device."""

    def __init__(self, model_dir: Path, body_dtype: str, sampling: Sampling, device: str = "cpu"):
        import torch

        from tether.learner.model import load_policy

        self.sampling = sampling
        self.device = torch.device(device)
        self.model = load_policy(model_dir, self.device, getattr(torch, body_dtype), fp32_lm_head=True,
                                 shard=False, trainable=False)

    def score(self, completions) -> list[np.ndarray]:
        import torch

        from tether.learner.completion import completion_logprobs

        s = self.sampling
        out = []
        with torch.no_grad():
            for c in completions:
                ids = torch.tensor([c.prompt_token_ids + c.token_ids], device=self.device)
                n_prompt, n = len(c.prompt_token_ids), len(c.token_ids)
                positions = torch.arange(n_prompt - 1, n_prompt + n - 1, device=self.device)[None]
                logprobs, _ = completion_logprobs(self.model, ids, torch.ones_like(ids), positions,
                                                  torch.tensor([c.token_ids], device=self.device),
                                                  [(s.temperature, s.top_k, s.top_p)])
                out.append(logprobs[0].cpu().numpy().astype(np.float64))
        return out


def row_metrics(actor: list[np.ndarray], learner: list[np.ndarray], algorithm: str, seed: int = 0,
                group_size: int = 4) -> dict:
    """Parity columns and one step's learner metrics for per-sequence actor/learner logprobs."""
    import torch

    from tether.learner.algorithms import LossInput, LossParams, get_algorithm

    a = np.concatenate(actor).astype(np.float64)
    lp = np.concatenate(learner)
    finite = np.isfinite(lp)
    d = lp[finite] - a[finite]
    absd = np.abs(d)
    # One step of the learner's algorithm on this batch, padded [B, L]. Rewards are synthetic
    # (seeded); advantages come from the algorithm's own function over groups of `group_size`.
    algo = get_algorithm(algorithm)
    b, length = len(actor), max(len(x) for x in actor)
    new = torch.zeros(b, length)
    old = torch.zeros(b, length)
    mask = torch.zeros(b, length)
    for i, (x, y) in enumerate(zip(actor, learner, strict=True)):
        ok = np.isfinite(y)
        new[i, :len(y)] = torch.tensor(np.where(ok, y, x), dtype=torch.float32)
        old[i, :len(x)] = torch.tensor(x, dtype=torch.float32)
        mask[i, :len(y)] = torch.tensor(ok, dtype=torch.float32)
    rewards = torch.tensor(np.random.default_rng(seed).random(b), dtype=torch.float32)
    advantages = algo.advantages(rewards, torch.arange(b) // group_size)
    out = algo.loss(LossInput(logprobs=new, old_logprobs=old, advantages=advantages, mask=mask), LossParams())
    dd = (new - old)[mask > 0]
    return {
        "tokens": int(a.size),
        "outside_support": int((~finite).sum()),
        "mean_abs_delta": float(absd.mean()) if absd.size else float("nan"),
        "max_abs_delta": float(absd.max()) if absd.size else float("nan"),
        "kl_actor_learner_k1": float(-d.mean()) if d.size else float("nan"),
        "frac_abs_delta_gt_1e-3": float((absd > DELTA_THRESHOLD).mean()) if absd.size else float("nan"),
        "kl_new_old": float((torch.exp(dd) - 1 - dd).mean()),
        "ratio_outside_trust_region": float(out.metrics["ratio_outside_trust_region"]),
        "clipped_fraction": float(out.metrics["clipped_fraction"]),
    }


def compare_to_fresh(after_update, fresh) -> dict:
    """Post-update completions against a fresh engine's (same prompts, seeds): tokens and logprobs."""
    same = [a.token_ids == f.token_ids for a, f in zip(after_update, fresh, strict=True)]
    deltas = []
    for a, f in zip(after_update, fresh, strict=True):
        # Up to the first differing token only: from there on the two condition on different text.
        n = next((i for i, (x, y) in enumerate(zip(a.token_ids, f.token_ids, strict=False)) if x != y),
                 min(len(a.token_ids), len(f.token_ids)))
        deltas.append(np.abs(a.logprobs[:n].astype(np.float64) - f.logprobs[:n]))
    d = np.concatenate(deltas) if deltas else np.zeros(0)
    return {"sequences": len(same), "identical_sequences": int(sum(same)),
            "mean_abs_delta": float(d.mean()) if d.size else float("nan"),
            "max_abs_delta": float(d.max()) if d.size else float("nan")}


# ------------------------------------------------------------------------- driver
async def _run_variant(variant: Variant, model_w0: Path, model_w1: Path, w1_state_path: Path, specs, prompts,
                       sampling, max_tokens, epoch: int, devices: Devices, head_name: str) -> dict:
    from tether.actor.engine import ActorEngine
    from tether.common.config import EngineConfig, ModelConfig

    engine_cfg = EngineConfig(max_num_seqs=64, max_num_batched_tokens=2048, max_model_len=512,
                              allow_parity_break=bool(variant.engine_overrides), **variant.engine_overrides)
    model_cfg = ModelConfig(dtype=variant.dtype, fp32_lm_head=variant.fp32_lm_head)
    start = time.perf_counter()
    engine = await ActorEngine.start(engine_cfg, model_cfg, str(model_w1 if variant.update == "none" else model_w0),
                                     device=devices.actor, weight_backend=devices.backend)
    startup_s = time.perf_counter() - start
    try:
        if variant.update == "none":
            cycle = {"batch_a": [], "batch_b": await _batch(engine, prompts, sampling, max_tokens, 2000, "B"),
                     "pause_s": None, "tokens_discarded": 0, "tokens_at_update": 0, "sequences_spanning_update": 0,
                     "update_to_batch_done_s": None}
        else:
            source = _UpdateSource(w1_state_path, specs, epoch=epoch, version=1, devices=devices)
            cycle_fn = keep_cycle if variant.update == "keep" else abort_cycle
            cycle = await cycle_fn(engine, prompts, sampling, max_tokens, source)
        cycle["head_checksum"] = (await engine.llm.collective_rpc("tether_param_checksum", args=(head_name,)))[0]
        cycle["effective"] = engine.report["effective"]
        cycle["startup_s"] = startup_s
        return cycle
    finally:
        engine.shutdown()


def run_doctor(model: Path, out_dir: Path, *, prompts: int = 16, max_tokens: int = 32, prefix_len: int = 160,
               sampling: Sampling = Sampling(), perturb: float = 0.05, bf16: bool = True, algorithm: str = "grpo",
               seed: int = 0, device: str = "auto") -> dict:
    """Run every configuration and the update-path check; write parity.json and parity.png; return the report."""
    import torch

    from tether.actor.testing import load_state, perturbed_state
    from tether.common.weight_group import tensor_specs

    out_dir.mkdir(parents=True, exist_ok=True)
    devices = Devices.resolve(device)
    prompt_ids = make_prompts(prompts, prefix_len, seed)
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tether-parity-") as tmp:
        tmp = Path(tmp)
        w0 = load_state(model)
        w1 = perturbed_state(w0, perturb, seed=seed + 1)  # the "next step's" weights
        model_w1 = write_model_dir(Path(model), tmp / "w1", w1)
        w1_path = tmp / "w1.pt"
        torch.save(w1, w1_path)
        specs = tensor_specs(w1.items())
        # A tied model stores its head matrix once, under the embedding's name.
        head_name = "lm_head.weight" if "lm_head.weight" in w1 else "model.embed_tokens.weight"
        w1_head_checksum = float(w1[head_name].double().sum())

        variants = list(FP32_VARIANTS) + ([Variant("fresh_w1", "fresh engine on W1", update="none")])
        if bf16:
            variants += list(BF16_VARIANTS)
        runs = {}
        for epoch, variant in enumerate(variants, start=1):
            print(f"[parity] engine {epoch}/{len(variants)}: {variant.label}", flush=True)
            runs[variant.key] = asyncio.run(_run_variant(variant, Path(model), model_w1, w1_path, specs, prompt_ids,
                                                         sampling, max_tokens, epoch, devices, head_name))
        scorers = {"float32": LearnerScorer(model_w1, "float32", sampling, devices.learner)}
        if bf16:
            scorers["bfloat16"] = LearnerScorer(model_w1, "bfloat16", sampling, devices.learner)

        rows = []
        for variant in variants:
            if variant.key == "fresh_w1":
                continue
            run = runs[variant.key]
            actor = [c.logprobs for c in run["batch_b"]]
            learner = scorers[variant.dtype].score(run["batch_b"])
            row = {"key": variant.key, "config": variant.label, "body_dtype": variant.dtype,
                   **row_metrics(actor, learner, algorithm, seed),
                   "update_pause_s": run["pause_s"], "tokens_discarded": run["tokens_discarded"],
                   "update_to_batch_done_s": run["update_to_batch_done_s"],
                   "engine_startup_s": run["startup_s"],
                   "effective": {k: run["effective"][k] for k in ("logprobs_mode", "enable_prefix_caching",
                                                                  "async_scheduling", "generation_config", "dtype",
                                                                  "quantization")}}
            rows.append(row)

        fresh = runs["fresh_w1"]["batch_b"]
        on = runs["all_on"]
        check = compare_to_fresh(on["batch_b"], fresh)
        check["head_checksum_after_update"] = on["head_checksum"]
        check["head_checksum_w1"] = w1_head_checksum
        head_ok = abs(on["head_checksum"] - w1_head_checksum) <= 1e-6 * max(1.0, abs(w1_head_checksum))
        check["passed"] = bool(check["identical_sequences"] == check["sequences"]
                               and check["max_abs_delta"] <= UPDATE_CHECK_MAX and head_ok)
        contrast = compare_to_fresh(runs["runtime_defaults"]["batch_b"], fresh)
    report = {
        "model": str(model), "devices": devices.describe(),
        "enforce_eager": runs["all_on"]["effective"]["enforce_eager"],
        "cudagraph_mode": runs["all_on"]["effective"].get("cudagraph_mode"),
        "prompts": prompts, "max_tokens": max_tokens, "prefix_len": prefix_len,
        "sampling": sampling.__dict__, "perturb": perturb, "algorithm": algorithm, "seed": seed,
        "floor": FLOOR, "rows": rows,
        "update_check": check, "update_check_runtime_defaults_contrast": contrast,
        "head_rows_note": "lm_head rows use a bfloat16 body: with an fp32 body the fp32 head is a no-op",
        "diagnosis_order": "backend first, integration second, algorithm last",
        "wall_s": time.perf_counter() - t_start,
    }
    (out_dir / "parity.json").write_text(json.dumps(report, indent=2, default=str))
    plot(report, out_dir / "parity.png")
    return report


def plot(report: dict, path: Path) -> Path:
    """Bar chart: mean and max |delta| per configuration (log scale), the floor marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows"]
    labels = [r["config"] for r in rows]
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(10, 4.5))
    tiny = 1e-9  # an exact 0 cannot be drawn on a log axis
    ax.bar(x - 0.2, [max(r["mean_abs_delta"], tiny) for r in rows], 0.4, label="mean |delta logprob|")
    ax.bar(x + 0.2, [max(r["max_abs_delta"], tiny) for r in rows], 0.4, label="max |delta logprob|")
    ax.axhline(report["floor"], color="k", ls="--", lw=1, label=f"fp32 floor bound {report['floor']:g}")
    ax.set_yscale("log")
    ax.set_xticks(x, labels, rotation=20, ha="right", fontsize=8)
    ax.set_title("tether parity doctor: learner minus actor on the actor's sampled tokens")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def format_report(report: dict) -> str:
    """The doctor's printed table and verdicts."""
    s = report["sampling"]
    lines = [
        "tether parity doctor: backend first, integration second, algorithm last.",
        f"model {report['model']}; {report['prompts']} prompts x {report['max_tokens']} tokens, shared prefix "
        f"{report['prefix_len']}; T={s['temperature']} top_k={s['top_k']} top_p={s['top_p']}; "
        f"learner algorithm {report['algorithm']}",
        f"devices: actor {report['devices']['actor']} (enforce_eager {report['enforce_eager']}, CUDA graphs "
        f"{report['cudagraph_mode']}), learner {report['devices']['learner']}, weight update over "
        f"{report['devices']['weight_update_backend']}",
        "fp32 rows: tokens of batch B, sampled after an update W0 -> W1 through the row's update path;"
        " bf16 rows: engines started on W1 (" + report["head_rows_note"] + ").",
        "",
        f"{'configuration':34} {'mean|d|':>9} {'max|d|':>9} {'KL(a||l)':>9} {'|d|>1e-3':>8} {'outside':>7} "
        f"{'kl_new_old':>10} {'outside TR':>10} {'clipped':>7} {'pause_s':>7} {'discarded':>9}",
    ]
    for r in report["rows"]:
        pause = "-" if r["update_pause_s"] is None else f"{r['update_pause_s']:.2f}"
        lines.append(f"{r['config']:34} {r['mean_abs_delta']:9.2e} {r['max_abs_delta']:9.2e} "
                     f"{r['kl_actor_learner_k1']:9.2e} {r['frac_abs_delta_gt_1e-3']:8.3f} {r['outside_support']:7d} "
                     f"{r['kl_new_old']:10.2e} {r['ratio_outside_trust_region']:10.3f} {r['clipped_fraction']:7.3f} "
                     f"{pause:>7} {r['tokens_discarded']:9d}")
    c = report["update_check"]
    lines += [
        "",
        f"update path check (requests started after an in-flight update vs an engine freshly loaded with W1): "
        f"{c['identical_sequences']}/{c['sequences']} sequences identical, mean |d| {c['mean_abs_delta']:.2e}, "
        f"max |d| {c['max_abs_delta']:.2e} (<= {UPDATE_CHECK_MAX:g}), lm_head checksum "
        f"{c['head_checksum_after_update']:.6f} vs W1 {c['head_checksum_w1']:.6f}: "
        + ("PASS" if c["passed"] else "FAIL"),
    ]
    k = report["update_check_runtime_defaults_contrast"]
    lines.append(f"  contrast, runtime defaults (prefix cache kept across the update): {k['identical_sequences']}/"
                 f"{k['sequences']} identical, mean |d| {k['mean_abs_delta']:.2e}, max |d| {k['max_abs_delta']:.2e}")
    ab = next((r for r in report["rows"] if r["key"] == "abort_reload"), None)
    if ab is not None:
        lines.append(f"  (iii) abort-and-reload keeps parity when done right; its cost is {ab['tokens_discarded']} "
                     f"generated tokens thrown away and {ab['update_to_batch_done_s']:.2f} s from the abort until the "
                     "aborted requests were regenerated.")
    lines.append("A row far above the floor is a backend problem: fix it before any RL hyper-parameter.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """`tether parity`: run the doctor, print the table, write JSON and PNG; 1 if the update check fails."""
    parser = argparse.ArgumentParser(prog="tether parity", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="Hugging Face model directory (tied or untied lm_head)")
    parser.add_argument("--out", default="", help="output directory (default <run_dir>/parity or ./runs/parity)")
    parser.add_argument("--run-dir", default="", help="run directory whose parity/ subfolder gets the output")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--prefix-len", type=int, default=160,
                        help="shared prompt prefix; longer than a KV block so a prefix cache can hit")
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--top-k", type=int, default=20)
    parser.add_argument("--top-p", type=float, default=0.9)
    parser.add_argument("--perturb", type=float, default=0.05, help="relative weight noise from W0 to W1")
    parser.add_argument("--algorithm", default="grpo")
    parser.add_argument("--no-bf16", action="store_true", help="skip the two bf16 lm_head rows (two engines fewer)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="device type of both sides (default auto: cuda when present)")
    args = parser.parse_args(argv)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    out = Path(args.out) if args.out else (Path(args.run_dir) / "parity" if args.run_dir else Path("runs/parity"))
    report = run_doctor(Path(args.model), out, prompts=args.prompts, max_tokens=args.max_tokens,
                        prefix_len=args.prefix_len,
                        sampling=Sampling(args.temperature, args.top_k, args.top_p), perturb=args.perturb,
                        bf16=not args.no_bf16, algorithm=args.algorithm, seed=args.seed, device=args.device)
    print(format_report(report))
    print(f"wrote {out / 'parity.json'} and {out / 'parity.png'}")
    return 0 if report["update_check"]["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
