"""Plot a run's metrics.jsonl: reward, KL, clipped fraction, entropy and parity over steps (PNG)."""

from __future__ import annotations

import json
import math
from pathlib import Path

PANELS = (
    ("reward_mean", "reward (mean)", "linear"),
    ("kl_new_old", "kl_new_old", "log"),
    ("ratio_outside_trust_region", "ratio outside the trust region (share of tokens)", "linear"),
    ("clipped_fraction", "clipped fraction (share of tokens where the clip changed the loss)", "linear"),
    ("entropy", "entropy", "linear"),
    ("parity_lag0_mean", "parity: mean |log ratio|, lag-0 tokens", "log"),
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


def plot_metrics(metrics_path: str | Path, out_png: str | Path) -> Path:
    """Write a PNG with one panel per metric in PANELS; missing metrics leave an empty panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    fig, axes = plt.subplots(len(PANELS), 1, figsize=(8, 2.2 * len(PANELS)), sharex=True)
    for ax, (key, title, scale) in zip(axes, PANELS, strict=True):
        points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), int | float) and math.isfinite(r[key])]
        if points:
            steps, values = zip(*points, strict=True)
            ax.plot(steps, values, marker=".", linewidth=1)
            if scale == "log" and all(v > 0 for v in values):
                ax.set_yscale("log")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("step (weight version)")
    fig.tight_layout()
    out = Path(out_png)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
