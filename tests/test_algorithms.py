"""Each loss and its gradient against hand-computed values on tiny tensors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tether.learner.algorithms import LossInput, LossParams, available_algorithms, get_algorithm
from tether.learner.algorithms.core import (
    LOG_RATIO_CLAMP,
    AdvantageParams,
    group_centred_advantages,
    group_normalised_advantages,
    kl_k3,
    leave_one_out_advantages,
)

torch.set_num_threads(1)


def test_registry_lists_every_algorithm_and_rejects_unknown():
    assert available_algorithms() == ["grpo", "gspo", "ppo", "reinforce", "rloo"]
    for name in available_algorithms():  # listed from the folder: each module must really be one
        assert get_algorithm(name).name == name
    with pytest.raises(ValueError, match="available: grpo, gspo"):
        get_algorithm("nope")


def test_advantages_by_hand():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 2.0, 4.0])
    groups = torch.tensor([0, 0, 0, 0, 1, 1])
    # group 0: mean 0.25, sample std sqrt(3/16 * 4/3) = 0.5; group 1: mean 3, sample std sqrt(2)
    expected = [1.5, -0.5, -0.5, -0.5, -1 / math.sqrt(2), 1 / math.sqrt(2)]
    torch.testing.assert_close(group_normalised_advantages(rewards, groups, AdvantageParams(eps=0.0)), torch.tensor(expected))
    # population std: sqrt(3/16) and 1
    std0 = math.sqrt(3 / 16)
    expected = [0.75 / std0, -0.25 / std0, -0.25 / std0, -0.25 / std0, -1.0, 1.0]
    torch.testing.assert_close(group_normalised_advantages(rewards, groups, AdvantageParams(std="population", eps=0.0)),
                               torch.tensor(expected))
    torch.testing.assert_close(group_centred_advantages(rewards, groups), torch.tensor([0.75, -0.25, -0.25, -0.25, -1.0, 1.0]))
    # leave-one-out: 1 - 0, 0 - 1/3 (x3), 2 - 4, 4 - 2
    torch.testing.assert_close(leave_one_out_advantages(rewards, groups), torch.tensor([1.0, -1 / 3, -1 / 3, -1 / 3, -2.0, 2.0]))
    # a group of identical rewards has zero advantage, not NaN
    same = group_normalised_advantages(torch.tensor([1.0, 1.0]), torch.tensor([0, 0]))
    assert torch.equal(same, torch.zeros(2))


def _input(logprobs, old, adv, mask, **kw):
    return LossInput(logprobs=logprobs, old_logprobs=old, advantages=adv, mask=mask, **kw)


def test_grpo_clip_higher_value_and_gradient_by_hand():
    # two sequences, 2 tokens each (second sequence has one padded slot)
    old = torch.log(torch.tensor([[0.5, 0.5], [0.5, 0.5]]))
    new_p = torch.tensor([[0.75, 0.25], [0.55, 0.9]])  # ratios 1.5, 0.5 | 1.1, (pad)
    logprobs = torch.log(new_p).requires_grad_()
    adv = torch.tensor([1.0, -1.0])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    params = LossParams(clip_low=0.2, clip_high=0.28, dual_clip=0.0, aggregation="token")
    out = get_algorithm("grpo").loss(_input(logprobs, old, adv, mask), params)
    # token (0,0): A=+1, ratio 1.5 -> clipped at 1.28, loss -1.28, no gradient
    # token (0,1): A=+1, ratio 0.5 -> min(0.5, 0.8)=0.5 unclipped: loss -0.5, d/dlogp = -0.5
    # token (1,0): A=-1, ratio 1.1 -> max(1.1, 1.1) loss 1.1 unclipped, d/dlogp = 1.1
    expected = (-1.28 - 0.5 + 1.1) / 3
    assert out.loss.item() == pytest.approx(expected, abs=1e-6)
    out.loss.backward()
    torch.testing.assert_close(logprobs.grad, torch.tensor([[0.0, -0.5 / 3], [1.1 / 3, 0.0]]))
    assert out.metrics["clipped_fraction"].item() == pytest.approx(1 / 3)
    assert out.metrics["ratio_outside_trust_region"].item() == pytest.approx(2 / 3)


def test_grpo_negative_advantage_clip_and_dual_clip():
    old = torch.zeros(1, 3)
    logprobs = torch.log(torch.tensor([[0.7, 5.0, 1.0]])).requires_grad_()  # ratios 0.7, 5, 1
    adv = torch.tensor([-2.0])
    mask = torch.ones(1, 3)
    params = LossParams(clip_low=0.2, clip_high=0.28, dual_clip=3.0)
    out = get_algorithm("grpo").loss(_input(logprobs, old, adv, mask), params)
    # 0.7 < 0.8 with A<0: max(1.4, 1.6) = 1.6 (clipped, no grad);
    # ratio 5: max(10, 2.56)=10, capped by the dual clip: min(10, 6) = 6 (no grad); ratio 1: 2, grad 2
    assert out.loss.item() == pytest.approx((1.6 + 6.0 + 2.0) / 3, abs=1e-5)
    out.loss.backward()
    torch.testing.assert_close(logprobs.grad, torch.tensor([[0.0, 0.0, 2.0 / 3]]))


def test_sequence_aggregation_and_step_totals():
    old = torch.zeros(2, 3)
    logprobs = torch.zeros(2, 3, requires_grad=True)  # ratio 1 everywhere: pg_loss = -A
    adv = torch.tensor([1.0, 3.0])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    ppo = get_algorithm("ppo").loss
    token = ppo(_input(logprobs, old, adv, mask), LossParams(aggregation="token"))
    assert token.loss.item() == pytest.approx(-(3 * 1 + 3) / 4)
    seq = ppo(_input(logprobs, old, adv, mask), LossParams(aggregation="sequence"))
    assert seq.loss.item() == pytest.approx(-(1 + 3) / 2)
    # step totals: the micro-batch is a part of a bigger step; its loss is its share
    part = ppo(_input(logprobs, old, adv, mask, total_tokens=8.0), LossParams(aggregation="token"))
    assert part.loss.item() == pytest.approx(-6 / 8)


def test_gspo_sequence_ratio_by_hand():
    old = torch.zeros(2, 2)
    # seq 0 log ratios 0.1, 0.3 -> mean 0.2; seq 1 log ratio 0.02 on its only token
    logprobs = torch.tensor([[0.1, 0.3], [0.02, -9.0]], requires_grad=True)
    adv = torch.tensor([1.0, 1.0])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    params = LossParams(clip_low=0.0003, clip_high=0.0004, dual_clip=0.0, aggregation="sequence")
    out = get_algorithm("gspo").loss(_input(logprobs, old, adv, mask), params)
    # both sequence ratios exceed 1.0004 with A>0: both clipped at 1.0004
    assert out.loss.item() == pytest.approx(-1.0004, abs=1e-6)
    out.loss.backward()
    assert torch.count_nonzero(logprobs.grad) == 0
    assert out.metrics["clipped_fraction"].item() == pytest.approx(1.0)
    # an unclipped sequence: grad of -exp(mean log ratio) wrt each token = -s/len, halved by 2 sequences
    logprobs = torch.tensor([[0.0, 0.0], [0.0, 0.0]], requires_grad=True)
    out = get_algorithm("gspo").loss(_input(logprobs, old, adv, mask), params)
    out.loss.backward()
    torch.testing.assert_close(logprobs.grad, torch.tensor([[-0.25, -0.25], [-0.5, 0.0]]))


def test_rloo_truncated_importance_weight_and_gradient():
    old = torch.log(torch.tensor([[0.5, 0.1]]))
    new = torch.tensor([[0.4, 0.5]])  # weights 0.8 and 5 -> truncated at 2
    logprobs = torch.log(new).requires_grad_()
    adv = torch.tensor([1.5])
    mask = torch.ones(1, 2)
    out = get_algorithm("rloo").loss(_input(logprobs, old, adv, mask), LossParams(tis_cap=2.0))
    expected = -(1.5 * 0.8 * math.log(0.4) + 1.5 * 2.0 * math.log(0.5)) / 2
    assert out.loss.item() == pytest.approx(expected, rel=1e-5)
    out.loss.backward()
    torch.testing.assert_close(logprobs.grad, torch.tensor([[-1.5 * 0.8 / 2, -1.5 * 2.0 / 2]]))
    assert out.metrics["clipped_fraction"].item() == pytest.approx(0.5)


def test_kl_penalty_value_and_gradient():
    old = torch.zeros(1, 1)
    logprobs = torch.tensor([[-1.0]], requires_grad=True)
    ref = torch.tensor([[-1.5]])
    params = LossParams(kl_coef=0.5, tis_cap=0.0)
    out = get_algorithm("reinforce").loss(_input(logprobs, old, torch.tensor([0.0]), torch.ones(1, 1), ref_logprobs=ref), params)
    d = -0.5  # ref - logp
    assert out.loss.item() == pytest.approx(0.5 * (math.exp(d) - d - 1), rel=1e-6)
    out.loss.backward()
    # d/dlogp [exp(ref - logp) + logp] = 1 - exp(ref - logp)
    assert logprobs.grad.item() == pytest.approx(0.5 * (1 - math.exp(d)), rel=1e-6)
    assert out.metrics["kl_ref"].item() == pytest.approx(math.exp(d) - d - 1, rel=1e-6)
    assert kl_k3(torch.zeros(3), torch.zeros(3)).abs().max() == 0


@pytest.mark.parametrize("name", ["grpo", "ppo", "gspo", "rloo", "reinforce"])
def test_on_policy_gradient_is_policy_gradient(name):
    """At ratio 1 (lag 0, no clipping) every loss's gradient is -A / N per token: the REINFORCE estimator."""
    torch.manual_seed(0)
    logp = (-torch.rand(3, 4)).requires_grad_()
    adv = torch.tensor([0.5, -1.0, 2.0])
    mask = torch.ones(3, 4)
    out = get_algorithm(name).loss(_input(logp, logp.detach(), adv, mask), LossParams(aggregation="token"))
    out.loss.backward()
    torch.testing.assert_close(logp.grad, (-adv / 12).unsqueeze(-1).expand(3, 4))


