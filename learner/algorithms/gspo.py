"""GSPO (Zheng et al. 2025): one importance ratio per sequence, the geometric mean of its tokens' ratios.

s_i = exp(mean_t(log pi - log pi_old)) is clipped like PPO's ratio (GSPO uses a much narrower range,
e.g. clip_low=3e-4, clip_high=4e-4). Each token carries its sequence's loss, so
`aggregation=sequence` is exactly the paper's objective; `token` weights sequences by length.
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
    clipped_surrogate,
    group_normalised_advantages,
    masked_mean,
)


def gspo_loss(inp: LossInput, params: LossParams) -> LossOutput:
    lengths = inp.mask.sum(-1).clamp(min=1.0)
    seq_log_ratio = ((inp.logprobs - inp.old_logprobs) * inp.mask).sum(-1) / lengths
    ratio = torch.exp(seq_log_ratio)
    pg_loss, clipped = clipped_surrogate(ratio, inp.advantages, params)
    pg_loss_tokens = pg_loss.unsqueeze(-1).expand_as(inp.mask)
    metrics = {
        "pg_loss": masked_mean(pg_loss_tokens.detach(), inp.mask),
        "clamp_log_ratio_new_old_indicator": masked_mean(clipped.unsqueeze(-1).expand_as(inp.mask), inp.mask),
        "ratio_mean": masked_mean(ratio.detach().unsqueeze(-1).expand_as(inp.mask), inp.mask),
    }
    per_token = add_kl_penalty(pg_loss_tokens, inp, params, metrics)
    return LossOutput(loss=aggregate(per_token, inp, params.aggregation), metrics=metrics)


ALGORITHM = Algorithm(name="gspo", advantages=group_normalised_advantages, loss=gspo_loss)
