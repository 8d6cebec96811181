"""From a rank's rollouts to padded micro-batches, dropping (and counting) stale samples.

Packing strategy: sequences are sorted by total length and cut into micro-batches of
`micro_batch_size`, each right-padded only to its own longest sequence, so padding stays small
without a varlen attention kernel (the pad fraction is reported as a metric).

Groups stay whole on a rank: advantages are normalised within a group, so a BatchSource hands each
rank complete groups and advantages are computed here over the rank's rollouts.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from tether.common.messages import Rollout
from tether.common.staleness import is_stale


@dataclass(frozen=True)
class MicroBatch:
    """B sequences, right-padded. Sequence tensors are [B, T]; completion tensors are [B, L]."""

    input_ids: torch.Tensor
    """[B, T] prompt followed by completion, padded with 0."""
    attention_mask: torch.Tensor
    """[B, T] 1 on real tokens."""
    prompt_lengths: torch.Tensor
    """[B] number of prompt tokens; completion token i sits at position prompt_length + i."""
    completion_ids: torch.Tensor
    """[B, L] completion tokens, padded with 0."""
    mask: torch.Tensor
    """[B, L] float 1.0 on completion tokens."""
    behaviour_logprobs: torch.Tensor
    """[B, L] the actor's processed logprobs (0 on padding)."""
    versions: torch.Tensor
    """[B, L] int64 weight version of each token (-1 on padding)."""
    advantages: torch.Tensor
    """[B]"""
    sampling: tuple[tuple[float, int, float], ...]
    """Per sequence (temperature, top_k, top_p), replayed by the learner's logprob processing."""

    @property
    def num_tokens(self) -> int:
        return int(self.mask.sum())

    def logit_positions(self) -> torch.Tensor:
        """[B, L] position whose logits predict each completion token (the one before it)."""
        steps = torch.arange(self.completion_ids.shape[1])
        last = self.input_ids.shape[1] - 1
        return (self.prompt_lengths.unsqueeze(-1) - 1 + steps).clamp(max=last)

    def with_zero_weight(self) -> MicroBatch:
        """The same inputs contributing nothing: lets a rank with fewer micro-batches join the collectives."""
        return MicroBatch(**{**self.__dict__, "mask": torch.zeros_like(self.mask)})


@dataclass(frozen=True)
class PreparedBatch:
    micro_batches: list[MicroBatch]
    rewards: np.ndarray
    """Rewards of the kept rollouts."""
    dropped_stale: int
    """Rollouts dropped here for exceeding max_lag (the broker's own count is added by the caller)."""
    dropped_empty: int
    pad_tokens: int
    real_tokens: int
    kept: tuple[Rollout, ...] = ()
    """The rollouts trained on, in the order of `rewards` and `advantages` (for the rollout archive)."""
    advantages: np.ndarray | None = None
    """Advantage of each kept rollout."""
    zero_advantage: int = 0
    """Kept rollouts left out of the micro-batches because their advantage is exactly 0 (skip_zero_advantage)."""
    zero_advantage_tokens: int = 0
    """Their completion tokens: still part of the step's token total, so the loss's normalisation is unchanged."""
    lag_sum: int = 0
    """Sum over every kept completion token (trained on or skipped) of learner_version - its version."""
    lag_min: float = math.inf
    """Smallest lag of a kept token (inf when nothing was kept: neutral for a min over ranks)."""
    lag_max: float = -math.inf
    """Largest lag of a kept token (-inf when nothing was kept)."""

    @property
    def total_tokens(self) -> int:
        """Completion tokens of every kept rollout, trained on or skipped: the loss's denominator."""
        return sum(mb.num_tokens for mb in self.micro_batches) + self.zero_advantage_tokens


def keep_fresh(rollouts: Sequence[Rollout], learner_version: int, max_lag: int) -> tuple[list[Rollout], int, int]:
    """Rollouts whose oldest token has lag <= max_lag, plus the counts of stale and empty ones dropped.

    The rule is common/staleness.py's, the one the broker applies before it serves a batch.
    """
    kept, stale, empty = [], 0, 0
    for rollout in rollouts:
        if rollout.num_completion_tokens == 0:
            empty += 1
        elif is_stale(rollout.min_version, learner_version, max_lag):
            stale += 1
        else:
            kept.append(rollout)
    return kept, stale, empty


def group_indices(rollouts: Sequence[Rollout]) -> torch.Tensor:
    """Dense group index per rollout, in order of first appearance."""
    index: dict[str, int] = {}
    return torch.tensor([index.setdefault(r.group_id, len(index)) for r in rollouts], dtype=torch.long)