@pytest.mark.parametrize("name", available_algorithms())
@pytest.mark.parametrize("aggregation", ["token", "sequence"])
def test_zero_advantage_sequences_add_nothing_where_the_algorithm_says_so(name, aggregation):
    """learner.skip_zero_advantage relies on Algorithm.zero_advantage_is_inert: with the step's totals
    held fixed, dropping the advantage-0 sequences leaves the loss and the other rows' gradient unchanged,
    also off-policy (ratios far from 1, clipped)."""
    algorithm = get_algorithm(name)
    assert algorithm.zero_advantage_is_inert
    torch.manual_seed(1)
    logp = (-torch.rand(4, 5) * 3).requires_grad_()
    old = -torch.rand(4, 5) * 3
    adv = torch.tensor([0.0, 1.3, 0.0, -0.7])
    mask = torch.tensor([[1.0] * 5, [1.0] * 3 + [0.0] * 2, [1.0] * 4 + [0.0], [1.0] * 2 + [0.0] * 3])
    params = LossParams(aggregation=aggregation)
    full = algorithm.loss(LossInput(logprobs=logp, old_logprobs=old, advantages=adv, mask=mask,
                                    total_tokens=float(mask.sum()), total_sequences=4.0), params)
    full.loss.backward()
    rows = [1, 3]
    part_logp = logp.detach()[rows].clone().requires_grad_()
    part = algorithm.loss(LossInput(logprobs=part_logp, old_logprobs=old[rows], advantages=adv[rows], mask=mask[rows],
                                    total_tokens=float(mask.sum()), total_sequences=4.0), params)
    part.loss.backward()
    torch.testing.assert_close(part.loss, full.loss)
    torch.testing.assert_close(part_logp.grad, logp.grad[rows])
    assert logp.grad[[0, 2]].abs().max() == 0


