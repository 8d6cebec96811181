"""Plot a run's metrics.jsonl as one PNG: a panel per metric over steps, with a wall-clock axis on top.

Each panel shows the raw points faintly and an exponentially smoothed line over them (TensorBoard's
smoothing, SMOOTHING = 0.8), so a trend reads through step-to-step noise. The top axis gives the
learner's elapsed minutes at those steps (from `elapsed_s`; runs resumed from a checkpoint continue
the clock where the previous process stopped), labelled at the step ticks.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

SMOOTHING = 0.8

PANELS = (
    (("reward_mean",), "reward (mean)", "linear"),
    (("kl_new_old",), "kl_new_old", "log"),
    (("ratio_outside_trust_region",), "ratio outside the trust region (share of tokens)", "linear"),
    (("clipped_fraction",), "clipped fraction (share of tokens where the clip changed the loss)", "linear"),
    (("entropy",), "entropy", "linear"),
    (("parity_lag0_mean",), "parity: mean |log ratio|, lag-0 tokens", "log"),
    (("lag_mean",), "lag (mean; band: min..max)", "linear"),
    (("samples_dropped",), "stale samples dropped per step", "linear"),
    (("tokens_per_s",), "learner throughput (completion tokens/s)", "linear"),
)


def read_metrics(path: str | Path) -> list[dict]:
    """Metrics records in step order; a torn last line (run killed mid-write) is skipped."""
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return sorted((r for r in records if "step" in r), key=lambda r: r["step"])


def smooth(values: list[float], weight: float = SMOOTHING) -> list[float]:
    """TensorBoard's debiased exponential moving average."""
    out, last, norm = [], 0.0, 0.0
    for value in values:
        last = weight * last + (1 - weight) * value
        norm = weight * norm + (1 - weight)
        out.append(last / norm)
    return out


def wall_clock_minutes(records: list[dict]) -> list[float]:
    """Elapsed minutes at each record; a clock that restarts (a resumed run) continues from the last value."""
    out, offset, previous = [], 0.0, 0.0
    for r in records:
        elapsed = r.get("elapsed_s")
        if not isinstance(elapsed, int | float):
            elapsed = previous + float(r.get("step_seconds") or 0.0) - offset
        if elapsed + offset < previous:
            offset = previous
        previous = elapsed + offset
        out.append(previous / 60.0)
    return out


def _series(records: list[dict], keys: tuple[str, ...]) -> tuple[list[float], list[float]]:
    for key in keys:
        points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), int | float) and math.isfinite(r[key])]
        if points:
            steps, values = zip(*points, strict=True)
            return list(steps), list(values)
    return [], []


def plot_metrics(metrics_path: str | Path, out_png: str | Path) -> Path:
    """Write a PNG with one panel per metric in PANELS; missing metrics leave an empty panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    records = read_metrics(metrics_path)
    fig, axes = plt.subplots(len(PANELS), 1, figsize=(9, 2.0 * len(PANELS)), sharex=True)
    for ax, (keys, title, scale) in zip(axes, PANELS, strict=True):
        steps, values = _series(records, keys)
        if steps:
            ax.plot(steps, values, marker=".", linestyle="none", alpha=0.35, color="tab:blue", markersize=4)
            ax.plot(steps, smooth(values), linewidth=1.6, color="tab:blue")
            if scale == "log" and all(v > 0 for v in values) and max(values) > min(values):
                ax.set_yscale("log")
        if keys == ("lag_mean",):
            low, high = _series(records, ("lag_min",)), _series(records, ("lag_max",))
            if low[0] and len(low[0]) == len(high[0]):
                ax.fill_between(low[0], low[1], high[1], alpha=0.15, color="tab:blue", step="mid")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("step (weight version)")
    if len(records) >= 2:
        # The clock as a second row of labels at the step ticks: elapsed minutes when that step was written.
        steps = np.array([r["step"] for r in records], dtype=float)
        minutes = np.array(wall_clock_minutes(records))
        low, high = axes[-1].get_xlim()
        ticks = [t for t in axes[-1].get_xticks() if low <= t <= high]
        top = axes[0].twiny()
        top.set_xlim(low, high)
        top.set_xticks(ticks)
        top.set_xticklabels([f"{m:.1f}" for m in np.interp(ticks, steps, minutes)], fontsize=8)
        top.set_xlabel("wall clock (minutes since the learner started)", fontsize=8)
        axes[0].set_title(axes[0].get_title(), fontsize=9, pad=30)
    fig.tight_layout()
    out = Path(out_png)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
