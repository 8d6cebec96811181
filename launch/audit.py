"""`tether audit RUN_DIR`: recompute archived rollouts' logprobs offline with the weights that produced them.

For every weight version found in the rollout archive (run.keep_rollouts) whose weights are still on
disk (a kept checkpoint's hf/ export, or model.path for version 0), the completion tokens generated
at that version are scored again by a plain transformers forward over prompt + completion, with
tether's own processing (tether.learner.logprobs: temperature, top-k, top-p), and compared with the
logprobs the actor sent. Reported per version, n / mean / p99 / max |difference|, by kind of token:

- single-version: the whole sequence came from this version; it must match to the parity floor.
- before an update: tokens of a sequence that an in-flight update reached later, generated before
  it; their context is all from this version, so they must match as well.
- after an update: tokens generated after an in-flight update, by the new weights over KV written by
  the old ones. A full recompute with the new weights differs from that by design (reported, not a fault).

Versions that cannot be audited are listed with the reason (no checkpoint kept for that version).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

KINDS = ("single-version", "before an update", "after an update")
KIND_NOTES = {"after an update": "expected to differ: new weights over old KV"}


@dataclass
class Row:
    version: int
    kind: str
    sequences: int
    tokens: int
    mean: float
    p99: float
    max: float
    outside_support: int = 0
    """Tokens the recomputed processed distribution gives probability 0 (-inf logprob); not in the stats."""


@dataclass
class NotAudited:
    versions: list[int]
    reason: str
    tokens: int


@dataclass
class AuditReport:
    run_dir: str
    rollouts: int
    checkpoints: dict[int, str]
    rows: list[Row] = field(default_factory=list)
    not_audited: list[NotAudited] = field(default_factory=list)


def _run_model_settings(run_dir: Path):
    """model.path, model.dtype, model.fp32_lm_head from the run's resolved config (defaults without one)."""
    from tether.common.config import load_config

    for name in ("learner", "run"):
        path = run_dir / "config" / f"{name}.yaml"
        if path.is_file():
            return load_config(path).model
    return load_config(None).model


def weights_by_version(run_dir: Path) -> dict[int, Path]:
    """Hugging Face directories holding each version's weights: kept checkpoints, and model.path as version 0."""
    from tether.learner.checkpoint import checkpoint_versions

    found = {v: p / "hf" for v, p in checkpoint_versions(run_dir).items() if (p / "hf" / "config.json").is_file()}
    if 0 not in found:
        model = _run_model_settings(run_dir)
        base = Path(model.path) if model.path else run_dir / "tiny-model"
        if (base / "config.json").is_file():
            found[0] = base
    return dict(sorted(found.items()))


def load_reference(hf_dir: Path, dtype_name: str, fp32_lm_head: bool):
    """A plain transformers causal LM: body in the run's dtype, lm_head kept fp32 when the run's was."""
    import torch
    from transformers import AutoModelForCausalLM

    body_dtype = {"auto": torch.float32, "float32": torch.float32, "bfloat16": torch.bfloat16,
                  "float16": torch.float16}[dtype_name]  # auto is fp32 on CPU, where the audit runs
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    if body_dtype != torch.float32:
        model.model.to(body_dtype)
        if not fp32_lm_head:
            model.lm_head.to(body_dtype)
    return model


def recompute(model, rows: list[dict], batch_size: int = 32) -> list[np.ndarray]:
    """Processed logprobs of each row's completion tokens (one teacher-forced forward per batch)."""
    import torch

    from tether.learner.logprobs import processed_logprobs

    out: list[np.ndarray | None] = [None] * len(rows)
    by_spec: dict[tuple, list[int]] = {}
    for i, row in enumerate(rows):
        by_spec.setdefault((row["temperature"], row["top_k"], row["top_p"]), []).append(i)
    head = model.lm_head.weight
    with torch.no_grad():
        for (temperature, top_k, top_p), indices in by_spec.items():
            for start in range(0, len(indices), batch_size):
                chunk = indices[start:start + batch_size]
                seqs = [rows[i]["prompt_ids"] + rows[i]["completion_ids"] for i in chunk]
                width = max(len(s) for s in seqs)
                ids = torch.zeros(len(chunk), width, dtype=torch.long)
                mask = torch.zeros(len(chunk), width, dtype=torch.long)
                for j, seq in enumerate(seqs):
                    ids[j, :len(seq)] = torch.tensor(seq)
                    mask[j, :len(seq)] = 1
                hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
                for j, i in enumerate(chunk):
                    p, c = len(rows[i]["prompt_ids"]), len(rows[i]["completion_ids"])
                    h = hidden[j, p - 1:p + c - 1]
                    logits = torch.nn.functional.linear(h.to(head.dtype), head).float()
                    targets = torch.tensor(rows[i]["completion_ids"])
                    out[i] = processed_logprobs(logits, targets, float(temperature), int(top_k), float(top_p)).numpy()
    return out  # type: ignore[return-value]


def token_kinds(versions: np.ndarray) -> list[str]:
    """Each token's kind (KINDS) from the sequence's per-token versions."""
    first = versions[0]
    pure = bool((versions == first).all())
    return ["single-version" if pure else ("before an update" if v == first else "after an update") for v in versions]


def _ranges(versions: list[int]) -> str:
    spans, start = [], None
    for i, v in enumerate(versions):
        if start is None:
            start = v
        if i + 1 == len(versions) or versions[i + 1] != v + 1:
            spans.append(str(start) if start == v else f"{start}-{v}")
            start = None
    return ", ".join(spans)


