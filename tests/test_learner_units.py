"""Fast pieces of the learner: batching and staleness, sources, fp32 head, publisher wiring."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tether.common.messages import Rollout, SamplingSpec, float32_array, int32_array
from tether.learner.algorithms.core import group_normalised_advantages
from tether.learner.batch import keep_fresh, prepare_batch
from tether.learner.source import FileBatchSource, InMemoryBatchSource, save_rollouts

torch.set_num_threads(1)


def _rollout(i, group, prompt_len, versions, reward=0.0):
    n = len(versions)
    return Rollout(
        rollout_id=f"r{i}", group_id=f"g{group}", group_size=2, actor_id="a", task="t",
        prompt_token_ids=int32_array(np.arange(1, prompt_len + 1)), completion_token_ids=int32_array(np.arange(10, 10 + n)),
        logprobs=float32_array(-np.ones(n)), versions=int32_array(versions), reward=reward,
        sampling=SamplingSpec(temperature=1.0, max_tokens=8), finish_reason="length",
    )


def test_stale_and_empty_rollouts_are_dropped_and_counted():
    rollouts = [_rollout(0, 0, 2, [5, 5]), _rollout(1, 0, 2, [2, 6]), _rollout(2, 1, 2, [3, 3]), _rollout(3, 1, 2, [])]
    kept, stale, empty = keep_fresh(rollouts, learner_version=6, max_lag=3)
    # oldest token decides: versions [2, 6] has lag 4 > 3
    assert [r.rollout_id for r in kept] == ["r0", "r2"] and stale == 1 and empty == 1


def test_micro_batches_are_length_sorted_and_aligned():
    rollouts = [_rollout(0, 0, 5, [0, 0, 0], 1.0), _rollout(1, 0, 1, [0], 0.0),
                _rollout(2, 1, 2, [0, 0], 1.0), _rollout(3, 1, 3, [0, 0, 0, 0], 3.0)]
    prepared = prepare_batch(rollouts, 0, 1, micro_batch_size=2, advantage_fn=group_normalised_advantages)
    first, second = prepared.micro_batches
    assert first.input_ids.shape == (2, 4) and second.input_ids.shape == (2, 8)  # lengths 2,4 | 7,8
    assert prepared.pad_tokens == 2 + 1 and prepared.real_tokens == 21
    # rollout 1 (prompt 1, completion [10]): its token is predicted by the logits at position 0
    assert first.logit_positions()[0, 0].item() == 0 and first.completion_ids[0, 0].item() == 10
    assert first.input_ids[0, 1].item() == 10 and first.mask[0].tolist() == [1.0, 0.0]
    # advantages follow their rollouts through the sort (lengths 2, 4 | 7, 8): group 0 (rewards 1, 0)
    # -> +a0/-a0, group 1 (rewards 1, 3) -> -a1/+a1, each |r - mean| / (sample std + eps 1e-4)
    a0, a1 = 0.5 / (math.sqrt(0.5) + 1e-4), 1.0 / (math.sqrt(2.0) + 1e-4)
    assert first.advantages.tolist() == pytest.approx([-a0, -a1], abs=1e-6)
    assert second.advantages.tolist() == pytest.approx([a1, a0], abs=1e-6)
    assert second.with_zero_weight().num_tokens == 0


def test_sources_keep_groups_whole_and_are_deterministic(tmp_path):
    rollouts = [_rollout(i, i // 2, 2, [0]) for i in range(8)]  # 4 groups of 2
    save_rollouts(tmp_path / "r.msgpack", rollouts)
    source = FileBatchSource(tmp_path / "r.msgpack")
    rank0 = source.next_batch(step=1, rank=0, world_size=2, size=4, learner_version=1, max_lag=1)
    rank1 = source.next_batch(step=1, rank=1, world_size=2, size=4, learner_version=1, max_lag=1)
    assert [r.group_id for r in rank0.rollouts] == ["g2", "g2"] and [r.group_id for r in rank1.rollouts] == ["g3", "g3"]
    again = InMemoryBatchSource(rollouts).next_batch(step=1, rank=0, world_size=2, size=4, learner_version=1, max_lag=1)
    assert [r.rollout_id for r in again.rollouts] == [r.rollout_id for r in rank0.rollouts]
    with pytest.raises(ValueError, match="multiple of the group size"):
        source.next_batch(step=0, rank=0, world_size=1, size=3, learner_version=0, max_lag=0)


def test_fp32_head_computes_in_fp32_from_bf16_hidden_states():
    from tether.learner.model import Fp32LMHead

    head = Fp32LMHead(8, 5, bias=False)
    hidden = torch.randn(3, 8).to(torch.bfloat16)
    out = head(hidden)
    assert out.dtype == torch.float32 and head.weight.dtype == torch.float32
    torch.testing.assert_close(out, hidden.float() @ head.weight.detach().T, atol=0, rtol=0)


def test_config_rejects_bad_learner_keys():
    from tether.common.config import load_config
    from tether.common.errors import ConfigError

    with pytest.raises(ConfigError, match="learner.static_group"):
        load_config(None, ["learner.publish_to=static", "learner.static_group=nohost"])
    with pytest.raises(ConfigError, match="learner.publish_to"):
        load_config(None, ["learner.publish_to=somewhere"])


def test_publisher_skips_broadcast_without_receivers_and_names_hf_tensors():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from tether.learner.publish import StaticRendezvous, WeightPublisher

    config = Qwen2Config(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False)
    model = Qwen2ForCausalLM(config)
    publisher = WeightPublisher(model, rank=0, bucket_bytes=1024, body_dtype=torch.bfloat16, fp32_lm_head=True)
    specs = {s.name: s for s in publisher.specs()}
    assert specs["lm_head.weight"].dtype == "float32" and specs["model.layers.0.self_attn.q_proj.weight"].dtype == "bfloat16"
    update = StaticRendezvous("127.0.0.1", 1, world_size=1).publish(3, publisher.specs(), 1024)
    assert update is None  # a group of one has no receivers
    stats = publisher.broadcast(3, update)
    assert stats.receivers == 0 and stats.bytes == 0 and stats.version == 3 and stats.ok


def test_empty_completion_counts_in_its_group_advantages_by_default():
    """An empty completion trains on no token, but by default (as in TRL) its reward stays in its
    group's statistics: dropping it first would change every other member's advantage."""
    rollouts = [_rollout(0, 0, 2, [0, 0], 1.0), _rollout(1, 0, 2, [0], 0.0), _rollout(2, 0, 2, [], 0.0),
                _rollout(3, 0, 2, [0, 0, 0], 1.0)]
    full_group = group_normalised_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]), torch.zeros(4, dtype=torch.long))
    prepared = prepare_batch(rollouts, 0, 1, micro_batch_size=4, advantage_fn=group_normalised_advantages)
    (mb,) = prepared.micro_batches
    assert prepared.dropped_empty == 1 and mb.completion_ids.shape[0] == 3
    # length-sorted: rollout 1 (3 tokens in all), rollout 0 (4), rollout 3 (5)
    torch.testing.assert_close(mb.advantages, full_group[[1, 0, 3]])
    dropped = prepare_batch(rollouts, 0, 1, micro_batch_size=4, advantage_fn=group_normalised_advantages,
                            empty_completions="drop")
    torch.testing.assert_close(dropped.micro_batches[0].advantages,
                               group_normalised_advantages(torch.tensor([0.0, 1.0, 1.0]), torch.zeros(3, dtype=torch.long)))


def test_clip_gradients_zero_disables_clipping_and_reports_the_norm():
    from tether.learner.gradients import clip_gradients

    def grads(scale: float):
        layer = torch.nn.Linear(3, 2)
        with torch.no_grad():
            layer.weight.fill_(1.0)
            layer.bias.fill_(0.0)
        (layer(torch.ones(1, 3)).sum() * scale).backward()
        return layer

    layer = grads(1.0)  # d/dW = 1 (6 entries), d/db = 1 (2 entries): norm sqrt(8)
    assert clip_gradients(layer.parameters(), 0.0) == pytest.approx(math.sqrt(8))
    assert torch.equal(layer.weight.grad, torch.ones(2, 3))  # 0 disables: untouched, not zeroed
    layer = grads(1.0)
    assert clip_gradients(layer.parameters(), 1.0) == pytest.approx(math.sqrt(8))  # the norm before clipping
    total = torch.cat([layer.weight.grad.flatten(), layer.bias.grad]).norm()
    assert total.item() == pytest.approx(1.0, rel=1e-5)
    layer = grads(float("inf"))
    assert not math.isfinite(clip_gradients(layer.parameters(), 1.0))


def test_learning_rate_schedules_warm_up_then_decay_to_the_floor_at_the_last_step():
    from tether.learner.schedule import learning_rate

    def lrs(schedule, **kw):
        return [learning_rate(s, lr=1.0, steps=11, schedule=schedule, **kw) for s in range(11)]

    assert lrs("constant") == [1.0] * 11
    assert lrs("linear") == pytest.approx([1.0 - s / 10 for s in range(11)])
    cosine = lrs("cosine", min_lr_ratio=0.2)
    assert cosine[0] == pytest.approx(1.0) and cosine[5] == pytest.approx(0.6) and cosine[10] == pytest.approx(0.2)
    assert all(a >= b for a, b in zip(cosine[:-1], cosine[1:], strict=True))
    warm = lrs("linear", warmup_steps=4)
    assert warm[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0]) and warm[4] == pytest.approx(1.0)
    assert warm[10] == pytest.approx(0.0) and learning_rate(50, lr=1.0, steps=11, schedule="linear") == 0.0
    with pytest.raises(ValueError, match="schedule"):
        learning_rate(0, lr=1.0, steps=10, schedule="step")


def test_config_rejects_bad_schedules():
    from tether.common.config import load_config
    from tether.common.errors import ConfigError

    with pytest.raises(ConfigError, match="learner.lr_schedule"):
        load_config(None, ["learner.lr_schedule=exponential"])
    with pytest.raises(ConfigError, match="learner.warmup_steps"):
        load_config(None, ["learner.steps=10", "learner.warmup_steps=10"])
    with pytest.raises(ConfigError, match="learner.min_lr_ratio"):
        load_config(None, ["learner.min_lr_ratio=1.5"])


def test_zero_advantage_rollouts_are_kept_but_not_batched():
    """A group whose rewards are all equal has advantage 0 everywhere: skipped from the micro-batches,
    still in the rewards, the archive and the step's token total (the loss's denominator)."""
    rollouts = [_rollout(0, 0, 2, [0, 0], 1.0), _rollout(1, 0, 2, [0], 1.0),        # uniform group
                _rollout(2, 1, 2, [0, 0, 0], 1.0), _rollout(3, 1, 2, [0], 0.0)]     # informative group
    full = prepare_batch(rollouts, 0, 1, micro_batch_size=4, advantage_fn=group_normalised_advantages)
    skipped = prepare_batch(rollouts, 0, 1, micro_batch_size=4, advantage_fn=group_normalised_advantages,
                            skip_zero_advantage=True)
    (mb,) = skipped.micro_batches
    assert mb.completion_ids.shape[0] == 2 and sorted(mb.advantages.tolist()) == sorted(full.advantages[2:].tolist())
    assert skipped.zero_advantage == 2 and skipped.zero_advantage_tokens == 3
    assert skipped.total_tokens == full.total_tokens == 7
    assert [r.rollout_id for r in skipped.kept] == ["r0", "r1", "r2", "r3"]
    assert skipped.rewards.tolist() == full.rewards.tolist()
    assert full.zero_advantage == 0 and sum(m.completion_ids.shape[0] for m in full.micro_batches) == 4
    # every group uniform: nothing to batch, but the tokens still count (the step is taken, with zero gradient)
    uniform = prepare_batch(rollouts[:2], 0, 1, micro_batch_size=4, advantage_fn=group_normalised_advantages,
                            skip_zero_advantage=True)
    assert uniform.micro_batches == [] and uniform.total_tokens == 3


def test_lag_covers_every_kept_token_including_skipped_ones():
    """The step's lag describes what it consumed: a skipped (advantage-0) rollout's tokens count, a
    dropped (stale or empty) one's do not, and a batch that kept nothing reports neutral extremes."""
    rollouts = [_rollout(0, 0, 2, [3, 4], 1.0), _rollout(1, 0, 2, [5], 1.0),          # uniform: skipped
                _rollout(2, 1, 2, [5, 5, 5], 1.0), _rollout(3, 1, 2, [4], 0.0),      # trained
                _rollout(4, 2, 2, [1, 5], 1.0), _rollout(5, 2, 2, [], 0.0)]          # stale, empty
    for skip in (False, True):
        prepared = prepare_batch(rollouts, 5, 2, micro_batch_size=4, advantage_fn=group_normalised_advantages,
                                 skip_zero_advantage=skip)
        assert prepared.zero_advantage == (2 if skip else 0) and prepared.dropped_stale == 1
        # tokens of r0..r3 at learner version 5: lags 2,1 | 0 | 0,0,0 | 1
        assert (prepared.lag_min, prepared.lag_max, prepared.lag_sum) == (0.0, 2.0, 4)
    nothing = prepare_batch(rollouts[4:], 5, 2, micro_batch_size=4, advantage_fn=group_normalised_advantages)
    assert (nothing.lag_min, nothing.lag_max, nothing.lag_sum) == (math.inf, -math.inf, 0)
