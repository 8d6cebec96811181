"""Per-step metrics: accumulated per rank as sums/maxima/minima, reduced over ranks, written by rank 0."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist


class StepMetrics:
    """Accumulator for one step. Every rank must add the same keys (reduction packs them by name)."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.maxes: dict[str, float] = {}
        self.mins: dict[str, float] = {}

    def add(self, name: str, value: float) -> None:
        self.sums[name] = self.sums.get(name, 0.0) + float(value)

    def max(self, name: str, value: float) -> None:
        self.maxes[name] = max(self.maxes.get(name, float("-inf")), float(value))

    def min(self, name: str, value: float) -> None:
        self.mins[name] = min(self.mins.get(name, float("inf")), float(value))

    def reduce(self, device: torch.device) -> StepMetrics:
        """All-reduce over the default group (sum, max, min); a no-op on one process."""
        if not dist.is_initialized() or dist.get_world_size() == 1:
            return self
        out = StepMetrics()
        for table, op, target in ((self.sums, dist.ReduceOp.SUM, out.sums), (self.maxes, dist.ReduceOp.MAX, out.maxes),
                                  (self.mins, dist.ReduceOp.MIN, out.mins)):
            keys = sorted(table)
            if not keys:
                continue
            values = torch.tensor([table[k] for k in keys], dtype=torch.float64, device=device)
            dist.all_reduce(values, op=op)
            target.update(zip(keys, values.tolist(), strict=True))
        return out

    def ratio(self, numerator: str, denominator: str) -> float:
        den = self.sums.get(denominator, 0.0)
        return self.sums.get(numerator, 0.0) / den if den else float("nan")


class MetricsWriter:
    """Appends one JSON object per step to <run_dir>/metrics.jsonl."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict) -> None:
        clean = {k: (None if isinstance(v, float) and v != v else v) for k, v in record.items()}
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(clean) + "\n")


def drop_records_after(path: str | Path, step: int) -> int:
    """Move records of steps above `step` from the metrics file at `path` to `<name>.abandoned.jsonl`.

    A learner resumed from the checkpoint at `step` retrains the steps after it; their old records
    belong to an abandoned lineage, and keeping them would log those steps twice. Returns how many
    records moved.
    """
    path = Path(path)
    if not path.is_file():
        return 0
    kept, moved = [], []
    for line in path.read_text().splitlines(keepends=True):
        try:
            record_step = json.loads(line).get("step")
        except json.JSONDecodeError:
            continue  # a torn last line of a killed run
        (moved if isinstance(record_step, int) and record_step > step else kept).append(line)
    if moved:
        with path.with_suffix(".abandoned.jsonl").open("a", encoding="utf-8") as f:
            f.writelines(moved)
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(kept))
        tmp.replace(path)
    return len(moved)
