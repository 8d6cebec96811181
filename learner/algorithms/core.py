"""Typed input/output of every loss, and the pieces several losses share.

Shapes: B sequences in a micro-batch, L completion positions (right-padded). `mask` is 1.0 on real
completion tokens and 0.0 on padding. Everything is float32.

Normalisation: a step's loss is a mean over the whole step (all micro-batches on all ranks), so
each micro-batch's loss is its *sum* divided by the step's totals (`total_tokens`,
`total_sequences`). Summing micro-batch losses over ranks then equals the loss of the whole batch
on one process. Left as None, the totals are this micro-batch's own (a plain mean).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from tether.learner.algorithms import ADVANTAGE_STDS, AGGREGATIONS

LOG_RATIO_CLAMP = 20.0
"""|log pi - log pi_behaviour| is clamped to this before exp. float32 exp overflows above about 88.7,
and a behaviour logprob of -100 is a valid rollout: the ratio would be inf and its gradient, even
where the clip discards the term, 0 * inf = NaN in every weight. exp(20) ~ 4.9e8 is far outside any
trust region, so the clamp only touches tokens the clip already treats as extreme (verl clamps the
same way); a clamped token passes no gradient."""


@dataclass(frozen=True, kw_only=True)
class LossParams:
    """Hyper-parameters every loss may read (from LearnerConfig, whose docstrings say more)."""

    clip_low: float = 0.2
    """The ratio is clipped below at 1 - clip_low."""
    clip_high: float = 0.28
    """The ratio is clipped above at 1 + clip_high (clip-higher when > clip_low)."""
    dual_clip: float = 2.0
    """grpo, ppo, gspo: dual-clip constant c; a negative-advantage token's loss is capped at -A * c.
    0 disables. LearnerConfig requires c >= 1 + clip_high (below it the cap would act inside the
    trust region)."""
    tis_cap: float = 2.0
    """rloo, reinforce: truncated importance weight min(pi / pi_behaviour, tis_cap); 0 disables (weight 1)."""
    kl_coef: float = 0.0
    """Weight of the per-token KL to the reference policy (k3 estimator)."""
    aggregation: str = "token"
    """token: mean over tokens; sequence: mean over sequences of per-sequence token means."""

    def __post_init__(self) -> None:
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {self.aggregation!r}")


@dataclass(frozen=True, kw_only=True)
class AdvantageParams:
    """How group-normalised advantages (grpo, gspo) scale by the group's spread."""

    std: str = "sample"
    """sample: std with Bessel's correction (n - 1), as TRL and torch.std; population: divide by n."""
    eps: float = 1e-4
    """Added to the group std before dividing (TRL's value)."""

    def __post_init__(self) -> None:
        if self.std not in ADVANTAGE_STDS:
            raise ValueError(f"std must be one of {ADVANTAGE_STDS}, got {self.std!r}")


@dataclass(frozen=True)
class LossInput:
    """One micro-batch as a loss sees it."""

    logprobs: torch.Tensor
    """[B, L] processed logprobs of the completion tokens under the current weights (differentiable)."""
    old_logprobs: torch.Tensor
    """[B, L] behaviour logprobs: what the actor reported when it sampled each token (the rollout's)."""
    advantages: torch.Tensor
    """[B] one advantage per sequence."""
    mask: torch.Tensor
    """[B, L] 1.0 on completion tokens, 0.0 on padding."""
    ref_logprobs: torch.Tensor | None = None
    """[B, L] logprobs under the frozen reference policy; needed when kl_coef > 0."""
    total_tokens: float | None = None
    total_sequences: float | None = None


@dataclass(frozen=True)
class LossOutput:
    loss: torch.Tensor
    """Scalar to backpropagate."""
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)
    """Detached scalars, each a mean over this micro-batch's tokens."""


@dataclass(frozen=True)
class Algorithm:
    """What a module in tether.learner.algorithms registers."""

    name: str
    advantages: Callable[..., torch.Tensor]
    """(rewards [N], group_index [N] ints, AdvantageParams) -> advantages [N]; the params may be left out
    (defaults) and are ignored by estimators without a std."""
    loss: Callable[[LossInput, LossParams], LossOutput]
    zero_advantage_is_inert: bool = True
    """True when a sequence whose advantage is 0 adds nothing to the loss's gradient apart from the KL
    term (every loss of the form -A * f: all shipped ones). The learner then leaves such sequences
    out of forward and backward (learner.skip_zero_advantage). A loss with a term that does not
    vanish with A, such as an entropy bonus, must set False."""


# ---- advantages -------------------------------------------------------------------------------

_DEFAULT_ADVANTAGES = AdvantageParams()


