"""Rules a rollout must satisfy against the run, beyond what its record type checks.

The decoder already guarantees a well-formed Rollout (common/messages.py). These rules need the
run's configuration and the version book: who sent it, how long a completion may be, which token
ids exist, which versions have been published.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from tether.common.messages import Rollout


@dataclass(frozen=True)
class RolloutRules:
    group_size: int
    """actor.sampling.group_size: every group has exactly this many completions."""
    max_tokens: int
    """actor.sampling.max_tokens: the longest completion an actor may produce."""
    vocab_size: int | None
    """The model's vocabulary size (None: unknown, token ids are not range-checked)."""

    def problems(self, rollouts: Sequence[Rollout], sender: str, latest_version: int,
                 max_token_id: int | None = None) -> list[str | None]:
        """`problem` of each rollout of one message, in order. The token ids of all of them are
        range-checked at once; only when one is out of range does each rollout get the full check
        (which names the rollout and the id exactly as `problem` does). `max_token_id`: the largest
        token id of `rollouts`, when the decoder found it already (wire.Message.max_token_id)."""
        if max_token_id is None and self.vocab_size is not None:
            max_token_id = _max_token_id(rollouts)
        if self.vocab_size is not None and max_token_id >= self.vocab_size:
            return [self.problem(rollout, sender, latest_version) for rollout in rollouts]
        group_size, max_tokens = self.group_size, self.max_tokens
        problems: list[str | None] = []
        for rollout in rollouts:
            # problem() is None, inline (the common case); otherwise problem() names the rule broken.
            versions = rollout.versions.data
            if (rollout.actor_id == sender and rollout.group_size == group_size
                    and rollout.completion_token_ids.shape[0] <= max_tokens and rollout.sampling.max_tokens <= max_tokens
                    and (not versions or int.from_bytes(versions[-4:], "little", signed=True) <= latest_version)):
                problems.append(None)
            else:
                problems.append(self.problem(rollout, sender, latest_version, check_vocab=False))
        return problems

    def problem(self, rollout: Rollout, sender: str, latest_version: int, *, check_vocab: bool = True) -> str | None:
        """Why `rollout` from `sender` is unacceptable, or None when it is fine.

        `check_vocab=False`: the caller has checked the token ids against the vocabulary already.
        """
        if rollout.actor_id != sender:
            return f"actor_id {rollout.actor_id!r} is not the sender {sender!r}"
        if rollout.group_size != self.group_size:
            return f"group_size {rollout.group_size} differs from actor.sampling.group_size={self.group_size}"
        n = rollout.num_completion_tokens
        if n > self.max_tokens:
            return f"completion of {n} tokens exceeds actor.sampling.max_tokens={self.max_tokens}"
        if rollout.sampling.max_tokens > self.max_tokens:
            return f"sampling.max_tokens {rollout.sampling.max_tokens} exceeds actor.sampling.max_tokens={self.max_tokens}"
        if check_vocab and self.vocab_size is not None:
            for name in ("prompt_token_ids", "completion_token_ids"):
                ids = getattr(rollout, name).numpy()
                if ids.size and int(ids.max()) >= self.vocab_size:
                    return f"{name} holds token id {int(ids.max())}, outside the vocabulary of {self.vocab_size}"
        if n and rollout.max_version > latest_version:
            return f"token version {rollout.max_version} was never published (latest is {latest_version})"
        return None


def _max_token_id(rollouts: Sequence[Rollout]) -> int:
    """The largest prompt or completion token id of any of `rollouts` (-1: none)."""
    ids = b"".join([data for r in rollouts for data in (r.prompt_token_ids.data, r.completion_token_ids.data)])
    return int(np.frombuffer(ids, dtype="<i4").max()) if ids else -1