def _collate(rollouts: Sequence[Rollout], advantages: torch.Tensor) -> MicroBatch:
    prompts = [r.prompt_token_ids.numpy() for r in rollouts]
    completions = [r.completion_token_ids.numpy() for r in rollouts]
    total = max(len(p) + len(c) for p, c in zip(prompts, completions, strict=True))
    longest = max(len(c) for c in completions)
    b = len(rollouts)
    input_ids = torch.zeros(b, total, dtype=torch.long)
    attention_mask = torch.zeros(b, total, dtype=torch.long)
    completion_ids = torch.zeros(b, longest, dtype=torch.long)
    mask = torch.zeros(b, longest)
    behaviour = torch.zeros(b, longest)
    versions = torch.full((b, longest), -1, dtype=torch.long)
    for i, (rollout, prompt, completion) in enumerate(zip(rollouts, prompts, completions, strict=True)):
        p, c = len(prompt), len(completion)
        input_ids[i, :p] = torch.from_numpy(prompt.astype(np.int64))
        input_ids[i, p:p + c] = torch.from_numpy(completion.astype(np.int64))
        attention_mask[i, :p + c] = 1
        completion_ids[i, :c] = input_ids[i, p:p + c]
        mask[i, :c] = 1.0
        behaviour[i, :c] = torch.from_numpy(rollout.logprobs.numpy().copy())
        versions[i, :c] = torch.from_numpy(rollout.versions.numpy().astype(np.int64))
    return MicroBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        prompt_lengths=torch.tensor([len(p) for p in prompts], dtype=torch.long),
        completion_ids=completion_ids,
        mask=mask,
        behaviour_logprobs=behaviour,
        versions=versions,
        advantages=advantages,
        sampling=tuple((r.sampling.temperature, r.sampling.top_k, r.sampling.top_p) for r in rollouts),
    )


def prepare_batch(
    rollouts: Sequence[Rollout],
    learner_version: int,
    max_lag: int,
    micro_batch_size: int,
    advantage_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    empty_completions: str = "group",
    skip_zero_advantage: bool = False,
) -> PreparedBatch:
    """Drop stale and empty rollouts, compute advantages per group, and cut length-sorted micro-batches.

    `empty_completions` (learner.empty_completions): `group` keeps an empty completion's reward in its
    group's advantage statistics, `drop` computes advantages without it. Either way it trains on no
    token and is counted in dropped_empty.

    `skip_zero_advantage` (learner.skip_zero_advantage): a rollout whose advantage is exactly 0 is
    kept (its reward, its place in the archive, its tokens in `total_tokens`) but put in no
    micro-batch. Only for a loss that vanishes with the advantage (Algorithm.zero_advantage_is_inert)
    and no KL term: then it adds nothing to the gradient, and skipping it saves its forward and backward.
    """
    kept, stale, empty = keep_fresh(rollouts, learner_version, max_lag)
    rewards = np.array([r.reward for r in kept], dtype=np.float32)
    if not kept:
        return PreparedBatch([], rewards, stale, empty, 0, 0)
    members = list(kept)
    if empty_completions == "group":
        members += [r for r in rollouts if r.num_completion_tokens == 0]
    member_rewards = torch.tensor([r.reward for r in members], dtype=torch.float32)
    advantages = advantage_fn(member_rewards, group_indices(members))[:len(kept)]
    lengths = [r.prompt_token_ids.shape[0] + r.num_completion_tokens for r in kept]
    left_out = [skip_zero_advantage and not nonzero for nonzero in (advantages != 0).tolist()]
    trained = [i for i, out in enumerate(left_out) if not out]
    skipped = [r for r, out in zip(kept, left_out, strict=True) if out]
    order = sorted(trained, key=lambda i: lengths[i])
    micro_batches, pad = [], 0
    for start in range(0, len(order), micro_batch_size):
        chunk = order[start:start + micro_batch_size]
        mb = _collate([kept[i] for i in chunk], advantages[chunk])
        pad += mb.input_ids.numel() - int(mb.attention_mask.sum())
        micro_batches.append(mb)
    return PreparedBatch(micro_batches, rewards, stale, empty, pad, sum(lengths[i] for i in trained), kept=tuple(kept),
                         advantages=advantages.detach().cpu().numpy(), zero_advantage=len(skipped),
                         zero_advantage_tokens=sum(r.num_completion_tokens for r in skipped),
                         **_lag_stats(kept, learner_version))


def _lag_stats(kept: Sequence[Rollout], learner_version: int) -> dict:
    """Lag of the batch's tokens, over every kept rollout: a property of what the step consumed, so
    it does not depend on which rollouts the loss needed (skip_zero_advantage leaves some out)."""
    return {
        "lag_sum": sum(learner_version * r.num_completion_tokens - int(r.versions.numpy().sum(dtype=np.int64))
                       for r in kept),
        "lag_min": float(learner_version - max(r.max_version for r in kept)),
        "lag_max": float(learner_version - min(r.min_version for r in kept)),
    }
