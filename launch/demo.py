"""`tether demo`: the embedded end-to-end job on a machine with no GPU and no model hub.

Stage 1 (this version): build and warm-start the embedded tiny model, then evaluate its held-out
greedy accuracy with a real vLLM V1 engine under tether's pinned parity settings. The training
stages (broker, actors, learner with in-flight updates) join here as they land.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

from tether.common.config import load_config, save_resolved
from tether.common.logging import configure_logging, get_logger

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tether demo", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="run config YAML (default: configs/demo.yaml)")
    parser.add_argument("--run-dir", help="run directory (overrides run.dir)")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parser.parse_args(argv)

    overrides = list(args.overrides) + ([f"run.dir={args.run_dir}"] if args.run_dir else [])
    config = load_config(args.config, overrides)
    run_dir = Path(config.run.dir)
    configure_logging("demo", run_dir=run_dir, level=config.run.log_level)
    log = get_logger("tether.demo")
    save_resolved(config, run_dir, "demo")

    import torch

    torch.set_num_threads(2)
    from tether.actor.evaluate import evaluate_greedy
    from tether.actor.tasks import build_task
    from tether.common.tiny_model import build_tiny_model

    started = time.monotonic()
    model_dir = Path(config.model.path) if config.model.path else run_dir / "tiny-model"
    if not config.model.path:
        # Reuse a model built by an earlier run: the build is deterministic for a seed.
        report_path = model_dir / "tether_tiny_model.json"
        if report_path.is_file():
            log.info("reusing tiny model", path=str(model_dir), **json.loads(report_path.read_text()))
        else:
            log.info("building tiny model", path=str(model_dir), seed=config.run.seed)
            log.info("tiny model ready", **dataclasses.asdict(build_tiny_model(model_dir, seed=config.run.seed)))

    task = build_task(config.task)
    result = evaluate_greedy(str(model_dir), task, config.actor.engine, config.model)
    summary = {
        "model": str(model_dir),
        "task": config.task.name,
        "eval_prompts": result.num_prompts,
        "greedy_accuracy": result.accuracy,
        "seconds": round(time.monotonic() - started, 1),
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    log.info("demo finished", **summary)
    print(f"\n{config.task.name}: held-out greedy accuracy {result.accuracy:.1%} "
          f"on {result.num_prompts} prompts with vLLM V1 (model {model_dir})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