def _group_stats(rewards: torch.Tensor, group_index: torch.Tensor, ddof: int = 0,
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sequence group size, group mean and group std (divided by n - ddof; 0 for a group of one)."""
    groups = int(group_index.max()) + 1 if group_index.numel() else 0
    count = torch.zeros(groups, dtype=torch.float64).index_add_(0, group_index, torch.ones_like(rewards, dtype=torch.float64))
    total = torch.zeros(groups, dtype=torch.float64).index_add_(0, group_index, rewards.double())
    mean = total / count
    sq = torch.zeros(groups, dtype=torch.float64).index_add_(0, group_index, (rewards.double() - mean[group_index]) ** 2)
    std = (sq / (count - ddof).clamp(min=1.0)).sqrt()
    return count[group_index], mean[group_index], std[group_index]


def group_normalised_advantages(rewards: torch.Tensor, group_index: torch.Tensor,
                                params: AdvantageParams = _DEFAULT_ADVANTAGES) -> torch.Tensor:
    """GRPO: (r - group mean) / (group std + eps), std and eps as `params` say."""
    _, mean, std = _group_stats(rewards, group_index, ddof=1 if params.std == "sample" else 0)
    return ((rewards.double() - mean) / (std + params.eps)).float()


def group_centred_advantages(rewards: torch.Tensor, group_index: torch.Tensor,
                             params: AdvantageParams = _DEFAULT_ADVANTAGES) -> torch.Tensor:
    """r - group mean, no std scaling (no length or difficulty bias from the std)."""
    _, mean, _ = _group_stats(rewards, group_index)
    return (rewards.double() - mean).float()


def leave_one_out_advantages(rewards: torch.Tensor, group_index: torch.Tensor,
                             params: AdvantageParams = _DEFAULT_ADVANTAGES) -> torch.Tensor:
    """RLOO: r_i - mean of the other rewards of its group (0 for a group of one)."""
    count, mean, _ = _group_stats(rewards, group_index)
    others = (mean * count - rewards.double()) / (count - 1).clamp(min=1)
    return torch.where(count > 1, rewards.double() - others, torch.zeros_like(others)).float()


def raw_reward_advantages(rewards: torch.Tensor, group_index: torch.Tensor,
                          params: AdvantageParams = _DEFAULT_ADVANTAGES) -> torch.Tensor:
    """Plain REINFORCE: the reward itself, no baseline."""
    return rewards.float().clone()


# ---- shared loss pieces -----------------------------------------------------------------------

def aggregate(per_token: torch.Tensor, inp: LossInput, aggregation: str) -> torch.Tensor:
    """Token- or sequence-level mean of a [B, L] per-token loss, normalised by the step's totals."""
    mask = inp.mask
    if aggregation == "token":
        total = inp.total_tokens if inp.total_tokens is not None else mask.sum().clamp(min=1.0)
        return (per_token * mask).sum() / total
    per_sequence = (per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
    total = inp.total_sequences if inp.total_sequences is not None else float(mask.shape[0])
    return per_sequence.sum() / total


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum() / mask.sum().clamp(min=1.0)


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) on samples from pi: exp(d) - d - 1 with d = ref - logp (>= 0).

    d is clamped like the policy ratio's log (clamp_log_ratio): exp(d) must not overflow either.
    """
    log_ratio = clamp_log_ratio(ref_logprobs - logprobs)
    return torch.exp(log_ratio) - log_ratio - 1.0


def add_kl_penalty(per_token: torch.Tensor, inp: LossInput, params: LossParams, metrics: dict) -> torch.Tensor:
    """per_token + kl_coef * KL(pi || pi_ref), recording kl_ref; unchanged when kl_coef is 0."""
    if params.kl_coef == 0.0:
        return per_token
    if inp.ref_logprobs is None:
        raise ValueError("kl_coef > 0 needs ref_logprobs")
    kl = kl_k3(inp.logprobs, inp.ref_logprobs)
    metrics["kl_ref"] = masked_mean(kl.detach(), inp.mask)
    return per_token + params.kl_coef * kl


def clamp_log_ratio(log_ratio: torch.Tensor) -> torch.Tensor:
    """log_ratio limited to [-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP], so that exp of it stays finite."""
    return log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)


def outside_trust_region(ratio: torch.Tensor, params: LossParams) -> torch.Tensor:
    """1.0 where the ratio lies outside [1 - clip_low, 1 + clip_high], else 0.0 (detached).

    PipelineRL's clip indicator: how far the policy has moved from the behaviour policy, whether or
    not the clip then changed the loss (that is the separate `clipped` indicator).
    """
    ratio = ratio.detach()
    return ((ratio < 1.0 - params.clip_low) | (ratio > 1.0 + params.clip_high)).float()


def clipped_surrogate(ratio: torch.Tensor, advantages: torch.Tensor, params: LossParams) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's pessimistic clipped objective with asymmetric bounds, plus the dual clip.

    Returns (pg_loss, clipped), where clipped is 1.0 where a clip changed the loss from the plain
    -A * ratio. `ratio` and `advantages` broadcast together. Dual clip (Ye et al. 2020, verl's
    clip_ratio_c, TRL's delta): for A < 0 the pessimistic max keeps -A * ratio, which grows without
    bound with the ratio; with dual_clip = c > 0 it is capped at -A * c, so one stale token whose
    ratio exploded cannot dominate the step. The clip already bounds positive advantages at
    1 + clip_high.
    """
    pg_loss1 = -advantages * ratio
    pg_loss2 = -advantages * torch.clamp(ratio, 1.0 - params.clip_low, 1.0 + params.clip_high)
    pg_loss = torch.max(pg_loss1, pg_loss2)
    clipped = pg_loss2 > pg_loss1
    if params.dual_clip > 0:
        pg_loss3 = -advantages * params.dual_clip
        dual_clipped = (advantages < 0) & (pg_loss3 < pg_loss)
        pg_loss = torch.where(dual_clipped, pg_loss3, pg_loss)
        clipped = clipped | dual_clipped
    return pg_loss, clipped.float()


def truncated_is_weight(ratio: torch.Tensor, tis_cap: float) -> torch.Tensor:
    """min(pi / pi_behaviour, tis_cap), detached: the truncated importance weight.

    With tis_cap == 0 the correction is off and the weight is 1 (plain on-policy REINFORCE).
    """
    if tis_cap == 0:
        return torch.ones_like(ratio)
    return ratio.detach().clamp(max=tis_cap)
