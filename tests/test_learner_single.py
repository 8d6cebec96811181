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
