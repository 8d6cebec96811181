"""weights.mode=stop_the_world: strictly on-policy training, against the real daemons.

The broker's rules (grants of one step per version to current actors only, stale-on-arrival drops)
are unit-tested in test_broker_state.py; here a real broker, one real vLLM actor and a real
single-process learner run 3 steps, and the run must waste nothing: every rollout the actor made
was generated at the version the learner then trained, so the broker never drops one.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from test_broker_helpers import free_port

from tether.broker.journal import PUT, Journal
from tether.common.config.loader import load_config, save_resolved
from tether.common.errors import ConfigError
from tether.common.messages import StatusRequest
from tether.common.peer import BrokerConnection
from tether.launch.supervisor import ProcessSpec, Supervisor


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


def _json_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.slow
def test_real_broker_actor_learner_train_every_step_on_tokens_of_its_version(tiny_model_dir, tmp_path):
    run_dir = tmp_path / "run"
    overrides = [
        f"run.dir={run_dir}", f"model.path={tiny_model_dir}", "run.log_level=info",
        f"broker.port={free_port()}", f"broker.store_port={free_port()}", "broker.heartbeat_interval_s=0.5",
        "weights.mode=stop_the_world", "learner.max_lag=0", "learner.steps=3",
        "actor.sampling.group_size=4", "learner.rollouts_per_step=16", "learner.micro_batch_size=16",
        "actor.sampling.max_tokens=8", "actor.engine.max_model_len=64", "actor.engine.max_num_seqs=32",
        "actor.max_groups_in_flight=8", "actor.actor_id=actor-0", "learner.checkpoint_interval=0",
        # every step is checked for lag-0 parity tokens: train all of them, uniform-reward groups included
        "learner.skip_zero_advantage=false",
    ]
    config = load_config(None, overrides)
    run_config = save_resolved(config, run_dir, "run")
    env = {"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}
    logs = run_dir / "logs"
    spec = lambda name, module: ProcessSpec(name, [sys.executable, "-m", module, "--config", str(run_config)],  # noqa: E731
                                            logs / f"{name}.out", env)
    with Supervisor(grace_seconds=20.0) as supervisor:
        supervisor.start(spec("broker", "tether.broker"))
        actor = supervisor.start(spec("actor-0", "tether.actor"))
        learner = supervisor.start(spec("learner", "tether.learner"))
        assert supervisor.wait_for(learner, timeout=300), f"learner did not finish 3 steps; logs in {logs}"
        assert learner.returncode == 0, (logs / "learner.out").read_text()[-3000:]
        with BrokerConnection.from_config(config.broker, peer_id="probe", role="tool") as probe:
            status = probe.request(StatusRequest(), timeout=10.0)
        supervisor.stop(actor)  # graceful: it logs its books
    steps = _json_lines(run_dir / "metrics.jsonl")
    print(f"[stop_the_world] {[(r['step'], r['samples_received'], r['samples_dropped']) for r in steps]} "
          f"stored={status.stored_total} consumed={status.consumed_total} dropped={status.dropped_stale_total}")
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert all(r["samples_received"] == 16 and r["parity_lag0_tokens"] > 0 for r in steps)
    # Nothing was generated to be thrown away: the broker dropped nothing and the actor made exactly
    # what the learner trained (the in-flight mode with max_lag=0 would drop plenty).
    assert status.dropped_stale_total == 0 and status.stored_total == 3 * 16 + status.buffer_depth
    assert status.consumed_total + status.leased == 3 * 16
    # Every rollout's tokens come from a single version, the one it was granted at.
    rollouts = [value for kind, value in Journal(config.broker.journal_path).replay() if kind == PUT]
    assert len(rollouts) >= 3 * 16
    for rollout in rollouts:
        assert len(np.unique(rollout.versions.numpy())) == 1, rollout.rollout_id
    # The actor idled between versions, waiting for grants of the next one.
    stopped = [e for e in _json_lines(logs / "actor-0.jsonl") if e["event"] == "actor stopped"]
    assert stopped and stopped[0]["grant_waits"] >= 2 and stopped[0]["rollouts_acked"] == status.stored_total
