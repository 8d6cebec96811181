"""Metrics sinks: the same keys in metrics.jsonl, TensorBoard event files and an offline W&B run,
each read back with its own format's reader; W&B mode resolution; the plot's smoothing and clock."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import pytest

from tether.common.config import load_config
from tether.learner.sinks import build_sinks, wandb_mode

RECORDS = [
    {"step": 1, "version": 1, "reward_mean": 0.25, "lag_mean": 0.0, "tokens_per_s": 1200.0, "samples_dropped": 0,
     "parity_lag0_mean": 2.5e-7, "parity_lag0_max": None},
    {"step": 2, "version": 2, "reward_mean": 0.5, "lag_mean": 0.75, "tokens_per_s": 1300.5, "samples_dropped": 3,
     "parity_lag0_mean": float("nan"), "parity_lag0_max": 1e-6},
]


def wandb_history(run_file: Path) -> list[dict]:
    """History rows of a W&B transaction log (.wandb): a LevelDB-style log of protobuf Records after a
    7-byte W&B header, in 32 KiB blocks of (crc32, length, type) framed chunks."""
    from wandb.proto import wandb_internal_pb2 as pb

    raw = run_file.read_bytes()
    assert raw[:4] == b":W&B", "not a W&B transaction log"
    rows, pos, pending = [], 7, b""
    while pos + 7 <= len(raw):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos:pos + 7])
        chunk, pos = raw[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 2):
            pending = chunk
        elif kind in (3, 4):
            pending += chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
    return rows


def _same(a, b) -> bool:
    a = math.nan if a is None else a
    return (isinstance(a, float) and math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=1e-6)


def test_every_sink_gets_the_same_keys_and_values(tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("WANDB_MODE", "offline")  # never the network in tests
    monkeypatch.setenv("WANDB_SILENT", "true")
    config = load_config(None, [f"run.dir={tmp_path}", "run.report_to=[jsonl,tensorboard,wandb]",
                                "run.wandb_mode=offline", "run.name=sinks-test"])
    sinks = build_sinks(config)
    for record in RECORDS:
        sinks.write(dict(record))
    sinks.close()

    jsonl = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    keys = set(RECORDS[0]) | {"elapsed_s"}
    assert [set(r) for r in jsonl] == [keys, keys]
    assert 0 <= jsonl[0]["elapsed_s"] <= jsonl[1]["elapsed_s"]

    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert set(events.Tags()["scalars"]) == keys - {"step"}  # step is the x axis
    for key in keys - {"step"}:
        points = events.Scalars(key)
        assert [p.step for p in points] == [1, 2]
        assert all(_same(r[key], p.value) for r, p in zip(jsonl, points, strict=True)), key

    (run_file,) = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")
    history = wandb_history(run_file)
    assert [h["_step"] for h in history] == [1, 2]
    for row, logged in zip(jsonl, history, strict=True):
        ours = {k: v for k, v in logged.items() if not k.startswith("_")}
        assert set(ours) == keys - {"step"}
        assert all(_same(row[k], ours[k] if ours[k] != "NaN" else math.nan) for k in ours), ours


def test_wandb_mode_offline_unless_there_is_a_key_or_a_choice():
    assert wandb_mode("auto", {}) == "offline"
    assert wandb_mode("auto", {"WANDB_API_KEY": "k"}) == "online"
    assert wandb_mode("auto", {"WANDB_API_KEY": "k", "WANDB_MODE": "offline"}) == "offline"
    assert wandb_mode("offline", {"WANDB_API_KEY": "k"}) == "offline"
    assert wandb_mode("online", {}) == "online"


def test_unknown_sink_is_a_config_error():
    from tether.common.errors import ConfigError

    with pytest.raises(ConfigError, match=r"run.report_to: unknown sink\(s\) \['tensorbord'\]"):
        load_config(None, ["run.report_to=[jsonl,tensorbord]"])


def test_plot_has_every_panel_smoothing_and_a_clock_that_survives_a_resume(tmp_path):
    from PIL import Image

    from tether.launch.plot import PANELS, plot_metrics, read_metrics, smooth, wall_clock_minutes

    lines = []
    for step in range(1, 41):
        elapsed = 3.0 * step if step <= 20 else 3.0 * (step - 20)  # the learner restarted after step 20
        lines.append(json.dumps({"step": step, "reward_mean": 0.3 + 0.01 * step, "kl_new_old": 1e-3, "entropy": 1.0,
                                 "clipped_fraction": 0.1, "parity_lag0_mean": 2e-7, "lag_mean": 0.5,
                                 "lag_min": 0, "lag_max": 1, "samples_dropped": step % 3, "tokens_per_s": 900.0,
                                 "elapsed_s": elapsed}))
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n{\"step\": 41, \"rew")  # torn last line
    records = read_metrics(tmp_path / "metrics.jsonl")
    minutes = wall_clock_minutes(records)
    assert len(records) == 40 and all(b > a for a, b in zip(minutes, minutes[1:], strict=False))
    assert minutes[-1] == pytest.approx(120.0 / 60.0)
    assert smooth([1.0, 1.0, 1.0]) == pytest.approx([1.0, 1.0, 1.0])  # debiased: no pull towards 0
    rising = smooth([0.0, 1.0, 2.0, 3.0])
    assert rising[0] == 0.0 and all(0 < s < v for s, v in zip(rising[1:], [1.0, 2.0, 3.0], strict=True))
    out = plot_metrics(tmp_path / "metrics.jsonl", tmp_path / "metrics.png")
    with Image.open(out) as image:
        assert image.size == (900, int(2.0 * len(PANELS) * 100))
    assert {keys[0] for keys, _, _ in PANELS} >= {"lag_mean", "samples_dropped", "tokens_per_s"}
