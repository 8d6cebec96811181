"""Tied input embeddings and lm_head with an fp32 head, through the real entry point: torchrun, 2 gloo
ranks, FSDP2 with a bfloat16 body, weights published to a receiver and exported as a checkpoint.

The one tied matrix is the fp32 head; the body reads its bf16 rounding through the embedding lookup.
Checked: the sharded learner's logprobs equal the unsharded reference (tether's own load_policy in
one process, same dtypes) to the fp32 floor; the matrix trains; it is published and exported once,
in fp32, under the embedding's name, and the export loads back in transformers as a tied model;
resuming from the step-2 checkpoint reproduces step 3 bit for bit.
"""

from __future__ import annotations

import json
import os
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
EMBED = "model.embed_tokens.weight"


@pytest.fixture(scope="module")
def tied_dir(tmp_path_factory):
    from tether.common.tiny_model import build_tiny_model

    out = tmp_path_factory.mktemp("tied-model")
    build_tiny_model(out, seed=2, warm_start=False, tied=True)
    return out


def _reference(tied_dir, dtype=torch.bfloat16):
    from tether.learner.model import load_policy

    return load_policy(tied_dir, torch.device("cpu"), dtype, shard=False, trainable=False)


@pytest.fixture(scope="module")
def rollouts_file(tied_dir, tmp_path_factory):
    """Rollouts whose behaviour logprobs are the unsharded bf16-body/fp32-head policy's own."""
    from msgspec.structs import replace
    from transformers import AutoModelForCausalLM

    from tether.common.messages import float32_array
    from tether.learner.batch import prepare_batch
    from tether.learner.completion import completion_logprobs
    from tether.learner.source import save_rollouts
    from tether.learner.synthetic import sample_rollouts

    sampler = AutoModelForCausalLM.from_pretrained(str(tied_dir), dtype=torch.float32)
    rollouts = sample_rollouts(sampler, groups=4, group_size=4, max_tokens=6,
                               sampling=SamplingSpec(temperature=1.0, top_k=50, max_tokens=6))
    reference = _reference(tied_dir)
    rescored = []
    with torch.no_grad():
        for rollout in rollouts:
            mb = prepare_batch([rollout], 0, 0, 1, lambda r, g: torch.zeros_like(r)).micro_batches[0]
            lp, _ = completion_logprobs(reference, mb.input_ids, mb.attention_mask, mb.logit_positions(),
                                        mb.completion_ids, mb.sampling)
            rescored.append(replace(rollout, logprobs=float32_array(lp[0].numpy())))
    path = tmp_path_factory.mktemp("tied-rollouts") / "rollouts.msgpack"
    save_rollouts(path, rescored)
    return path


@pytest.fixture(scope="module")
def run(tied_dir, rollouts_file, tmp_path_factory):
    """STEPS steps on 2 ranks, each version received by a thread joined to the weight group as rank 1."""
    from transformers import AutoModelForCausalLM

    run_dir = tmp_path_factory.mktemp("tied-run")
    port = free_port()
    store = dist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False)
    # What the publisher should send, in state-dict order: the tied matrix once, fp32; the body in bf16.
    state = AutoModelForCausalLM.from_pretrained(str(tied_dir)).state_dict()
    specs = [TensorSpec(name=n, shape=tuple(t.shape), dtype="float32" if n == EMBED else "bfloat16")
             for n, t in state.items() if n != "lm_head.weight"]
    received: dict[int, dict[str, torch.Tensor]] = {}
    errors: list[BaseException] = []

    def receive() -> None:
        try:
            with join_weight_group("127.0.0.1", port, "weights/static", rank=1, world_size=2, backend="gloo",
                                   timeout_s=200, store=store) as group:
                receiver = WeightReceiver(group)
                for version in range(1, STEPS + 1):
                    received[version] = {n: t.clone() for n, t in receiver.receive(specs, 1 << 20)}
        except BaseException as exc:  # surfaced by the test
            errors.append(exc)

    thread = threading.Thread(target=receive, daemon=True)
    thread.start()
    _torchrun(_overrides(run_dir, tied_dir, rollouts_file, **{
        "learner.publish_to": "static", "learner.static_group": f"127.0.0.1:{port}:2"}))
    thread.join(timeout=60)
    assert not errors, errors
    return run_dir, received


