"""The Learner in one process (unsharded) for every algorithm, the KL reference and activation checkpointing."""

from __future__ import annotations

import pytest
import torch

from tether.common.messages import SamplingSpec

pytestmark = pytest.mark.slow
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    from tether.common.tiny_model import build_tiny_model
    from tether.learner.synthetic import sample_rollouts

    model_dir = tmp_path_factory.mktemp("single-model")
    build_tiny_model(model_dir, seed=1, warm_start=False)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    rollouts = sample_rollouts(model, groups=2, group_size=4, max_tokens=6,
                               sampling=SamplingSpec(temperature=0.7, top_k=20, top_p=0.9, max_tokens=6))
    return model_dir, rollouts


def _learner(setup, tmp_path, **overrides):
    from tether.common.config import load_config
    from tether.learner.source import InMemoryBatchSource
    from tether.learner.trainer import Learner

    model_dir, rollouts = setup
    values = {"run.dir": tmp_path, "run.device": "cpu", "learner.publish_to": "none", "learner.resume": "false",
              "learner.rollouts_per_step": 8, "learner.micro_batch_size": 4, "actor.sampling.group_size": 4,
              "learner.lr": 1e-3, **overrides}
    config = load_config(None, [f"{k}={v}" for k, v in values.items()])
    return Learner(config, model_dir, source=InMemoryBatchSource(rollouts), shard=False)


@pytest.mark.parametrize("algorithm", ["grpo", "gspo", "ppo", "rloo", "reinforce"])
def test_every_algorithm_trains_with_kl_to_reference(setup, tmp_path, algorithm):
    learner = _learner(setup, tmp_path, **{"learner.algorithm": algorithm, "learner.kl_coef": 0.1})
    before = learner.model.lm_head.weight.detach().clone()
    first, second = learner.step(), learner.step()
    assert first["kl_ref"] == pytest.approx(0.0, abs=1e-7)  # the reference is the initial model
    assert second["kl_ref"] > 0
    assert first["parity_lag0_max"] < 1e-4 and first["parity_lag0_tokens"] == 48  # top-k/top-p replayed
    assert second["lag_max"] == 1 and learner.version == 2
    assert not torch.equal(before, learner.model.lm_head.weight)
    assert all(v is None or v == v for v in first.values())  # no NaN metric at lag 0


def test_activation_checkpointing_gives_the_same_step(setup, tmp_path):
    plain = _learner(setup, tmp_path / "a").step()
    checkpointed = _learner(setup, tmp_path / "b", **{"learner.activation_checkpointing": "true"}).step()
    assert checkpointed["grad_norm"] == pytest.approx(plain["grad_norm"], rel=1e-5)


def test_stale_samples_are_dropped_and_counted(setup, tmp_path):
    learner = _learner(setup, tmp_path, **{"learner.max_lag": 1})
    rows = [learner.step() for _ in range(2)]
    # the fixed batch is tagged version 0: lag 0, then 1; at version 2 every sample exceeds max_lag.
    assert [r["samples_dropped"] for r in rows] == [0, 0]
    with pytest.raises(RuntimeError, match=r"no trainable sample at version 2 .*max_lag=1"):
        learner.step()
    assert learner.version == 2  # a batch of nothing but stale samples is never a step


def test_an_all_stale_batch_is_skipped_not_stepped(setup, tmp_path):
    """Stale batches are counted and fetched past; the version only counts optimizer steps."""
    from msgspec.structs import replace

    from tether.common.messages import int32_array
    from tether.learner.source import InMemoryBatchSource

    _, rollouts = setup

    def tagged(version: int) -> InMemoryBatchSource:
        return InMemoryBatchSource([replace(r, versions=int32_array([version] * r.num_completion_tokens))
                                    for r in rollouts])

    class StaleTwiceThenFresh:
        def __init__(self):
            self.calls = 0
            self.batch = None

        def request(self, **kwargs):
            self.calls += 1
            self.batch = (tagged(0) if self.calls <= 2 else tagged(1)).next_batch(**kwargs)

        def poll(self, timeout):
            return self.batch

    learner = _learner(setup, tmp_path, **{"learner.max_lag": 0})
    learner.step()  # version 0 -> 1 on lag-0 data
    learner.source = StaleTwiceThenFresh()
    row = learner.step()
    assert learner.version == 2 and learner.source.calls == 3
    assert row["samples_dropped"] == 16 and row["samples"] == 8 and row["lag_max"] == 0


