"""The run plot reads metrics.jsonl (tolerating a torn last line) and writes a PNG."""

from __future__ import annotations

import json

from tether.launch.plot import PANELS, plot_metrics, read_metrics


def test_plot_writes_png_with_every_panel(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "reward_mean": s / 10, "kl_new_old": 1e-4 * (s + 1),
                         "ratio_outside_trust_region": 0.02, "clipped_fraction": 0.01, "entropy": 1.0 - s / 20,
                         "parity_lag0_mean": 1e-7, "lag_mean": 0.5, "samples_dropped": s, "tokens_per_s": 900.0,
                         "elapsed_s": 2.0 * s}) for s in (2, 1, 3)]
    metrics.write_text("\n".join(lines) + '\n{"step": 4, "reward_me')
    records = read_metrics(metrics)
    assert [r["step"] for r in records] == [1, 2, 3]
    png = plot_metrics(metrics, tmp_path / "metrics.png")
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    assert all(any(key in records[0] for key in keys) for keys, _, _ in PANELS)  # every panel has data
