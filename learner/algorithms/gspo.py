"""GSPO (Zheng et al. 2025): one importance ratio per sequence, the geometric mean of its tokens' ratios.

s_i = exp(mean_t(log pi - log pi_behaviour)) is clipped like PPO's ratio (GSPO uses a much narrower
range, e.g. clip_low=3e-4, clip_high=4e-4). Each token carries its sequence's loss, so
`aggregation=sequence` is exactly the paper's objective; `token` weights sequences by length. The
clip metrics count a token by its sequence's ratio, the one the loss clips.
"""

from __future__ import annotations

import torch

from tether.learner.algorithms.core import (
    Algorithm,
    LossInput,
    LossOutput,
    LossParams,
    add_kl_penalty,
    aggregate,
    clamp_log_ratio,
    clipped_surrogate,
    group_normalised_advantages,
    masked_mean,
    outside_trust_region,
)


def gspo_loss(inp: LossInput, params: LossParams) -> LossOutput:
    lengths = inp.mask.sum(-1).clamp(min=1.0)
    seq_log_ratio = clamp_log_ratio(((inp.logprobs - inp.old_logprobs) * inp.mask).sum(-1) / lengths)
    ratio = torch.exp(seq_log_ratio)
    pg_loss, clipped = clipped_surrogate(ratio, inp.advantages, params)

    def per_token(per_sequence: torch.Tensor) -> torch.Tensor:
        return per_sequence.unsqueeze(-1).expand_as(inp.mask)

    pg_loss_tokens = per_token(pg_loss)
    metrics = {
        "pg_loss": masked_mean(pg_loss_tokens.detach(), inp.mask),
        "ratio_outside_trust_region": masked_mean(per_token(outside_trust_region(ratio, params)), inp.mask),
        "clipped_fraction": masked_mean(per_token(clipped), inp.mask),
        "ratio_mean": masked_mean(per_token(ratio.detach()), inp.mask),
    }
    loss_tokens = add_kl_penalty(pg_loss_tokens, inp, params, metrics)
    return LossOutput(loss=aggregate(loss_tokens, inp, params.aggregation), metrics=metrics)


ALGORITHM = Algorithm(name="gspo", advantages=group_normalised_advantages, loss=gspo_loss)