def _params(learner) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in learner.model.named_parameters()}


def test_grad_clip_zero_disables_clipping(setup, tmp_path):
    """learner.grad_clip=0 trains exactly like an unreachable clip, and still reports the norm."""
    off = _learner(setup, tmp_path / "off", **{"learner.grad_clip": 0})
    before = _params(off)
    row_off = off.step()
    unclipped = _learner(setup, tmp_path / "huge", **{"learner.grad_clip": 1e9})
    row_huge = unclipped.step()
    assert row_off["grad_norm"] == pytest.approx(row_huge["grad_norm"], rel=1e-6) and row_off["grad_norm"] > 0
    after_off, after_huge = _params(off), _params(unclipped)
    assert any(not torch.equal(before[n], after_off[n]) for n in before), "grad_clip=0 left the weights unchanged"
    for name in before:
        torch.testing.assert_close(after_off[name], after_huge[name], atol=0, rtol=0, msg=name)


def _with_behaviour_logprob(rollouts, value: float):
    """The rollouts with the first completion token of every other sequence given behaviour logprob `value`."""
    from msgspec.structs import replace

    from tether.common.messages import float32_array

    out = []
    for i, r in enumerate(rollouts):
        if i % 2 == 0:
            logprobs = r.logprobs.numpy().copy()
            logprobs[0] = value
            r = replace(r, logprobs=float32_array(logprobs))
        out.append(r)
    return out


@pytest.mark.parametrize("algorithm", ["grpo", "gspo"])
def test_extreme_behaviour_logprobs_never_reach_the_weights(setup, tmp_path, algorithm):
    """A behaviour logprob of -100 is a valid rollout; the step stays finite and trains."""
    from tether.learner.source import InMemoryBatchSource

    learner = _learner(setup, tmp_path, **{"learner.algorithm": algorithm, "learner.dual_clip": 0})
    learner.source = InMemoryBatchSource(_with_behaviour_logprob(setup[1], -100.0))
    before = _params(learner)
    row = learner.step()
    after = _params(learner)
    assert all(torch.isfinite(p).all() for p in after.values())
    assert row["grad_norm"] is not None and 0 < row["grad_norm"] < float("inf")
    assert row["steps_skipped_nonfinite"] == 0 and learner.version == 1
    assert any(not torch.equal(before[n], after[n]) for n in before)


def _nan_loss_for(learner, calls: int):
    """Make the learner's loss NaN for its first `calls` micro-batches (a stand-in for any
    numerical failure the clamp does not cover)."""
    import dataclasses

    seen = {"n": 0}
    loss = learner.algorithm.loss

    def nan_loss(inp, params):
        out = loss(inp, params)
        seen["n"] += 1
        if seen["n"] <= calls:
            return dataclasses.replace(out, loss=out.loss * float("nan"))
        return out

    learner.algorithm = dataclasses.replace(learner.algorithm, loss=nan_loss)


def test_nonfinite_gradients_skip_the_update_and_are_counted(setup, tmp_path):
    """The batch whose gradients are NaN leaves no trace on the weights or the optimizer; the version
    counts optimizer steps only; the skipped batch's rollouts are counted as consumed."""
    from structlog.testing import capture_logs

    clean = _learner(setup, tmp_path / "clean")
    clean.step()
    learner = _learner(setup, tmp_path / "nan")
    _nan_loss_for(learner, calls=2)  # both micro-batches of the first batch
    with capture_logs() as logs:
        row = learner.step()
    assert learner.version == 1 and row["version"] == 1
    for name, value in _params(clean).items():  # as if the NaN batch had never been fetched
        torch.testing.assert_close(_params(learner)[name], value, atol=0, rtol=0, msg=name)
    assert row["skipped_nonfinite"] == 1 and row["steps_skipped_nonfinite"] == 1
    assert row["samples_skipped_nonfinite"] == 8 and row["samples_received"] == 16 and row["samples"] == 8
    warnings = [e for e in logs if e["log_level"] == "warning" and "non-finite" in e["event"]]
    assert len(warnings) == 1 and warnings[0]["version"] == 0
    assert learner.step()["skipped_nonfinite"] == 0 and learner.steps_skipped_nonfinite == 1


