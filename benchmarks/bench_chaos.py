"""Chaos benchmark: recovery time, steps lost, and the rollouts lost, duplicated and dropped when
daemons are killed during a real run on the tiny model (the scenario of launch/chaos.py).

    python -m benchmarks.bench_chaos [--out FILE]

Prints one row per fault and the exactly-once audit of the whole run, and writes them as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from tether.launch.chaos import run_chaos


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="", help="JSON path (default benchmarks/results/bench_chaos-<time>.json)")
    parser.add_argument("--steps-after", type=int, default=10)
    args = parser.parse_args(argv)
    from tether.common.tiny_model import build_tiny_model

    with tempfile.TemporaryDirectory(prefix="tether-chaos-") as tmp:
        model = Path(tmp) / "tiny-model"
        build_tiny_model(model, seed=0)
        report = run_chaos(Path(tmp) / "run", str(model), steps_after=args.steps_after)
    print(report.table())
    out = Path(args.out or Path(__file__).resolve().parent / "results" / f"bench_chaos-{time.strftime('%Y%m%d-%H%M%S')}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(asdict(report), indent=2))
    print(f"wrote {out}")
    return 0 if report.audit is not None and report.audit.exactly_once and report.books_balance else 1


if __name__ == "__main__":
    sys.exit(main())