def audit(run_dir: str | Path, *, sample: int = 0, seed: int = 0, batch_size: int = 32) -> AuditReport:
    """Audit the archive of `run_dir`; `sample` > 0 checks at most that many single-version sequences
    and as many update-spanning ones per version."""
    import transformers

    from tether.learner.archive import archive_parts, read_archive

    transformers.utils.logging.disable_progress_bar()  # the report is the output, not per-checkpoint bars
    run_dir = Path(run_dir)
    parts, _ = archive_parts(run_dir)
    if not parts:
        raise SystemExit(f"tether audit: {run_dir} has no rollout archive (run with run.keep_rollouts=true)")
    table = read_archive(run_dir, columns=["rollout_id", "prompt_ids", "completion_ids", "logprobs", "versions",
                                           "temperature", "top_k", "top_p"])
    rows = [r for r in table.to_pylist() if r["completion_ids"]]
    weights = weights_by_version(run_dir)
    model_settings = _run_model_settings(run_dir)
    report = AuditReport(run_dir=str(run_dir), rollouts=len(rows), checkpoints={v: str(p) for v, p in weights.items()})

    by_version: dict[int, list[int]] = {}
    token_counts: dict[int, int] = {}
    for i, row in enumerate(rows):
        versions = np.asarray(row["versions"])
        for v in np.unique(versions).tolist():
            by_version.setdefault(v, []).append(i)
            token_counts[v] = token_counts.get(v, 0) + int((versions == v).sum())
    missing = sorted(v for v in by_version if v not in weights)
    if missing:
        kept = ", ".join(str(v) for v in weights) or "none"
        report.not_audited.append(NotAudited(
            versions=missing, tokens=sum(token_counts[v] for v in missing),
            reason=f"no checkpoint kept for that version (weights on disk: versions {kept}; "
                   "see learner.checkpoint_interval and learner.keep_checkpoint_every)"))

    rng = random.Random(seed)
    for version in sorted(v for v in by_version if v in weights):
        chosen = by_version[version]
        if sample:
            # Sampled separately: sequences an update reached are rare and would drown among pure ones.
            pure = [i for i in chosen if len(set(rows[i]["versions"])) == 1]
            spanning = [i for i in chosen if len(set(rows[i]["versions"])) > 1]
            chosen = sorted(rng.sample(pure, min(sample, len(pure))) + rng.sample(spanning, min(sample, len(spanning))))
        model = load_reference(weights[version], model_settings.dtype, model_settings.fp32_lm_head)
        recomputed = recompute(model, [rows[i] for i in chosen], batch_size)
        diffs: dict[str, list[np.ndarray]] = {k: [] for k in KINDS}
        sequences = dict.fromkeys(KINDS, 0)
        outside = dict.fromkeys(KINDS, 0)
        for i, ours in zip(chosen, recomputed, strict=True):
            versions = np.asarray(rows[i]["versions"])
            actor = np.asarray(rows[i]["logprobs"], dtype=np.float64)
            kinds = np.asarray(token_kinds(versions))
            at_version = versions == version
            for kind in KINDS:
                sel = at_version & (kinds == kind)
                if not sel.any():
                    continue
                sequences[kind] += 1
                finite = np.isfinite(ours[sel])
                outside[kind] += int((~finite).sum())
                diffs[kind].append(np.abs(ours[sel][finite].astype(np.float64) - actor[sel][finite]))
        for kind in KINDS:
            if not diffs[kind]:
                continue
            d = np.concatenate(diffs[kind])
            report.rows.append(Row(version=version, kind=kind, sequences=sequences[kind], tokens=int(d.size),
                                   mean=float(d.mean()) if d.size else float("nan"),
                                   p99=float(np.quantile(d, 0.99)) if d.size else float("nan"),
                                   max=float(d.max()) if d.size else float("nan"), outside_support=outside[kind]))
        del model
    return report


def format_report(report: AuditReport) -> str:
    weights = ", ".join(f"{v}" for v in report.checkpoints) or "none"
    lines = [
        f"tether audit: {report.run_dir}: {report.rollouts} archived rollouts; weights on disk for versions {weights}",
        "recomputed with a plain transformers forward and tether's processed logprobs; |difference| to the actor's",
        "",
        f"{'version':>7}  {'tokens of':<18} {'sequences':>9} {'tokens':>8} {'mean':>9} {'p99':>9} {'max':>9}",
    ]
    for r in report.rows:
        note = f"  ({KIND_NOTES[r.kind]})" if r.kind in KIND_NOTES else ""
        if r.outside_support:
            note += f"  [{r.outside_support} tokens outside the recomputed top-k/top-p set]"
        lines.append(f"{r.version:>7}  {r.kind:<18} {r.sequences:>9} {r.tokens:>8} {r.mean:>9.1e} {r.p99:>9.1e} "
                     f"{r.max:>9.1e}{note}")
    if not report.rows:
        lines.append("  (no version could be audited)")
    for item in report.not_audited:
        lines += ["", f"not audited: versions {_ranges(item.versions)} ({item.tokens} tokens): {item.reason}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """`tether audit RUN_DIR [--sample N] [--json FILE]`: recompute archived logprobs per version."""
    parser = argparse.ArgumentParser(prog="tether audit", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="run directory with rollouts/ (run.keep_rollouts) and checkpoints/")
    parser.add_argument("--sample", type=int, default=0,
                        help="per version, at most this many single-version and as many update-spanning sequences (0: all)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sample")
    parser.add_argument("--json", dest="json_path", help="also write the report as JSON to this file")
    args = parser.parse_args(argv)
    if args.sample < 0:
        parser.error("--sample must be >= 0")
    if not Path(args.run_dir).is_dir():
        parser.exit(2, f"tether audit: {args.run_dir} is not a directory\n")
    import transformers

    transformers.logging.set_verbosity_error()
    report = audit(args.run_dir, sample=args.sample, seed=args.seed)
    print(format_report(report))
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(asdict(report), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