def test_persistent_nonfinite_gradients_stop_the_run(setup, tmp_path):
    from tether.learner.trainer import MAX_NONFINITE_SKIPS

    learner = _learner(setup, tmp_path)
    before = _params(learner)
    _nan_loss_for(learner, calls=10**9)
    with pytest.raises(RuntimeError, match=f"{MAX_NONFINITE_SKIPS + 1} consecutive batches .*non-finite"):
        learner.step()
    assert learner.version == 0
    for name, value in _params(learner).items():
        torch.testing.assert_close(value, before[name], atol=0, rtol=0)


def test_each_step_uses_the_scheduled_learning_rate_and_reports_it(setup, tmp_path):
    """lr_schedule=linear over 3 steps: 1e-3, 5e-4, 0, each in the optimizer when it stepped; the last
    step (lr 0) leaves the weights as they were."""
    learner = _learner(setup, tmp_path, **{"learner.steps": 3, "learner.lr_schedule": "linear"})
    rows = [learner.step() for _ in range(2)]
    assert [r["lr"] for r in rows] == pytest.approx([1e-3, 5e-4])
    assert learner.optimizer.param_groups[0]["lr"] == pytest.approx(5e-4)
    before = _params(learner)
    assert learner.step()["lr"] == 0.0
    after = _params(learner)
    for name in before:
        torch.testing.assert_close(after[name], before[name], atol=0, rtol=0, msg=name)


def _one_uniform_group(rollouts, uniform: bool = False):
    """The rollouts with every reward of the first group set to 1 (advantage 0 there), or of every group."""
    from msgspec.structs import replace

    first = rollouts[0].group_id
    return [replace(r, reward=1.0) if uniform or r.group_id == first else r for r in rollouts]


@pytest.mark.parametrize("uniform", [False, True], ids=["one-group-uniform", "all-uniform"])
def test_skipping_zero_advantage_rollouts_gives_the_same_update(setup, tmp_path, uniform):
    """learner.skip_zero_advantage leaves advantage-0 rollouts out of forward and backward; the weights
    after two steps (Adam's moments included) are those of training on the whole batch, also when a
    step has nothing but zero advantages (the optimizer still steps on its momentum)."""
    from tether.learner.source import InMemoryBatchSource

    _, rollouts = setup
    runs = {}
    for skip in ("true", "false"):
        learner = _learner(setup, tmp_path / skip, **{"learner.skip_zero_advantage": skip})
        learner.source = InMemoryBatchSource(_one_uniform_group(rollouts))
        first = learner.step()
        # all-uniform: the second step has zero advantages only, and moves the weights by Adam's momentum
        learner.source = InMemoryBatchSource(_one_uniform_group(rollouts, uniform))
        runs[skip] = ([first, learner.step()], _params(learner))
    (rows_on, after_on), (rows_off, after_off) = runs["true"], runs["false"]
    expected_skipped = 8 if uniform else 4
    assert rows_on[1]["samples_zero_advantage"] == expected_skipped and rows_off[1]["samples_zero_advantage"] == 0
    assert rows_on[1]["samples"] == rows_off[1]["samples"] == 8
    assert rows_on[1]["loss"] == pytest.approx(rows_off[1]["loss"], abs=1e-7)
    for name in after_on:
        torch.testing.assert_close(after_on[name], after_off[name], atol=1e-6, rtol=1e-5, msg=name)


def test_zero_advantage_rollouts_are_trained_when_a_kl_term_needs_them(setup, tmp_path):
    from tether.learner.source import InMemoryBatchSource

    learner = _learner(setup, tmp_path, **{"learner.kl_coef": 0.1})
    learner.source = InMemoryBatchSource(_one_uniform_group(setup[1]))
    assert learner.step()["samples_zero_advantage"] == 0
