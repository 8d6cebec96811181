"""Plain REINFORCE: advantage = reward (no baseline), truncated importance weight (tis_cap) as in RLOO."""

from __future__ import annotations

from tether.learner.algorithms.core import Algorithm, raw_reward_advantages
from tether.learner.algorithms.rloo import rloo_loss

# Same estimator as RLOO; only the baseline differs, so the loss is shared rather than copied.
ALGORITHM = Algorithm(name="reinforce", advantages=raw_reward_advantages, loss=rloo_loss)
