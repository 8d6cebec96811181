"""The learner end to end with real processes: torchrun, 2 gloo ranks, FSDP2, a weight receiver.

One 2-rank run (through the real entry point, `torchrun -m tether.learner`) trains 3 steps on a fixed
batch, checkpoints at steps 2 and 3, and publishes every version to a receiver that joins the
weight group as rank 1. The tests then check: the loss falls; the sharded result equals an
unsharded single-process run; resuming from step 2 reproduces step 3; what the receiver got is the
learner's full state dict bit for bit.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from tether.common.messages import SamplingSpec, TensorSpec
from tether.common.net import free_port
from tether.common.weight_group import WeightReceiver, join_weight_group

pytestmark = pytest.mark.slow
torch.set_num_threads(1)

STEPS = 3


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from tether.common.tiny_model import build_tiny_model

    out = tmp_path_factory.mktemp("learner-model")
    build_tiny_model(out, seed=0, warm_start=False)
    return out


@pytest.fixture(scope="module")
def rollouts_file(model_dir, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    from tether.learner.source import save_rollouts
    from tether.learner.synthetic import sample_rollouts

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    rollouts = sample_rollouts(model, groups=4, group_size=4, max_tokens=8, target_token=49,
                               sampling=SamplingSpec(temperature=1.0, top_k=50, max_tokens=8))
    path = tmp_path_factory.mktemp("rollouts") / "rollouts.msgpack"
    save_rollouts(path, rollouts)
    return path


def _overrides(model_dir, rollouts_file, run_dir, **extra) -> list[str]:
    values = {
        "run.dir": run_dir, "run.device": "cpu", "model.path": model_dir, "learner.rollouts_path": rollouts_file,
        "learner.steps": STEPS, "learner.rollouts_per_step": 16, "learner.micro_batch_size": 4,
        "actor.sampling.group_size": 4, "learner.lr": 1e-3, "learner.checkpoint_interval": 2,
        "learner.bucket_mb": 1, "learner.algorithm": "grpo", "learner.resume": "false", "learner.publish_to": "none",
        # Most of the fixed batch's groups have uniform rewards; these runs train (and count) every token.
        "learner.skip_zero_advantage": "false",
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def _torchrun(overrides: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
           "-m", "tether.learner", *overrides]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def _receiver_specs(model_dir) -> list[TensorSpec]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    return [TensorSpec(name=n, shape=tuple(t.shape), dtype="float32") for n, t in model.state_dict().items()]


@pytest.fixture(scope="module")
def fsdp_run(model_dir, rollouts_file, tmp_path_factory):
    """The 2-rank run with a live receiver; returns (run_dir, {version: received tensors})."""
    run_dir = tmp_path_factory.mktemp("fsdp-run")
    port = free_port()
    store = dist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False)
    specs = _receiver_specs(model_dir)
    received: dict[int, dict[str, torch.Tensor]] = {}
    errors: list[BaseException] = []

    def receive() -> None:
        try:
            with join_weight_group("127.0.0.1", port, "weights/static", rank=1, world_size=2, backend="gloo",
                                   timeout_s=200, store=store) as group:
                receiver = WeightReceiver(group)
                for version in range(1, STEPS + 1):
                    received[version] = {n: t.clone() for n, t in receiver.receive(specs, 1024 * 1024)}
                    received[version]["_buckets"] = torch.tensor(receiver.stats.buckets)
        except BaseException as exc:  # surfaced by the test, not lost in the thread
            errors.append(exc)

    thread = threading.Thread(target=receive, daemon=True)
    thread.start()
    _torchrun(_overrides(model_dir, rollouts_file, run_dir, **{
        "learner.publish_to": "static", "learner.static_group": f"127.0.0.1:{port}:2"}))
    thread.join(timeout=60)
    assert not errors, errors
    return run_dir, received


def _metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def _weights(run_dir, step) -> dict[str, torch.Tensor]:
    return load_file(str(Path(run_dir) / "checkpoints" / f"step-{step:06d}" / "hf" / "model.safetensors"))


def test_loss_falls_and_metrics_are_reported(fsdp_run):
    run_dir, _ = fsdp_run
    rows = _metrics(run_dir)
    assert [r["version"] for r in rows] == [1, 2, 3]
    losses = [r["loss"] for r in rows]
    assert losses[-1] < losses[0] - 1e-3, losses
    first = rows[0]
    # lag-0 tokens sampled with the same processing: parity at fp32 noise level
    assert first["parity_lag0_tokens"] == 16 * 8
    assert first["parity_lag0_max"] < 1e-4
    assert first["lag_max"] == 0 and rows[2]["lag_min"] == 2
    assert rows[1]["parity_lag0_tokens"] == 0  # the fixed batch is lag 1 at step 2: not parity tokens
    for key in ("reward_mean", "reward_std", "kl_new_old", "ratio_outside_trust_region", "clipped_fraction", "entropy",
                "grad_norm", "tokens_per_s", "samples_dropped"):
        assert all(r[key] is not None for r in rows), key
    assert rows[2]["kl_new_old"] > 0


def test_fsdp_equals_single_process(fsdp_run, model_dir, rollouts_file, tmp_path):
    from tether.common.config import load_config
    from tether.learner.source import FileBatchSource
    from tether.learner.trainer import Learner

    run_dir, _ = fsdp_run
    config = load_config(None, _overrides(model_dir, rollouts_file, tmp_path))
    learner = Learner(config, model_dir, source=FileBatchSource(rollouts_file), shard=False)
    ref_rows = [learner.step() for _ in range(STEPS)]
    fsdp_rows = _metrics(run_dir)
    for ref, got in zip(ref_rows, fsdp_rows, strict=True):
        assert got["loss"] == pytest.approx(ref["loss"], abs=1e-6)
        assert got["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-4)
    sharded = _weights(run_dir, STEPS)
    for name, tensor in learner.model.state_dict().items():
        torch.testing.assert_close(sharded[name], tensor.detach(), atol=5e-5, rtol=0, msg=name)


def test_skipping_zero_advantage_rollouts_under_fsdp_gives_the_same_weights(fsdp_run, model_dir, rollouts_file,
                                                                              tmp_path):
    """With learner.skip_zero_advantage the uniform groups are left out: a rank can hold nothing but
    zero-weight fillers while the other trains (it used to hang the metrics' reduction), and the
    weights still equal those of training every rollout."""
    from tether.learner.source import load_rollouts

    run_dir, _ = fsdp_run
    skipping = tmp_path / "skipping"
    _torchrun(_overrides(model_dir, rollouts_file, skipping, **{"learner.skip_zero_advantage": "true"}))
    groups: dict[str, set[float]] = {}
    for rollout in load_rollouts(rollouts_file):
        groups.setdefault(rollout.group_id, set()).add(rollout.reward)
    uniform = sum(4 for rewards in groups.values() if len(rewards) == 1)
    assert 0 < uniform < 16
    rows = _metrics(skipping)
    assert [r["samples_zero_advantage"] for r in rows] == [uniform] * STEPS
    assert rows[0]["loss"] == pytest.approx(_metrics(run_dir)[0]["loss"], abs=1e-7)
    # lag describes every consumed token, so skipping changes none of it
    lags = [[r[k] for k in ("lag_min", "lag_mean", "lag_max")] for r in rows]
    assert lags == [[r[k] for k in ("lag_min", "lag_mean", "lag_max")] for r in _metrics(run_dir)]
    expected, got = _weights(run_dir, STEPS), _weights(skipping, STEPS)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-6, rtol=1e-5, msg=name)


def test_resume_reproduces_next_step(fsdp_run, model_dir, rollouts_file, tmp_path):
    run_dir, _ = fsdp_run
    resumed = tmp_path / "resumed"
    shutil.copytree(run_dir / "checkpoints" / "step-000002", resumed / "checkpoints" / "step-000002")
    _torchrun(_overrides(model_dir, rollouts_file, resumed, **{"learner.resume": "true"}))
    rows = _metrics(resumed)
    assert [r["version"] for r in rows] == [3]  # continues the numbering
    assert rows[0]["loss"] == pytest.approx(_metrics(run_dir)[2]["loss"], abs=1e-7)
    expected, got = _weights(run_dir, STEPS), _weights(resumed, STEPS)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-7, rtol=0, msg=name)


def test_receiver_gets_full_state_dict_bit_for_bit(fsdp_run):
    run_dir, received = fsdp_run
    assert sorted(received) == [1, 2, 3]
    assert int(received[3].pop("_buckets")) > 1  # bucket_mb=1 splits the 13.6 MB model
    for version in (2, 3):
        received[version].pop("_buckets", None)
        expected = _weights(run_dir, version)
        assert sorted(received[version]) == sorted(expected)
        for name, tensor in expected.items():
            assert torch.equal(received[version][name], tensor), (version, name)
    assert not torch.equal(received[2]["lm_head.weight"], received[3]["lm_head.weight"])


def test_exported_checkpoint_loads_in_transformers(fsdp_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run_dir, _ = fsdp_run
    hf = Path(run_dir) / "checkpoints" / f"step-{STEPS:06d}" / "hf"
    model = AutoModelForCausalLM.from_pretrained(str(hf), dtype=torch.float32)
    assert AutoTokenizer.from_pretrained(str(hf)) is not None
    torch.testing.assert_close(model.lm_head.weight.detach(), _weights(run_dir, STEPS)["lm_head.weight"], atol=0, rtol=0)
