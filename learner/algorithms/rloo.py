"""RLOO (Ahmadian et al. 2024): REINFORCE with a leave-one-out group baseline.

pg_loss = -A * w * log pi with w = min(pi / pi_behaviour, tis_cap) held constant: the truncated
importance weight corrects for tokens sampled by older weights (w = 1 when tis_cap = 0). There is
no trust region in this loss; `ratio_outside_trust_region` still reports how many tokens lie outside
[1 - clip_low, 1 + clip_high], and `clipped_fraction` how many had their weight truncated.
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
    leave_one_out_advantages,
    masked_mean,
    outside_trust_region,
    truncated_is_weight,
)


def rloo_loss(inp: LossInput, params: LossParams) -> LossOutput:
    # The weight is a constant of the estimator, not a path for the gradient: no grad through it.
    ratio = torch.exp(clamp_log_ratio(inp.logprobs.detach() - inp.old_logprobs))
    tis_weight = truncated_is_weight(ratio, params.tis_cap)
    advantages = inp.advantages.unsqueeze(-1)
    pg_loss = -advantages * tis_weight * inp.logprobs
    # Truncation changes the loss where the weight was capped and the advantage is not 0.
    truncated = (params.tis_cap > 0) & (ratio > params.tis_cap) & (advantages != 0)
    metrics = {
        "pg_loss": masked_mean(pg_loss.detach(), inp.mask),
        "tis_weight_mean": masked_mean(tis_weight, inp.mask),
        "ratio_outside_trust_region": masked_mean(outside_trust_region(ratio, params), inp.mask),
        "clipped_fraction": masked_mean(truncated.float(), inp.mask),
    }
    per_token = add_kl_penalty(pg_loss, inp, params, metrics)
    return LossOutput(loss=aggregate(per_token, inp, params.aggregation), metrics=metrics)


ALGORITHM = Algorithm(name="rloo", advantages=leave_one_out_advantages, loss=rloo_loss)
