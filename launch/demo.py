"""`tether demo`: the embedded end-to-end job on a machine with no GPU and no model hub.

1. Build (or reuse) the embedded tiny model and measure its held-out greedy accuracy with vLLM V1.
2. Train it with the whole system: a broker, N actors (vLLM V1, in-flight weight updates) and a
   torchrun learner of R ranks (FSDP2), with live progress from the learner's metrics. Unless told
   otherwise (placement.*, --actor-cpus/--learner-cpus, --shared-cpus), actors and learner run on
   disjoint halves of the machine's CPUs, standing in for the separate GPUs they have on a cluster:
   sharing every core, each would wait for the other's time slices and in-flight updates could not
   overlap generation with training.
3. Measure the trained model's held-out greedy accuracy the same way, plot the run's metrics,
   audit a sample of the archived rollouts against the kept checkpoints (tether audit) and write a
   summary.

Everything lands in the run directory: resolved configs, logs, metrics.jsonl, checkpoints,
the rollout archive, metrics.png, audit.json and summary.json. The console shows tether's progress
and results only: engine output (vLLM's own logging, evaluation warnings) goes to logs/.
Ctrl-C or SIGTERM stops every daemon.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from tether.common.config import RunConfig, load_config, load_config_or_exit, save_resolved
from tether.common.logging import configure_logging, get_logger
from tether.launch.placement import available_cpus_here, format_ids, parse_ids, plan, split
from tether.launch.plot import plot_metrics
from tether.launch.supervisor import ProcessSpec, Supervisor

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
_DAEMON_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
               "PYTHONUNBUFFERED": "1"}
ACCURACY_TARGET = 0.8

log = get_logger("tether.demo")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tether demo", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="run config YAML (default: configs/demo.yaml)")
    parser.add_argument("--run-dir", help="run directory (overrides run.dir)")
    parser.add_argument("--actors", type=int,
                        help="actor daemons (default: 2, or one per actor CPU up to 2 when pinned)")
    parser.add_argument("--learner-ranks", type=int,
                        help="torchrun learner ranks (default: 2, or one per learner CPU up to 2 when pinned)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run directory's training instead of starting it afresh")
    parser.add_argument("--no-eval", action="store_true", help="skip the vLLM accuracy evaluations")
    parser.add_argument("--actor-cpus", help="pin the actors to these CPUs, e.g. 0 (placement.actor_cpus)")
    parser.add_argument("--learner-cpus", help="pin the learner to these CPUs, e.g. 1 (placement.learner_cpus)")
    parser.add_argument("--shared-cpus", action="store_true",
                        help="let actors and learner share every CPU instead of the default disjoint halves")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parser.parse_args(argv)
    if (args.actors is not None and args.actors < 1) or (args.learner_ranks is not None and args.learner_ranks < 1):
        parser.error("--actors and --learner-ranks must be >= 1")

    overrides = list(args.overrides) + ([f"run.dir={args.run_dir}"] if args.run_dir else [])
    overrides += [f"placement.{k}={v}" for k, v in (("actor_cpus", args.actor_cpus), ("learner_cpus", args.learner_cpus)) if v]
    config = load_config_or_exit(parser, args.config, overrides)
    pinned = [] if args.shared_cpus else default_cpu_placement(config.placement, sorted(available_cpus_here()))
    if pinned:
        overrides += pinned
        config = load_config_or_exit(parser, args.config, overrides)
    # One engine (or rank) per CPU, as one per GPU on a cluster: two vLLM engines on one CPU spend it
    # twice on every weight update (each stages its own copy) and contend for the rest.
    if args.actors is None:
        args.actors = _one_per_cpu(config.placement.actor_cpus)
    if args.learner_ranks is None:
        args.learner_ranks = _one_per_cpu(config.placement.learner_cpus)
    try:  # fail before any model is built when the placement cannot fit this machine
        plan(config.placement, actors=args.actors, learner_ranks=args.learner_ranks,
             tensor_parallel_size=config.actor.engine.tensor_parallel_size)
    except ValueError as exc:
        parser.error(str(exc))
    run_dir = Path(config.run.dir)
    if not args.resume:
        _clear_training_state(run_dir)
    # The console carries tether's own progress lines (printed below); every log record, tether's and
    # any library's, goes to logs/demo.jsonl.
    configure_logging("demo", run_dir=run_dir, level=config.run.log_level, console=False)
    started = time.monotonic()

    model_dir = Path(config.model.path) if config.model.path else _ensure_tiny_model(run_dir / "tiny-model", config)
    # Every daemon reads this one file: the run's config with the model path made explicit.
    config = load_config(args.config, overrides + [f"model.path={model_dir}"])
    run_config_path = save_resolved(config, run_dir, "run")

    before = None if args.no_eval else _evaluate(model_dir, run_config_path, config, "warm start")
    train_started = time.monotonic()
    try:
        records = _train(config, run_config_path, args.actors, args.learner_ranks)
    except KeyboardInterrupt:
        print("\n[tether] interrupted: every daemon was stopped; partial results are in", run_dir, file=sys.stderr)
        return 130
    train_seconds = time.monotonic() - train_started

    plot = plot_metrics(run_dir / "metrics.jsonl", run_dir / "metrics.png") if records else None
    trained = _final_model(run_dir)
    after = None if args.no_eval or trained is None else _evaluate(trained, run_config_path, config, "trained")
    audited = _audit(run_dir) if config.run.keep_rollouts and records else None
    summary = {
        "run_dir": str(run_dir),
        "task": config.task.name,
        "steps": records[-1]["step"] if records else 0,
        "train_minutes": round(train_seconds / 60, 2),
        "total_minutes": round((time.monotonic() - started) / 60, 2),
        "accuracy_before": before,
        "accuracy_after": after,
        "accuracy_target": ACCURACY_TARGET,
        "target_met": after is not None and after >= ACCURACY_TARGET,
        "final_reward_mean": records[-1].get("reward_mean") if records else None,
        "parity_lag0_max_over_run": max((r["parity_lag0_max"] for r in records if r.get("parity_lag0_tokens")), default=None),
        "trained_model": str(trained) if trained else None,
        "plot": str(plot) if plot else None,
        "audit": audited,
        "logs": str(run_dir / "logs"),
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    log.info("demo finished", **summary)
    _print_summary(summary)
    return 0


def _one_per_cpu(cpus: str, most: int = 2) -> int:
    """Daemons (actors, or learner ranks) on a CPU set: one per CPU up to `most`; `most` when unpinned."""
    ids = parse_ids(cpus)
    return min(most, len(ids)) if ids else most


def default_cpu_placement(placement, cpus: list[int]) -> list[str]:
    """The demo's placement overrides when the config names no CPUs: actors on the lower half of
    `cpus`, the learner on the upper half (the larger half when the count is odd), as actors and
    learner each have their own GPUs on a cluster. Nothing when placement.* names CPUs already, or with
    fewer than 2 CPUs (nothing to split)."""
    if placement.actor_cpus or placement.learner_cpus or len(cpus) < 2:
        return []
    lower, upper = split(sorted(cpus), 2)
    if len(cpus) % 2:  # split() puts the extra CPU in the lower share: give it to the learner
        lower, upper = lower[:-1], lower[-1:] + upper
    return [f"placement.actor_cpus={format_ids(lower)}", f"placement.learner_cpus={format_ids(upper)}"]


def _clear_training_state(run_dir: Path) -> None:
    """Start training afresh but keep the (deterministic, slow-ish to build) tiny model."""
    for name in ("checkpoints", "logs", "config", "broker", "ledger", "rollouts", "tensorboard", "wandb"):
        shutil.rmtree(run_dir / name, ignore_errors=True)
    for name in ("metrics.jsonl", "metrics.abandoned.jsonl", "metrics.png", "summary.json", "audit.json"):
        (run_dir / name).unlink(missing_ok=True)
    for report in run_dir.glob("engine_report*.json"):
        report.unlink()


def _ensure_tiny_model(model_dir: Path, config: RunConfig) -> Path:
    import torch

    from tether.common.tiny_model import build_tiny_model

    report_path = model_dir / "tether_tiny_model.json"
    if report_path.is_file() and json.loads(report_path.read_text()).get("seed") == config.run.seed:
        log.info("reusing tiny model", path=str(model_dir))
        print(f"[tether] reusing the tiny model in {model_dir}", file=sys.stderr)
        return model_dir
    log.info("building tiny model", path=str(model_dir), seed=config.run.seed)
    print(f"[tether] building the tiny model in {model_dir} (warm start, about a minute)", file=sys.stderr)
    import transformers

    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    report = build_tiny_model(model_dir, seed=config.run.seed)
    log.info("tiny model ready", **dataclasses.asdict(report))
    return model_dir


def _evaluate(model_dir: Path, run_config_path: Path, config: RunConfig, label: str) -> float:
    """Held-out greedy accuracy with a real vLLM V1 engine, in a child process whose output (the
    engine's logging and warnings) goes to <run_dir>/logs/eval-<label>.out rather than the console."""
    slug = label.replace(" ", "-")
    logs = Path(config.run.dir) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    out_json, out_log = logs / f"eval-{slug}.json", logs / f"eval-{slug}.out"
    command = [sys.executable, "-m", "tether.actor.evaluate", "--model", str(model_dir), "--config",
               str(run_config_path), "--json", str(out_json)]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    print(f"[tether] {label}: measuring held-out greedy accuracy with vLLM V1 (engine log: {out_log})", file=sys.stderr)
    with open(out_log, "w") as log_file:
        status = subprocess.run(command, stdout=log_file, stderr=subprocess.STDOUT, env=env, check=False)
    if status.returncode != 0:
        raise SystemExit(f"the {label} evaluation failed (exit {status.returncode}); see {out_log}")
    result = json.loads(out_json.read_text())
    log.info("held-out greedy accuracy", model=label, accuracy=result["accuracy"], prompts=result["num_prompts"])
    print(f"[tether] {label}: held-out greedy accuracy {result['accuracy']:.1%} on {result['num_prompts']} prompts",
          file=sys.stderr)
    return result["accuracy"]


AUDIT_SAMPLE = 64
"""Sequences per weight version the demo's closing audit recomputes."""


def _audit(run_dir: Path) -> dict | None:
    """`tether audit` on a sample of the archive: per-version |actor - recomputed| logprobs, printed."""
    from tether.launch.audit import audit, format_report

    try:
        report = audit(run_dir, sample=AUDIT_SAMPLE)
    except (SystemExit, Exception) as exc:  # noqa: BLE001  the audit reports; it must not lose the demo's summary
        print(f"[tether] audit skipped: {exc}", file=sys.stderr)
        return None
    print("\n" + format_report(report), file=sys.stderr)
    payload = dataclasses.asdict(report)
    (run_dir / "audit.json").write_text(json.dumps(payload, indent=2))
    single = [r for r in report.rows if r.kind == "single-version"]
    return {
        "versions_audited": sorted({r.version for r in report.rows}),
        "single_version_max_abs_diff": max((r.max for r in single), default=None),
        "not_audited_versions": sum(len(n.versions) for n in report.not_audited),
        "report": str(run_dir / "audit.json"),
    }


DAEMON_RESTARTS = 3
"""A crashed daemon is started again this many times: an actor comes back with clean weights, the
broker replays its journal, the learner resumes from its newest checkpoint."""


def daemon_specs(config: RunConfig, run_config_path: Path, actors: int, learner_ranks: int,
                 restarts: int = DAEMON_RESTARTS) -> list[ProcessSpec]:
    """The broker, the actors and the torchrun learner of one run, in start order, each placed on its
    CPUs/GPUs by config.placement (tether.launch.placement; ValueError when they do not fit)."""
    python = sys.executable
    logs = Path(config.run.dir) / "logs"
    env = _DAEMON_ENV
    cfg = ["--config", str(run_config_path)]
    where = plan(config.placement, actors=actors, learner_ranks=learner_ranks,
                 tensor_parallel_size=config.actor.engine.tensor_parallel_size)
    specs = [ProcessSpec("broker", [python, "-m", "tether.broker", *cfg], logs / "broker.out", env, restarts)]
    specs += [
        ProcessSpec(f"actor-{i}", p.command([python, "-m", "tether.actor", *cfg, f"actor.actor_id=actor-{i}",
                                             *p.overrides("actor")]),
                    logs / f"actor-{i}.out", {**env, **p.env()}, restarts)
        for i, p in enumerate(where.actors)
    ]
    p = where.learner
    specs.append(ProcessSpec(
        "learner",
        p.command([python, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={learner_ranks}",
                   "-m", "tether.learner", *cfg, *p.overrides("learner")]),
        logs / "learner.out", {**env, **p.env()}, restarts,
    ))
    return specs


def actor_spec(config: RunConfig, run_config_path: Path, actor_id: str, restarts: int = DAEMON_RESTARTS) -> ProcessSpec:
    """One actor daemon of the run (also how tests and benchmarks add actors to a running one)."""
    return ProcessSpec(actor_id, [sys.executable, "-m", "tether.actor", "--config", str(run_config_path),
                                  f"actor.actor_id={actor_id}"],
                       Path(config.run.dir) / "logs" / f"{actor_id}.out", _DAEMON_ENV, restarts)


def _train(config: RunConfig, run_config_path: Path, actors: int, learner_ranks: int) -> list[dict]:
    """Run the daemons until the learner finishes; return the learner's metrics records."""
    metrics_path = Path(config.run.dir) / "metrics.jsonl"
    placed = config.placement
    where = (f"; actors on CPUs {placed.actor_cpus}, learner on CPUs {placed.learner_cpus}"
             if placed.actor_cpus and placed.learner_cpus else "")
    print(f"[tether] training: a broker, {actors} actor(s) and a {learner_ranks}-rank learner{where} "
          f"(their logs: {Path(config.run.dir) / 'logs'}/)", file=sys.stderr)
    with Supervisor(grace_seconds=15.0) as supervisor:
        children = [supervisor.start(spec) for spec in daemon_specs(config, run_config_path, actors, learner_ranks)]
        learner = children[-1]
        records = _follow(metrics_path, config.learner.steps, supervisor, learner)
        if learner.returncode != 0:
            raise SystemExit(f"the learner failed (exit {learner.returncode}); see {learner.spec.log_path}")
    return records


def _follow(metrics_path: Path, total_steps: int, supervisor: Supervisor, learner) -> list[dict]:
    """Show a progress bar and one line per learner step until the learner exits.

    A restarted daemon is reported and followed; a learner that resumes from its checkpoint moves
    the records of the steps it retrains aside, and the view rewinds with it.
    """
    from tqdm import tqdm

    records: dict[int, dict] = {}
    offset = 0
    with tqdm(total=total_steps, desc="training", unit="step", file=sys.stderr, dynamic_ncols=True) as bar:
        while True:
            learner_done = learner.returncode is not None
            if metrics_path.is_file():
                if metrics_path.stat().st_size < offset:  # the learner resumed and rewrote the file
                    offset, records = 0, {}
                    tqdm.write("[tether] the learner resumed from its checkpoint", file=sys.stderr)
                with open(metrics_path) as f:
                    f.seek(offset)
                    for line in f:
                        if not line.endswith("\n"):
                            break  # a line still being written: read it next time
                        offset += len(line.encode())
                        record = json.loads(line)
                        records[record["step"]] = record
                        bar.n = record["step"]
                        bar.refresh()
                        tqdm.write(format_step(record, total_steps), file=sys.stderr)
            if learner_done and (learner.returncode == 0 or learner.restarts_left == 0):
                return [records[step] for step in sorted(records)]
            failed = supervisor.check()  # restarts a crashed daemon (the learner too) while it may
            if failed:
                raise SystemExit(f"{failed[0].spec.name} exited with {failed[0].returncode}; see {failed[0].spec.log_path}")
            time.sleep(0.5)


def format_step(r: dict, total_steps: int) -> str:
    """One console line per step: reward, kl, clipped fraction, parity, lag, tokens/s."""

    def num(key: str, spec: str) -> str:
        value = r.get(key)
        return format(value, spec) if isinstance(value, int | float) else "-"

    parity = f"{num('parity_lag0_mean', '.1e')}/{num('parity_lag0_max', '.1e')}" if r.get("parity_lag0_tokens") else "n/a"
    return (f"step {r['step']:>4}/{total_steps}  reward {num('reward_mean', '.3f')}  kl {num('kl_new_old', '.2e')}  "
            f"clipped {num('clipped_fraction', '.3f')}  parity(lag0 mean/max) {parity}  "
            f"lag {num('lag_mean', '.2f')}  tok/s {num('tokens_per_s', '.0f')}  dropped {r.get('samples_dropped', 0)}")


def _final_model(run_dir: Path) -> Path | None:
    from tether.learner.checkpoint import latest_checkpoint

    checkpoint = latest_checkpoint(run_dir)
    return checkpoint / "hf" if checkpoint is not None else None


def _print_summary(s: dict) -> None:
    def pct(value) -> str:
        return f"{value:.1%}" if isinstance(value, float) else "not measured"

    verdict = "target met" if s["target_met"] else "target NOT met"
    print(
        f"\n== tether demo: {s['task']} ==\n"
        f"held-out greedy accuracy: {pct(s['accuracy_before'])} (warm start) -> {pct(s['accuracy_after'])} "
        f"after {s['steps']} steps ({verdict}: {s['accuracy_target']:.0%})\n"
        f"training took {s['train_minutes']:.1f} min, the whole demo {s['total_minutes']:.1f} min\n"
        f"run directory: {s['run_dir']} (metrics.jsonl, metrics.png, checkpoints/, rollouts/, summary.json)\n"
        f"daemon and engine logs: {s['logs']}/  (tether rollouts {s['run_dir']} shows what the model generated)"
    )


if __name__ == "__main__":
    sys.exit(main())
