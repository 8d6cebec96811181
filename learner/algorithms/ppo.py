"""PPO-clip without a critic: group-centred advantages, token-level ratio clipped asymmetrically.

The clip range is [1 - clip_low, 1 + clip_high]; clip_high > clip_low is DAPO's clip-higher, which
leaves room for low-probability tokens to grow. Advantages are r - group mean without the std
scaling of GRPO. The per-token objective is the same clipped surrogate as GRPO's, so the loss is
GRPO's; only the advantage estimator differs.
"""

from __future__ import annotations

from tether.learner.algorithms.core import Algorithm, group_centred_advantages
from tether.learner.algorithms.grpo import grpo_loss

ALGORITHM = Algorithm(name="ppo", advantages=group_centred_advantages, loss=grpo_loss)
