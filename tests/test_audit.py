"""`tether audit` on a real learner's run directory: the archive its steps wrote, the checkpoints its
retention kept, and hand-made sequences that span an in-flight update."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from msgspec.structs import replace

from tether.common.messages import SamplingSpec, int32_array

pytestmark = pytest.mark.slow  # a real learner takes 3 steps and writes 3 checkpoints (~30 s on 2 cores)
torch.set_num_threads(1)
SAMPLING = SamplingSpec(temperature=0.7, top_k=20, top_p=0.9, max_tokens=6)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """3 learner steps with the archive on, a checkpoint per step, retention keeping versions 2 and 3."""
    from transformers import AutoModelForCausalLM

    from tether.common.config import load_config, save_resolved
    from tether.common.tiny_model import build_tiny_model
    from tether.learner.source import InMemoryBatchSource
    from tether.learner.synthetic import sample_rollouts
    from tether.learner.trainer import Learner

    model_dir = tmp_path_factory.mktemp("audit-model")
    build_tiny_model(model_dir, seed=1, warm_start=False)
    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    rollouts = sample_rollouts(base, groups=2, group_size=4, max_tokens=6, sampling=SAMPLING)
    run_dir = tmp_path_factory.mktemp("audit-run")
    values = {"run.dir": run_dir, "run.device": "cpu", "model.path": model_dir, "learner.publish_to": "none",
              "learner.resume": "false", "learner.rollouts_per_step": 8, "learner.micro_batch_size": 4,
              "actor.sampling.group_size": 4, "learner.lr": 1e-2, "learner.steps": 3, "run.keep_rollouts": "true",
              "learner.checkpoint_interval": 1, "learner.keep_checkpoint_every": 2, "learner.keep_last_checkpoints": 1}
    config = load_config(None, [f"{k}={v}" for k, v in values.items()])
    save_resolved(config, run_dir, "learner")  # what the learner's entry point does; the audit reads model.path
    learner = Learner(config, model_dir, source=InMemoryBatchSource(rollouts), shard=False)
    while learner.version < 3:
        learner.step()
        learner.maybe_checkpoint()
    learner.close()
    return run_dir


def _add_update_spanning_rollouts(run_dir) -> None:
    """Rollouts sampled by the version-2 checkpoint; some then cross an 'update' to version 3 after
    token 3 (their later tokens keep version 2's logprobs, as tokens over old KV would differ), and
    one claims version 5, which has no checkpoint."""
    from transformers import AutoModelForCausalLM

    from tether.learner.archive import RolloutArchiveWriter
    from tether.learner.synthetic import sample_rollouts

    v2 = AutoModelForCausalLM.from_pretrained(str(run_dir / "checkpoints" / "step-000002" / "hf"), dtype=torch.float32)
    sampled = sample_rollouts(v2, groups=1, group_size=4, max_tokens=6, sampling=SAMPLING, version=2, seed=7)
    spanning = [replace(r, rollout_id=f"span-{i}", versions=int32_array([2, 2, 2, 3, 3, 3])) for i, r in enumerate(sampled[:2])]
    orphan = replace(sampled[2], rollout_id="orphan", versions=int32_array([5] * 6))
    writer = RolloutArchiveWriter(run_dir, rank=7)
    writer.write(4, [sampled[3], *spanning, orphan], np.zeros(4))
    writer.close()


def test_retention_and_archive_of_a_learner_run(trained_run):
    from tether.learner.archive import read_archive
    from tether.learner.checkpoint import checkpoint_versions

    assert sorted(checkpoint_versions(trained_run)) == [2, 3]  # version 1 pruned: not a multiple of 2, not the latest
    table = read_archive(trained_run).to_pylist()
    assert [sum(r["step"] == s for r in table) for s in (1, 2, 3)] == [8, 8, 8]
    assert all(r["prompt"] and len(r["completion_ids"]) == 6 and r["versions"] == [0] * 6 for r in table)
    by_step = {s: sorted(r["advantage"] for r in table if r["step"] == s) for s in (1, 2, 3)}
    assert by_step[1] == by_step[2] and any(a != 0 for a in by_step[1])  # same rollouts, same group advantages


def test_audit_separates_single_version_from_update_spanning_tokens(trained_run, capsys):
    from tether.common.cli import main

    _add_update_spanning_rollouts(trained_run)
    out_json = trained_run / "audit.json"
    assert main(["audit", str(trained_run), "--json", str(out_json)]) == 0
    printed = capsys.readouterr().out
    report = json.loads(out_json.read_text())
    rows = {(r["version"], r["kind"]): r for r in report["rows"]}
    assert set(rows) == {(0, "single-version"), (2, "single-version"), (2, "before an update"), (3, "after an update")}
    base = rows[(0, "single-version")]
    assert base["sequences"] == 24 and base["tokens"] == 144
    for key in ((0, "single-version"), (2, "single-version"), (2, "before an update")):
        assert rows[key]["max"] < 1e-5, (key, rows[key])  # the same weights: the parity floor
    assert rows[(2, "before an update")]["tokens"] == 6 and rows[(2, "before an update")]["outside_support"] == 0
    after = rows[(3, "after an update")]
    # version 3's weights are not version 2's: different logprobs, some tokens even outside its top-k/top-p set
    assert after["tokens"] + after["outside_support"] == 6 and after["tokens"] >= 1 and after["mean"] > 1e-3
    (missing,) = report["not_audited"]
    assert missing["versions"] == [5] and missing["tokens"] == 6 and "no checkpoint kept" in missing["reason"]
    assert "after an update" in printed and "expected to differ: new weights over old KV" in printed
    assert "not audited: versions 5 (6 tokens): no checkpoint kept for that version" in printed
    assert main(["audit", str(trained_run), "--sample", "2", "--json", str(out_json)]) == 0
    sampled = json.loads(out_json.read_text())
    assert max(r["sequences"] for r in sampled["rows"]) <= 2


def test_audit_without_an_archive_says_so(tmp_path):
    from tether.launch.audit import audit

    with pytest.raises(SystemExit, match="has no rollout archive"):
        audit(tmp_path)