# ---- behaviour logprobs far below the learner's: the log ratio is clamped before exp ------------

@pytest.mark.parametrize("name", ["grpo", "ppo", "gspo", "rloo", "reinforce"])
def test_extreme_behaviour_logprob_gives_finite_loss_and_gradient(name):
    """A behaviour logprob of -100 passes rollout validation; exp(logp + 100) overflows float32 (above
    about 88.7), and even where the clip discards the overflowing term its gradient 0 * inf is NaN."""
    torch.manual_seed(0)
    logprobs = (-torch.rand(4, 3)).requires_grad_()
    old = logprobs.detach().clone()
    old[0, 1] = -100.0  # one token of a sequence
    old[2, :] = -100.0  # a whole sequence (gspo's sequence ratio overflows too)
    adv = torch.tensor([1.0, -1.0, -2.0, 0.5])
    out = get_algorithm(name).loss(_input(logprobs, old, adv, torch.ones(4, 3)), LossParams())
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert torch.isfinite(logprobs.grad).all()
    assert all(torch.isfinite(v).all() for v in out.metrics.values())


def test_kl_penalty_stays_finite_where_the_policy_fell_far_below_the_reference():
    logprobs = torch.tensor([[-100.0, -0.5]], requires_grad=True)
    out = get_algorithm("grpo").loss(
        _input(logprobs, logprobs.detach().clone(), torch.tensor([1.0]), torch.ones(1, 2), ref_logprobs=torch.zeros(1, 2)),
        LossParams(kl_coef=0.1))
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(logprobs.grad).all()
    assert logprobs.grad[0, 1].item() != 0  # the unclamped token still feels the penalty