def _overrides(run_dir, tied_dir, rollouts_file, **extra) -> list[str]:
    overrides = {
        "run.dir": run_dir, "run.device": "cpu", "model.path": tied_dir, "model.dtype": "bfloat16",
        "model.fp32_lm_head": "true", "learner.rollouts_path": rollouts_file, "learner.steps": STEPS,
        "learner.rollouts_per_step": 16, "learner.micro_batch_size": 4, "actor.sampling.group_size": 4,
        "learner.lr": 1e-3, "learner.resume": "false", "learner.max_lag": STEPS, "learner.bucket_mb": 1,
        "learner.publish_to": "none", "learner.checkpoint_interval": 2,
        # a small chunk budget: the head and logprobs run over several chunks per micro-batch
        "learner.logits_chunk_mb": 0.01, **extra,
    }
    return [f"{k}={v}" for k, v in overrides.items()]


def _torchrun(overrides: list[str]) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
           "-m", "tether.learner", *overrides]
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]


def _metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def test_sharded_bf16_body_matches_the_unsharded_reference(run):
    run_dir, _ = run
    first = _metrics(run_dir)[0]
    # Behaviour logprobs came from the unsharded policy with the same dtypes: FSDP's gathers and casts
    # give the same bf16 body and fp32 head, so lag-0 tokens agree to the fp32 floor.
    assert first["parity_lag0_tokens"] == 16 * 6
    assert first["parity_lag0_max"] < 1e-5, first["parity_lag0_max"]


def test_the_tied_matrix_is_published_once_in_fp32_and_trains(run, tied_dir):
    run_dir, received = run
    assert sorted(received) == [1, 2, 3]
    for tensors in received.values():
        assert "lm_head.weight" not in tensors
        assert tensors[EMBED].dtype == torch.float32
        assert tensors["model.norm.weight"].dtype == torch.bfloat16
    exported = load_file(str(Path(run_dir) / "checkpoints" / f"step-{STEPS:06d}" / "hf" / "model.safetensors"))
    assert "lm_head.weight" not in exported and exported[EMBED].dtype == torch.float32
    assert torch.equal(exported[EMBED], received[STEPS][EMBED])
    initial = load_file(str(tied_dir / "model.safetensors"))[EMBED]
    assert not torch.equal(received[1][EMBED], initial)
    assert not torch.equal(received[STEPS][EMBED], received[1][EMBED])
    # fp32 updates, not bf16-rounded ones: the trained matrix is not representable in bf16.
    assert not torch.equal(received[STEPS][EMBED], received[STEPS][EMBED].bfloat16().float())


def test_export_loads_back_as_a_tied_model(run):
    from transformers import AutoModelForCausalLM

    run_dir, received = run
    hf = Path(run_dir) / "checkpoints" / f"step-{STEPS:06d}" / "hf"
    model = AutoModelForCausalLM.from_pretrained(str(hf), dtype=torch.float32)
    assert model.config.tie_word_embeddings is True
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert torch.equal(model.lm_head.weight.detach(), received[STEPS][EMBED])


def test_resume_of_a_tied_model_reproduces_the_next_step(run, tied_dir, rollouts_file, tmp_path):
    import shutil

    run_dir, received = run
    resumed = tmp_path / "resumed"
    shutil.copytree(run_dir / "checkpoints" / "step-000002", resumed / "checkpoints" / "step-000002")
    _torchrun(_overrides(resumed, tied_dir, rollouts_file, **{"learner.resume": "true"}))
    assert [r["version"] for r in _metrics(resumed)] == [STEPS]  # continues the numbering
    expected = load_file(str(run_dir / "checkpoints" / f"step-{STEPS:06d}" / "hf" / "model.safetensors"))
    got = load_file(str(resumed / "checkpoints" / f"step-{STEPS:06d}" / "hf" / "model.safetensors"))
    assert sorted(got) == sorted(expected)
    for name in expected:
        assert torch.equal(got[name], expected[name]), name
