"""GRPO (Shao et al. 2024): group-normalised advantages, token-level clipped ratio.

The ratio is pi / pi_behaviour: `old_logprobs` are the logprobs the actor reported when it sampled
each token, so there is no separate pi_old (one optimizer step per batch).
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


def grpo_loss(inp: LossInput, params: LossParams) -> LossOutput:
    log_ratio = clamp_log_ratio(inp.logprobs - inp.old_logprobs)
    ratio = torch.exp(log_ratio)
    pg_loss, clipped = clipped_surrogate(ratio, inp.advantages.unsqueeze(-1), params)
    metrics = {
        "pg_loss": masked_mean(pg_loss.detach(), inp.mask),
        "ratio_outside_trust_region": masked_mean(outside_trust_region(ratio, params), inp.mask),
        "clipped_fraction": masked_mean(clipped, inp.mask),
        "ratio_mean": masked_mean(ratio.detach(), inp.mask),
    }
    per_token = add_kl_penalty(pg_loss, inp, params, metrics)
    return LossOutput(loss=aggregate(per_token, inp, params.aggregation), metrics=metrics)


ALGORITHM = Algorithm(name="grpo", advantages=group_normalised_advantages, loss=grpo_loss)