def test_clamped_token_takes_the_clipped_value_without_gradient():
    """Where the log ratio is clamped, the token's loss is what the clip gives an enormous ratio:
    1 + clip_high for A > 0, the dual clip c for A < 0; neither passes a gradient."""
    logprobs = torch.zeros(2, 1, requires_grad=True)
    old = torch.full((2, 1), -100.0)
    params = LossParams(clip_low=0.2, clip_high=0.28, dual_clip=3.0)
    out = get_algorithm("grpo").loss(_input(logprobs, old, torch.tensor([1.0, -2.0]), torch.ones(2, 1)), params)
    assert out.loss.item() == pytest.approx((-1.28 + 2.0 * 3.0) / 2)
    out.loss.backward()
    assert torch.count_nonzero(logprobs.grad) == 0
    assert LOG_RATIO_CLAMP <= 88.0 / 2  # exp(clamp) * |A| stays far from float32 overflow


# ---- the two clip metrics ---------------------------------------------------------------------

def _five_ratios():
    # one token per sequence (second slot padded): (ratio, advantage)
    ratios = torch.tensor([1.5, 0.5, 1.1, 5.0, 0.7])
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0, -1.0])
    logprobs = torch.stack([torch.log(ratios), torch.zeros(5)], -1)
    mask = torch.tensor([[1.0, 0.0]] * 5)
    return logprobs, torch.zeros(5, 2), adv, mask


@pytest.mark.parametrize("name", ["grpo", "ppo"])
def test_ratio_outside_trust_region_and_clipped_fraction_by_hand(name):
    """PipelineRL's definition: a ratio outside [1 - clip_low, 1 + clip_high] (4 of 5 here); the
    clip changed the loss on fewer (3 of 5): ratio 0.5 with A > 0 keeps its unclipped value."""
    logprobs, old, adv, mask = _five_ratios()
    params = LossParams(clip_low=0.2, clip_high=0.28, dual_clip=3.0)
    out = get_algorithm(name).loss(_input(logprobs, old, adv, mask), params)
    # 1.5, A>0: max(-1.5, -1.28) = -1.28, clipped | 0.5, A>0: max(-0.5, -0.8) = -0.5, not clipped
    # 1.1, A<0: inside | 5, A<0: max(5, 1.28) = 5, dual clip -> 3 | 0.7, A<0: max(0.7, 0.8) = 0.8, clipped
    assert out.metrics["ratio_outside_trust_region"].item() == pytest.approx(4 / 5)
    assert out.metrics["clipped_fraction"].item() == pytest.approx(3 / 5)
    assert out.loss.item() == pytest.approx((-1.28 - 0.5 + 1.1 + 3.0 + 0.8) / 5, abs=1e-6)
    without_dual = get_algorithm(name).loss(_input(logprobs, old, adv, mask), LossParams(dual_clip=0.0))
    assert without_dual.metrics["clipped_fraction"].item() == pytest.approx(2 / 5)


