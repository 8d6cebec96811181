"""RLOO (Ahmadian et al. 2024): REINFORCE with a leave-one-out group baseline.

pg_loss = -A * w * log pi with w = min(pi / pi_behaviour, tis_cap) held constant: the truncated
importance weight corrects for tokens sampled by older weights (w = 1 when tis_cap = 0).
"""

from __future__ import annotations

from tether.learner.algorithms.core import (
    Algorithm,
    LossInput,
    LossOutput,
    LossParams,
    add_kl_penalty,
    aggregate,
    leave_one_out_advantages,
    masked_mean,
    truncated_is_weight,
)


def rloo_loss(inp: LossInput, params: LossParams) -> LossOutput:
    log_ratio = inp.logprobs - inp.old_logprobs
    tis_weight = truncated_is_weight(log_ratio, params.tis_cap)
    pg_loss = -inp.advantages.unsqueeze(-1) * tis_weight * inp.logprobs
    metrics = {
        "pg_loss": masked_mean(pg_loss.detach(), inp.mask),
        "tis_weight_mean": masked_mean(tis_weight, inp.mask),
        "clamp_log_ratio_new_old_indicator": masked_mean(
            (log_ratio.detach().exp() > params.tis_cap).float() if params.tis_cap > 0 else 0 * inp.mask, inp.mask
        ),
    }
    per_token = add_kl_penalty(pg_loss, inp, params, metrics)
    return LossOutput(loss=aggregate(per_token, inp, params.aggregation), metrics=metrics)


ALGORITHM = Algorithm(name="rloo", advantages=leave_one_out_advantages, loss=rloo_loss)
