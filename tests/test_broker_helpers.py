"""Shared helpers for the broker tests (not a test module)."""

from __future__ import annotations

import numpy as np

from tether.broker.state import BrokerState, RunPolicy
from tether.common import wire
from tether.common.config.broker import BrokerConfig
from tether.common.messages import (
    BatchRequest,
    Hello,
    PublishRequest,
    Rollout,
    SamplingSpec,
    SubmitRollouts,
    TensorSpec,
    UpdateReport,
    float32_array,
    int32_array,
)
from tether.common.net import free_port  # noqa: F401  re-exported for the tests

TENSORS = [TensorSpec(name="w", shape=(2, 2), dtype="float32")]


def make_rollout(rollout_id: str, group_id: str = "g0", group_size: int = 1, *, version: int | list[int] = 0,
                 tokens: int = 4, actor_id: str = "a0") -> Rollout:
    versions = np.full(tokens, version) if isinstance(version, int) else np.asarray(version)
    return Rollout(
        rollout_id=rollout_id, group_id=group_id, group_size=group_size, actor_id=actor_id, task="arith",
        prompt_token_ids=int32_array([1, 2, 3]),
        completion_token_ids=int32_array(np.arange(len(versions)) % 250),
        logprobs=float32_array(np.full(len(versions), -0.5)),
        versions=int32_array(versions),
        reward=1.0, sampling=SamplingSpec(temperature=1.0, max_tokens=max(len(versions), 1)), finish_reason="stop",
    )


def group(name: str, size: int, *, version: int | list[int] = 0, actor_id: str = "a0") -> list[Rollout]:
    """A whole group `name` of `size` rollouts with ids name-0, name-1, ..."""
    return [make_rollout(f"{name}-{i}", name, size, version=version, actor_id=actor_id) for i in range(size)]


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Harness:
    """A BrokerState on a fake clock, addressed by peer name (the name is also the connection)."""

    def __init__(self, policy: RunPolicy | None = None, ledger=None, key_roles=None, **overrides) -> None:
        self.clock = FakeClock()
        self.cfg = BrokerConfig(**{"peer_timeout_s": 5.0, "update_timeout_s": 10.0, "buffer_capacity": 64,
                                   "incomplete_group_ttl_s": 30.0, **overrides})
        self.policy = policy or RunPolicy(group_size=1, rollouts_per_step=4, max_lag=4, max_tokens=16)
        self.state = BrokerState(self.cfg, self.policy, ledger=ledger, clock=self.clock, key_roles=key_roles)
        self.credentials: dict[str, str | None] = {}

    def send(self, sender: str, body, msg_id: str | None = None, credential: str | None = None):
        data = wire.encode(body, sender=sender, msg_id=msg_id)
        return self.state.handle(sender.encode(), data, credential or self.credentials.get(sender))

    def actor(self, peer: str, *, workers: int = 1, version: int = 0, lineage: str = "", incarnation: str = "i0"):
        return self.send(peer, Hello(peer_id=peer, role="actor", incarnation=incarnation, worker_count=workers,
                                     loaded_version=version, loaded_lineage=lineage))

    def learner(self, rank: int = 0, *, session: str = "s1", version: int = 0, committed: int = -1,
                incarnation: str | None = None):
        peer = f"L{rank}"
        return self.send(peer, Hello(peer_id=peer, role="learner", incarnation=incarnation or f"{session}-{rank}",
                                     rank=rank, session=session, loaded_version=version,
                                     committed_version=committed))

    def submit(self, actor: str, rollouts: list[Rollout], msg_id: str | None = None):
        return self.send(actor, SubmitRollouts(rollouts=rollouts), msg_id)

    def request(self, rank: int = 0, *, seq: int = 1, size: int = 1, version: int = 0, max_lag: int = 4,
                msg_id: str | None = None):
        return self.send(f"L{rank}", BatchRequest(rank=rank, seq=seq, size=size, learner_version=version,
                                                  max_lag=max_lag), msg_id)

    def publish(self, version: int, msg_id: str | None = None):
        return self.send("L0", PublishRequest(version=version, tensors=TENSORS, bucket_bytes=1024), msg_id)

    def report(self, peer: str, version: int, epoch: int, ok: bool = True, error: str = ""):
        return self.send(peer, UpdateReport(version=version, epoch=epoch, ok=ok, error=error))

    def tick(self, seconds: float = 0.0):
        self.clock.advance(seconds)
        return self.state.tick()


def bodies(out, cls=None, to: str | None = None) -> list:
    return [o.body for o in out if (cls is None or isinstance(o.body, cls)) and (to is None or o.peer == to.encode())]


def addressed(out, cls) -> dict:
    """{peer name: body} of the messages of type `cls` in `out`."""
    return {o.peer.decode(): o.body for o in out if isinstance(o.body, cls)}


def balanced(state: BrokerState) -> bool:
    s = state.status()
    return s.stored_total == s.consumed_total + s.dropped_stale_total + s.buffer_depth + s.leased


# Re-exported so broker tests import everything from one place.
__all__ = ["TENSORS", "FakeClock", "Harness", "addressed", "balanced", "bodies", "free_port", "group",
           "make_rollout"]