def test_gspo_clip_metrics_use_the_sequence_ratio():
    old = torch.zeros(2, 2)
    # sequence 0: token ratios exp(0.5), exp(-0.5): each outside, but the sequence ratio is 1
    logprobs = torch.tensor([[0.5, -0.5], [0.3, 0.3]])
    mask = torch.ones(2, 2)
    out = get_algorithm("gspo").loss(_input(logprobs, old, torch.tensor([1.0, 1.0]), mask),
                                     LossParams(clip_low=0.2, clip_high=0.28))
    assert out.metrics["ratio_outside_trust_region"].item() == pytest.approx(0.5)
    assert out.metrics["clipped_fraction"].item() == pytest.approx(0.5)


def test_rloo_clipped_fraction_counts_truncated_weights():
    logprobs, old, adv, mask = _five_ratios()
    out = get_algorithm("rloo").loss(_input(logprobs, old, adv, mask),
                                     LossParams(clip_low=0.2, clip_high=0.28, tis_cap=2.0))
    assert out.metrics["ratio_outside_trust_region"].item() == pytest.approx(4 / 5)
    assert out.metrics["clipped_fraction"].item() == pytest.approx(1 / 5)  # only ratio 5 exceeds the cap
    zero_adv = get_algorithm("rloo").loss(_input(logprobs, old, torch.zeros(5), mask), LossParams(tis_cap=2.0))
    assert zero_adv.metrics["clipped_fraction"].item() == 0.0  # A = 0: truncation changes nothing


# ---- group advantages: estimator and eps --------------------------------------------------------

def test_group_advantages_default_to_sample_std_and_eps_1e4_like_trl():
    rng = np.random.default_rng(0)
    rewards = rng.random(12)
    groups = np.repeat(np.arange(3), 4)
    expected = np.empty(12)
    for g in range(3):
        r = rewards[groups == g]
        expected[groups == g] = (r - r.mean()) / (r.std(ddof=1) + 1e-4)
    got = group_normalised_advantages(torch.tensor(rewards, dtype=torch.float32), torch.tensor(groups))
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-6)
    population = group_normalised_advantages(torch.tensor(rewards, dtype=torch.float32), torch.tensor(groups),
                                             AdvantageParams(std="population", eps=1e-6))
    for g in range(3):
        r = rewards[groups == g]
        expected[groups == g] = (r - r.mean()) / (r.std(ddof=0) + 1e-6)
    np.testing.assert_allclose(population.numpy(), expected, rtol=1e-5, atol=1e-6)


def test_near_tied_rewards_do_not_become_sizeable_advantages():
    """Rewards 1e-7 apart (float noise of a reward function) carry no signal: with population std and
    eps 1e-6 they became advantages of 0.085; with the defaults they stay below 1e-3."""
    rewards = torch.tensor([0.0] * 7 + [1e-7])
    adv = group_normalised_advantages(rewards, torch.zeros(8, dtype=torch.long))
    assert adv.abs().max().item() < 1e-3


def test_group_of_one_and_equal_rewards_have_zero_advantage_under_either_std():
    for std in ("sample", "population"):
        adv = group_normalised_advantages(torch.tensor([0.3, 1.0, 0.0, 0.1, 0.1, 0.1]),
                                          torch.tensor([0, 1, 1, 2, 2, 2]), AdvantageParams(std=std))
        assert adv[0].item() == 0.0 and torch.isfinite(adv).all()
        assert adv[3:].abs().max().item() < 1e-9  # 0.1 * 3 / 3 is not exactly 0.1: eps absorbs it
