"""PPO-clip without a critic: group-centred advantages, token-level ratio clipped asymmetrically.

The clip range is [1 - clip_low, 1 + clip_high]; clip_high > clip_low is DAPO's clip-higher, which
leaves room for low-probability tokens to grow. Advantages are r - group mean without the std
scaling of GRPO.
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
    group_centred_advantages,
    masked_mean,
)


def ppo_loss(inp: LossInput, params: LossParams) -> LossOutput:
    ratio = torch.exp(inp.logprobs - inp.old_logprobs)
    pg_loss, clipped = clipped_surrogate(ratio, inp.advantages.unsqueeze(-1), params)
    metrics = {
        "pg_loss": masked_mean(pg_loss.detach(), inp.mask),
        "clamp_log_ratio_new_old_indicator": masked_mean(clipped, inp.mask),
        "ratio_mean": masked_mean(ratio.detach(), inp.mask),
    }
    per_token = add_kl_penalty(pg_loss, inp, params, metrics)
    return LossOutput(loss=aggregate(per_token, inp, params.aggregation), metrics=metrics)


ALGORITHM = Algorithm(name="ppo", advantages=group_centred_advantages, loss=ppo_loss)
