"""weights.mode=stop_the_world: strictly on-policy batches.

Fast: the broker state's per-version quota and stale-on-arrival rules (pure state machine, fake
clock), the client's quota book over the in-process transport, the actor's gate, the config rule.
Slow: a real broker, one real vLLM actor and a real single-process learner for 3 steps.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from test_broker_helpers import FakeClock, free_port, make_rollout

from tether.actor.rollouts import StopTheWorldGate
from tether.broker.server import BrokerServer
from tether.broker.state import BrokerState
from tether.common import wire
from tether.common.config.broker import BrokerConfig
from tether.common.config.loader import load_config
from tether.common.errors import ConfigError
from tether.common.messages import (
    Ack,
    BatchRequest,
    Error,
    Heartbeat,
    Hello,
    Rollout,
    RolloutBatch,
    SamplingSpec,
    TensorSpec,
    VersionAck,
    WeightsAnnounce,
    float32_array,
    int32_array,
)
from tether.common.peer import BrokerClient
from tether.common.transport import InProcHub

TENSORS = [TensorSpec(name="w", shape=(2, 2), dtype="float32")]
GROUP = 2
PER_STEP = 4  # rollouts_per_step: two groups of two


class Harness:
    def __init__(self, mode: str = "stop_the_world", **overrides) -> None:
        self.clock = FakeClock()
        self.cfg = BrokerConfig(**{"peer_timeout_s": 5.0, "update_timeout_s": 10.0, "buffer_capacity": 64, **overrides})
        self.state = BrokerState(self.cfg, clock=self.clock, mode=mode, rollouts_per_step=PER_STEP)
        self.send("L0", Hello(peer_id="L0", role="learner"))
        self.send("a0", Hello(peer_id="a0", role="actor", loaded_version=0, pid=1))

    def send(self, sender: str, body, msg_id: str | None = None):
        return self.state.handle(sender.encode(), wire.encode(body, sender=sender, msg_id=msg_id))

    def rollouts(self, *rollouts: Rollout, sender: str = "a0", msg_id: str | None = None):
        return self.send(sender, RolloutBatch(rollouts=list(rollouts)), msg_id=msg_id)

    def publish(self, version: int) -> None:
        """The learner announces `version` and a0 loads it (completing the update)."""
        self.send("L0", WeightsAnnounce(version=version, epoch=0, tensors=TENSORS, bucket_bytes=1024))
        self.send("a0", VersionAck(peer_id="a0", version=version, epoch=self.state.epoch.number))
        assert self.state.update is None

    def books_balance(self) -> bool:
        s = self.state.status()
        return s.stored_total == s.consumed_total + s.dropped_stale_total + s.buffer_depth


def group(name: str, version: int = 0, size: int = GROUP, actor: str = "actor-0") -> list[Rollout]:
    return [make_rollout(f"{name}-{i}", name, size, version=version, actor_id=actor) for i in range(size)]


def mixed(rollout_id: str, group_id: str, versions: list[int]) -> Rollout:
    n = len(versions)
    return Rollout(
        rollout_id=rollout_id, group_id=group_id, group_size=1, actor_id="actor-0", task="arith",
        prompt_token_ids=int32_array([1, 2]), completion_token_ids=int32_array(np.arange(n)),
        logprobs=float32_array(np.full(n, -0.5)), versions=int32_array(versions), reward=0.0,
        sampling=SamplingSpec(temperature=1.0, max_tokens=n), finish_reason="stop",
    )


def of(out, cls):
    return [o.body for o in out if isinstance(o.body, cls)]


# ----------------------------------------------------------------------------- broker quota


def test_quota_accepts_one_steps_worth_of_whole_groups_then_refuses_and_says_so():
    h = Harness()
    out = h.rollouts(*group("g1"), *group("g2"))
    ack = of(out, Ack)[0]
    assert sorted(ack.rollout_ids) == ["g1-0", "g1-1", "g2-0", "g2-1"]
    assert (ack.quota_version, ack.quota_left) == (0, 0)
    out = h.rollouts(*group("g3"), msg_id="m3")
    err = of(out, Error)[0]
    assert err.code == "rejected" and "quota" in err.message and err.ref_msg_id == "m3"
    ack = of(out, Ack)[0]  # the quota travels even when nothing is acked, so the actor stops starting groups
    assert ack.rollout_ids == [] and ack.quota_left == 0
    assert not h.state.buffer.seen("g3-0")  # kept by the actor, not silently consumed
    assert h.state.counters["over_quota_rollouts"] == 2


def test_an_admitted_group_reserves_room_for_its_later_members():
    h = Harness()
    g1, g2, g3 = group("g1"), group("g2"), group("g3")
    assert of(h.rollouts(g1[0]), Ack)[0].quota_left == 2  # g1 reserves 2 with its first member
    assert of(h.rollouts(*g2), Ack)[0].quota_left == 0
    assert of(h.rollouts(*g3), Error)  # full: a new group is refused...
    ack = of(h.rollouts(g1[1]), Ack)[0]  # ...but g1's second member still fits: groups stay whole
    assert ack.rollout_ids == ["g1-1"] and h.state.buffer.is_complete("g1")


def test_rollouts_with_an_old_token_are_acked_dropped_counted_and_reported():
    h = Harness()
    h.publish(1)
    old = group("old", version=0)
    ack = of(h.rollouts(*old), Ack)[0]
    assert sorted(ack.rollout_ids) == ["old-0", "old-1"]
    assert h.state.buffer.depth == 0 and h.state.status().dropped_stale_total == 2
    assert h.state.status().quota_left == PER_STEP  # stale rollouts take no quota
    again = of(h.rollouts(*old), Ack)[0]  # a resend is a duplicate, not a second drop
    assert again.duplicates == 2 and h.state.status().dropped_stale_total == 2
    h.rollouts(*group("new", version=1), *group("new2", version=1))
    batch = of(h.send("L0", BatchRequest(rank=0, size=PER_STEP, learner_version=1, max_lag=0)), RolloutBatch)[0]
    assert {r.min_version for r in batch.rollouts} == {1}
    assert batch.dropped_stale == 2  # the learner sees the drop in samples_dropped
    assert h.books_balance()


def test_a_rollout_spanning_an_update_is_stale_even_if_it_ends_at_the_latest_version():
    h = Harness()
    h.publish(1)
    h.rollouts(mixed("m", "gm", [0, 0, 1]))
    assert h.state.buffer.depth == 0 and h.state.status().dropped_stale_total == 1


def test_a_stale_member_drops_its_whole_group_and_frees_its_room():
    h = Harness()
    h.publish(1)
    h.rollouts(make_rollout("g-0", "g", 2, version=1))
    assert h.state.status().quota_left == 2
    h.rollouts(mixed("g-1", "g", [0, 1]))  # the other member is stale: the group goes whole
    s = h.state.status()
    assert s.buffer_depth == 0 and s.dropped_stale_total == 2 and s.quota_left == PER_STEP
    assert h.books_balance()


def test_a_new_version_resets_the_quota_and_drops_what_is_left_of_the_old_one():
    h = Harness()
    h.rollouts(*group("g1"), make_rollout("half-0", "half", 2))  # an incomplete group stays buffered
    out = h.send("L0", BatchRequest(rank=0, size=GROUP, learner_version=0, max_lag=0))
    assert len(of(out, RolloutBatch)[0].rollouts) == GROUP
    h.publish(1)
    s = h.state.status()
    assert (s.quota_version, s.quota_left, s.buffer_depth, s.dropped_stale_total) == (1, PER_STEP, 0, 1)
    assert of(h.rollouts(*group("g2", version=1)), Ack)[0].quota_left == PER_STEP - GROUP
    assert h.books_balance()


def test_over_quota_rollouts_resent_after_the_next_version_are_acked_as_stale():
    h = Harness()
    h.rollouts(*group("g1"), *group("g2"))
    late = group("late")
    assert of(h.rollouts(*late), Error)
    batch = of(h.send("L0", BatchRequest(rank=0, size=PER_STEP, learner_version=0, max_lag=0)), RolloutBatch)[0]
    assert len(batch.rollouts) == PER_STEP
    h.publish(1)
    ack = of(h.rollouts(*late), Ack)[0]  # the actor's resend after the update: acked, counted, not served
    assert sorted(ack.rollout_ids) == ["late-0", "late-1"] and h.state.buffer.depth == 0
    s = h.state.status()
    assert (s.stored_total, s.consumed_total, s.dropped_stale_total) == (6, 4, 2) and h.books_balance()


def test_a_dead_actors_incomplete_group_gives_its_room_back():
    h = Harness()
    h.send("a1", Hello(peer_id="a1", role="actor", loaded_version=0, pid=2))
    h.rollouts(make_rollout("x-0", "x", 2, actor_id="a1"), sender="a1")
    h.rollouts(*group("g1"))
    assert h.state.status().quota_left == 0
    h.clock.advance(3)
    h.send("a0", Heartbeat(peer_id="a0", seq=1))
    h.send("L0", Heartbeat(peer_id="L0", seq=1))
    h.clock.advance(3)  # a1 silent 6 s > 5 s
    h.state.tick()
    assert not h.state.peers["a1"].alive
    assert h.state.status().quota_left == 2
    assert of(h.rollouts(*group("g2")), Ack)[0].rollout_ids == ["g2-0", "g2-1"]


def test_inflight_mode_has_no_quota_and_keeps_mixed_versions():
    h = Harness(mode="inflight")
    h.publish(1)
    out = h.rollouts(*group("g1"), *group("g2"), *group("g3"), mixed("m", "gm", [0, 1]))
    ack = of(out, Ack)[0]
    assert len(ack.rollout_ids) == 7 and (ack.quota_version, ack.quota_left) == (-1, -1)
    assert not of(out, Error) and h.state.buffer.depth == 7


def test_stop_the_world_needs_a_positive_quota():
    with pytest.raises(ValueError, match="rollouts_per_step"):
        BrokerState(BrokerConfig(), mode="stop_the_world", rollouts_per_step=0)


# ----------------------------------------------------------------------------- client and config


def test_client_keeps_the_newest_quota_from_acks_over_the_inproc_transport():
    hub = InProcHub()
    cfg = BrokerConfig(heartbeat_interval_s=0.2, peer_timeout_s=2.0)
    state = BrokerState(cfg, mode="stop_the_world", rollouts_per_step=PER_STEP)
    server = BrokerServer(cfg, state, hub.server())
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with BrokerClient(hub.client(), peer_id="a0", role="actor", heartbeat_interval_s=0.2,
                          resend_interval_s=0.3) as a0:
            a0.hello(loaded_version=0)
            assert a0.quota is None
            a0.send_rollouts(group("g1"))
            assert a0.flush(5.0)
            assert a0.quota == (0, 2)
            a0.send_rollouts(group("g2"))
            assert a0.flush(5.0)
            assert a0.quota == (0, 0)
            a0.send_rollouts(group("g3"))
            assert not a0.flush(0.5)  # refused over quota: still held, not lost
            assert a0.unacked_count == 2 and a0.errors[-1].code == "rejected"
    finally:
        server.stop()
        thread.join(5)


def test_config_requires_lag_zero_and_broker_publishing_every_step():
    base = ["weights.mode=stop_the_world", "actor.sampling.group_size=2", "learner.rollouts_per_step=4",
            "learner.micro_batch_size=4"]
    with pytest.raises(ConfigError, match="learner.max_lag"):
        load_config(None, [*base, "learner.max_lag=1"])
    with pytest.raises(ConfigError, match="learner.publish_interval"):
        load_config(None, [*base, "learner.max_lag=0", "learner.publish_interval=2"])
    with pytest.raises(ConfigError, match="learner.publish_to"):
        load_config(None, [*base, "learner.max_lag=0", "learner.publish_to=none"])
    cfg = load_config(None, [*base, "learner.max_lag=0"])
    assert cfg.weights.mode == "stop_the_world"
    assert load_config(None, ["learner.max_lag=3"]).weights.mode == "inflight"  # the default is unaffected


# ----------------------------------------------------------------------------- actor gate


class GateWorld:
    def __init__(self) -> None:
        self.version, self.quota, self.unacked = 0, None, 0
        self.gate = StopTheWorldGate(version=lambda: self.version, quota=lambda: self.quota,
                                     unacked=lambda: self.unacked, rollouts_per_step=PER_STEP, group_size=GROUP,
                                     poll_s=0.001)


def test_gate_starts_one_steps_worth_of_groups_per_version():
    w = GateWorld()
    assert w.gate.may_start(0)
    w.gate.started[0] += 2
    assert not w.gate.may_start(0)  # the actor's share of version 0 is started: idle
    w.version = 1
    assert w.gate.may_start(0)  # new weights loaded: resume


def test_gate_stops_when_the_broker_says_the_quota_is_full_or_has_moved_on():
    w = GateWorld()
    w.quota = (0, 0)
    assert not w.gate.may_start(0)
    w.quota = (1, PER_STEP)  # the broker already counts version 1; our version-0 tokens would be stale
    assert not w.gate.may_start(0)
    w.version = 1
    assert w.gate.may_start(0)


def test_gate_fills_room_the_broker_reports_once_its_own_groups_are_delivered():
    w = GateWorld()
    w.gate.started[0] += 2
    w.quota = (0, GROUP)  # room left (e.g. another actor fell short)
    w.unacked = 2
    assert not w.gate.may_start(0)  # ours are not acked yet: they may fill it
    w.unacked = 0
    assert w.gate.may_start(0)


def test_gate_wait_resumes_after_the_version_changes():
    w = GateWorld()
    w.gate.started[0] += 2

    async def scenario() -> int:
        waiter = asyncio.ensure_future(w.gate.wait_to_start(lambda: 0))
        await asyncio.sleep(0.02)
        assert not waiter.done()  # idle while the learner steps
        w.version = 1
        return await asyncio.wait_for(waiter, 5.0)

    assert asyncio.run(scenario()) == 1
    assert w.gate.started[1] == 1 and w.gate.waits == 1


# ----------------------------------------------------------------------------- real system


def _wait_for(pred, timeout: float, what: str, procs: list[subprocess.Popen]):
    deadline = time.monotonic() + timeout
    while not pred():
        for p in procs:
            assert p.poll() is None or p.returncode == 0, f"{what}: a daemon exited with {p.returncode}"
        assert time.monotonic() < deadline, f"{what}: not reached in {timeout:.0f}s"
        time.sleep(0.5)


@pytest.mark.slow
def test_real_broker_actor_learner_train_on_lag_zero_only(tiny_model_dir, tmp_path):
    run_dir = tmp_path / "run"
    port, store_port = free_port(), free_port()
    overrides = [
        f"run.dir={run_dir}", f"model.path={tiny_model_dir}", "run.log_level=info",
        f"broker.port={port}", f"broker.store_port={store_port}", "broker.host=127.0.0.1",
        "broker.heartbeat_interval_s=0.5",
        "weights.mode=stop_the_world", "learner.max_lag=0", "learner.steps=3",
        "actor.sampling.group_size=4", "learner.rollouts_per_step=16", "learner.micro_batch_size=16",
        "actor.sampling.max_tokens=8", "actor.engine.max_model_len=64", "actor.engine.max_num_seqs=32",
        "actor.max_groups_in_flight=4", "actor.actor_id=actor-0", "learner.checkpoint_interval=0",
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}
    logs = tmp_path / "logs"
    logs.mkdir()
    procs: list[subprocess.Popen] = []

    def start(name: str, *args: str) -> subprocess.Popen:
        out = open(logs / f"{name}.out", "wb")
        proc = subprocess.Popen([sys.executable, "-m", *args, *overrides], env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(proc)
        return proc

    probe_cfg = BrokerConfig(host="127.0.0.1", port=port)
    try:
        start("broker", "tether.broker")
        start("actor", "tether.actor")
        learner = start("learner", "tether.learner")
        try:
            learner.wait(timeout=240)
        except subprocess.TimeoutExpired:
            pytest.fail("learner did not finish 3 steps in 240 s; logs in " + str(logs))
        assert learner.returncode == 0, (logs / "learner.out").read_text()[-3000:]
        with BrokerClient.from_config(probe_cfg, peer_id="probe", role="tool") as probe:
            status = probe.status(timeout=10.0)
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()

    rows = [json.loads(line) for line in Path(run_dir, "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r for r in rows if "lag_max" in r]
    print(f"[stop_the_world] steps={len(steps)} "
          + " ".join(f"(lag_max={r['lag_max']}, lag0_tokens={r['parity_lag0_tokens']}, "
                     f"parity_mean={r.get('parity_lag0_mean')}, dropped={r['samples_dropped']})" for r in steps)
          + f" status: stored={status.stored_total} consumed={status.consumed_total} "
          f"dropped={status.dropped_stale_total} buffered={status.buffer_depth} quota={status.quota_version}/{status.quota_left}")
    assert len(steps) == 3
    for r in steps:
        assert r["lag_max"] == 0 and r["lag_min"] == 0, r
        assert r["parity_lag0_tokens"] > 0, r
        # One actor starts exactly one step's worth per version and idles during updates, so nothing
        # is generated that must be thrown away (the in-flight mode with max_lag=0 would drop plenty).
        assert r["samples_dropped"] == 0, r
    # Nothing acked was lost silently: every stored rollout was consumed, dropped (counted) or is buffered.
    assert status.stored_total == status.consumed_total + status.dropped_stale_total + status.buffer_depth
    assert status.consumed_total == 3 * 16
    assert status.latest_version == 3 and status.quota_version == 3
    # The actor idled between versions: its gate waited for each of versions 0, 1 and 2 to be replaced.
    events = [json.loads(line) for line in Path(run_dir, "logs", "actor-0.jsonl").read_text().splitlines() if line.strip()]
    waited = {e.get("version") for e in events if e.get("event") == "stop_the_world_waiting"}
    assert {0, 1, 2} <= waited, waited
