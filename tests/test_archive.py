"""The rollout archive (Parquet, rotated by size, per-rank parts), `tether rollouts`, checkpoint retention."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from tether.common.messages import Rollout, SamplingSpec, float32_array, int32_array
from tether.learner.archive import (
    COLUMNS,
    IN_PROGRESS,
    RolloutArchiveWriter,
    archive_parts,
    read_archive,
)
from tether.learner.checkpoint import checkpoint_versions, prune_checkpoints


def _rollout(step: int, group: int, i: int, *, versions=None, text="12") -> Rollout:
    completion = [ord(ch) for ch in text]
    versions = versions if versions is not None else [step - 1] * len(completion)
    return Rollout(
        rollout_id=f"s{step}-g{group}-{i}", group_id=f"s{step}-g{group}", group_size=2, actor_id="actor-0",
        task="arithmetic", prompt_token_ids=int32_array([ord(ch) for ch in "5+7="]),
        completion_token_ids=int32_array(completion), logprobs=float32_array(np.linspace(-0.1, -0.5, len(completion))),
        versions=int32_array(versions), reward=float(i), finish_reason="stop", created_at=123.5,
        sampling=SamplingSpec(temperature=0.7, max_tokens=4, top_k=5, top_p=0.9),
    )


class _ByteTokenizer:
    def batch_decode(self, batch, skip_special_tokens=True):
        return ["".join(chr(t) for t in ids) for ids in batch]


def test_rows_hold_every_field_and_parts_rotate_by_size(tmp_path):
    writer = RolloutArchiveWriter(tmp_path, rank=1, tokenizer=_ByteTokenizer(), file_mb=0.004)
    for step in range(1, 7):
        rollouts = [_rollout(step, g, i) for g in range(2) for i in range(2)]
        writer.write(step, rollouts, np.array([-1.0, 1.0, -0.5, 0.5]))
        if step == 1:  # the open part is not readable under its final name yet
            assert [p.name for p in archive_parts(tmp_path)[1]] == [f"part-r1-00000.parquet{IN_PROGRESS}"]
    writer.close()
    parts, open_parts = archive_parts(tmp_path)
    assert not open_parts and len(parts) >= 2  # ~4 KiB per part: rotated
    assert all(p.name.startswith("part-r1-") for p in parts)
    table = read_archive(tmp_path)
    assert table.column_names == list(COLUMNS) and table.num_rows == 24
    rows = table.to_pylist()
    assert [r["step"] for r in rows] == sorted(r["step"] for r in rows)
    first = rows[0]
    assert first["prompt"] == "5+7=" and first["completion"] == "12" and first["completion_ids"] == [49, 50]
    assert first["prompt_ids"] == [53, 43, 55, 61] and first["versions"] == [0, 0] and first["rank"] == 1
    assert first["logprobs"] == pytest.approx([-0.1, -0.5]) and first["reward"] == 0.0 and first["advantage"] == -1.0
    assert (first["temperature"], first["top_k"], first["top_p"]) == (pytest.approx(0.7), 5, pytest.approx(0.9))
    step3 = read_archive(tmp_path, step=3).to_pylist()
    assert [r["rollout_id"] for r in step3] == ["s3-g0-0", "s3-g0-1", "s3-g1-0", "s3-g1-1"]
    assert [r["advantage"] for r in step3] == [-1.0, 1.0, -0.5, 0.5]
    # a resumed learner continues the numbering instead of overwriting a part
    again = RolloutArchiveWriter(tmp_path, rank=1, tokenizer=_ByteTokenizer(), file_mb=1)
    again.write(7, [_rollout(7, 0, 0)], [0.0])
    again.close()
    assert read_archive(tmp_path).num_rows == 25 and len(archive_parts(tmp_path)[0]) == len(parts) + 1
    assert pq.ParquetFile(archive_parts(tmp_path)[0][0]).metadata.num_row_groups >= 1


def test_max_mb_deletes_a_ranks_oldest_parts(tmp_path):
    writer = RolloutArchiveWriter(tmp_path, rank=0, tokenizer=None, file_mb=0.004, max_mb=0.012)
    for step in range(1, 25):
        writer.write(step, [_rollout(step, 0, i) for i in range(2)], [0.0, 0.0])
    writer.close()
    parts, _ = archive_parts(tmp_path)
    assert sum(p.stat().st_size for p in parts) <= 0.012 * 2**20 + parts[-1].stat().st_size
    steps = read_archive(tmp_path).column("step").to_pylist()
    assert max(steps) == 24 and min(steps) > 1  # the oldest steps went first


def test_length_mismatch_is_refused_and_an_empty_step_writes_nothing(tmp_path):
    writer = RolloutArchiveWriter(tmp_path, rank=0)
    writer.write(1, [], None)
    assert archive_parts(tmp_path) == ([], [])
    with pytest.raises(ValueError, match="2 rollouts but 1 advantages"):
        writer.write(1, [_rollout(1, 0, 0), _rollout(1, 0, 1)], [0.0])


def test_tether_rollouts_prints_a_steps_groups(tmp_path, capsys):
    from tether.common.cli import main

    writer = RolloutArchiveWriter(tmp_path, rank=0, tokenizer=_ByteTokenizer())
    writer.write(1, [_rollout(1, 0, 0), _rollout(1, 0, 1, text="13")], [-0.7, 0.7])
    writer.write(2, [_rollout(2, 0, 0, versions=[0, 1], text="99"), _rollout(2, 0, 1)], [0.0, 0.0])
    writer.close()
    assert main(["rollouts", str(tmp_path), "--step", "1"]) == 0
    out = capsys.readouterr().out
    assert "1 closed parts, 4 rollouts, steps 1-2" in out
    assert "step 1: 2 rollouts in 1 groups, reward mean 0.500" in out
    assert "prompt: '5+7='" in out and "'13'" in out and "+0.700" in out and "-0.700" in out
    assert main(["rollouts", str(tmp_path)]) == 0  # default: the last step
    out = capsys.readouterr().out
    assert "step 2:" in out and "0->1" in out and "'99'" in out
    with pytest.raises(SystemExit) as exit_info:
        main(["rollouts", str(tmp_path), "--step", "9"])
    assert exit_info.value.code == 1 and "no rollouts archived for step 9 (archived: 1..2" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["rollouts", str(tmp_path / "nothing")])
    assert "has no rollout archive (run with run.keep_rollouts=true)" in capsys.readouterr().err


def _fake_checkpoint(run_dir, version: int, complete: bool = True) -> None:
    path = run_dir / "checkpoints" / f"step-{version:06d}"
    (path / "hf").mkdir(parents=True)
    if complete:
        (path / "state.json").write_text(json.dumps({"step": version}))


def test_retention_keeps_every_nth_version_and_the_latest(tmp_path):
    for version in (10, 20, 30, 40, 50, 60, 70):
        _fake_checkpoint(tmp_path, version)
    _fake_checkpoint(tmp_path, 80, complete=False)  # a save in progress is never touched
    deleted = prune_checkpoints(tmp_path, keep_every=30, keep_last=2)
    assert sorted(checkpoint_versions(tmp_path)) == [30, 60, 70]
    assert sorted(p.name for p in deleted) == ["step-000010", "step-000020", "step-000040", "step-000050"]
    assert (tmp_path / "checkpoints" / "step-000080").is_dir()
    assert prune_checkpoints(tmp_path, keep_every=0, keep_last=1) == []  # 0 keeps everything
    assert sorted(checkpoint_versions(tmp_path)) == [30, 60, 70]
