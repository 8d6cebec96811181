"""launch/slurm.sbatch on a real Slurm (slurmctld + two slurmd nodes on this host, tests/slurm_cluster.py).

Job 1, the whole system: submitted from a scratch directory (not the repository) with the
interpreter left to its default, on 2 nodes with 2 (placeholder) GPUs per node, while another job
holds GPU 0 of the actor node, so Slurm assigns that node GPUs 1,2. Checked: the job exits 0; the
broker, actor and learner steps all ran; each actor got one of the GPUs Slurm assigned, as numbered
by Slurm; the learner ran one rank per GPU; every actor loaded every version; the books balance
(actors' acks = stored = consumed + dropped + buffered; the learner received what was consumed);
the steps stopped gracefully (each actor logged its books) and no process of the job is left.

Job 2, two learner nodes: torchrun's c10d rendezvous across Slurm nodes (the broker's node hosts
it), one rank per GPU on each, training from a rollouts file (ACTOR_NODES=0, nothing published).

Job 3, a failure: one learner node and ACTOR_NODES=0 (no actor step, as when actors are added later
with launch/add_actors.sh); the broker step is killed with SIGKILL once the learner runs. The job
must fail within seconds, naming the broker step, and leave no process behind.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path

import pytest
from slurm_cluster import SlurmCluster, SlurmUnavailable

pytestmark = [pytest.mark.slow, pytest.mark.slurm]

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "launch" / "slurm.sbatch"
STEPS = 3
JOB_TIMEOUT_S = 900


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
    except SlurmUnavailable as exc:
        cluster.stop()
        pytest.skip(str(exc))
    except BaseException:
        cluster.stop()
        raise
    yield cluster
    cluster.stop()
    assert not cluster.stray_stepds(), "slurmstepd processes outlived the cluster"


def _overrides(run_dir: Path, model: Path, **extra) -> list[str]:
    values = {
        "run.dir": run_dir, "model.path": model, "learner.steps": STEPS, "learner.rollouts_per_step": 16,
        "learner.micro_batch_size": 8, "learner.max_lag": 2, "actor.sampling.group_size": 4,
        "actor.max_groups_in_flight": 4, "actor.max_unacked_rollouts": 16, "broker.buffer_capacity": 64,
        "broker.journal_path": run_dir / "journal.bin", **extra,
    }
    return [f"{k}={v}" for k, v in values.items()]


def _job_processes(job_id: str) -> list[str]:
    """Processes (other than Slurm's own) whose environment says they belong to the job."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if f"SLURM_JOB_ID={job_id}".encode() in environ and "slurmstepd" not in cmdline:
            found.append(f"{proc.name}: {cmdline[:120]}")
    return found


def _wait_gone(job_id: str, timeout: float = 60.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while (left := _job_processes(job_id)) and time.monotonic() < deadline:
        time.sleep(1.0)
    return left


def _json_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _explain(cluster: SlurmCluster, info: dict, run_dir: Path) -> str:
    out = Path(info.get("StdOut", ""))
    text = out.read_text()[-6000:] if out.is_file() else "(no job output)"
    steps = "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(run_dir.glob("logs/slurm-*/*.out")))
    return f"job {info.get('JobId')} {info.get('JobState')} exit {info.get('ExitCode')}\n{text}\n{steps}"


@pytest.fixture(scope="module")
def full_job(cluster, tiny_model_dir, tmp_path_factory):
    scratch = tmp_path_factory.mktemp("submit")  # the submission directory: not the repository
    run_dir = scratch / "run"
    blocker = cluster.sbatch(["-w", "n2", "--gpus=1", "--job-name=blocker", "--wrap", "sleep 1800"], cwd=scratch)
    deadline = time.monotonic() + 60
    while cluster.job(blocker).get("JobState") != "RUNNING":
        assert time.monotonic() < deadline, f"the blocker job never ran: {cluster.job(blocker)}"
        time.sleep(0.5)
    env = {k: v for k, v in os.environ.items() if k != "TETHER_PYTHON"}  # the default: the repo's .venv
    env.update(STOP_GRACE="30", READY_TIMEOUT="300", ACTORS_TIMEOUT="600")
    started = time.monotonic()
    job = cluster.sbatch(["--nodes=2", "--gpus-per-node=2", "--exclusive=user", "--time=30",
                          f"--output={scratch}/job-%j.out", str(SCRIPT), str(REPO / "configs" / "demo.yaml"),
                          *_overrides(run_dir, tiny_model_dir)], env=env, cwd=scratch)
    try:
        info = cluster.wait(job, JOB_TIMEOUT_S)
    finally:
        cluster.cancel_all()
    seconds = time.monotonic() - started
    print(f"\n[slurm] job {job}: {info.get('JobState')} in {seconds:.0f} s")
    return job, info, run_dir, seconds


def test_job_exits_zero_with_every_step(full_job, cluster):
    job, info, run_dir, _ = full_job
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", _explain(cluster, info, run_dir)
    # one output file per step and node: <step>-<node index>-<host>.out
    step_logs = sorted(p.name.split("-")[0] for p in (run_dir / "logs" / f"slurm-{job}").glob("*.out"))
    assert step_logs == ["actors", "broker", "learner"], step_logs
    output = Path(info["StdOut"]).read_text()
    for line in ("broker ready", "2 actors registered", "the learner finished", f"job {job} done"):
        assert line in output, output[-3000:]


def test_actors_get_the_gpus_slurm_assigned_and_the_learner_one_rank_each(full_job):
    job, _, run_dir, _ = full_job
    (actors,) = (run_dir / "logs" / f"slurm-{job}").glob("actors-*.out")
    actors = actors.read_text()
    # GPU 0 of n2 is held by the blocker job: Slurm gives this job 1,2 there, and each actor one of them.
    host = socket.gethostname().split(".")[0]
    assert f"actor-{host}-0: CUDA_VISIBLE_DEVICES=1 " in actors, actors
    assert f"actor-{host}-1: CUDA_VISIBLE_DEVICES=2 " in actors, actors
    learner_ranks = {e.get("rank") for e in _json_lines(run_dir / "logs" / "learner-0.jsonl") if e["event"] == "learner ready"}
    assert learner_ranks == {0}
    ready = [e for e in _json_lines(run_dir / "logs" / "learner-0.jsonl") if e["event"] == "learner ready"][0]
    assert ready["world_size"] == 2  # two GPUs on the learner node: two ranks


def test_every_actor_ends_on_the_last_version_and_the_books_balance(full_job):
    job, _, run_dir, _ = full_job
    metrics = _json_lines(run_dir / "metrics.jsonl")
    assert [r["step"] for r in metrics] == list(range(1, STEPS + 1))
    actor_logs = sorted((run_dir / "logs").glob("actor-*.jsonl"))
    assert len(actor_logs) == 2
    acked = 0
    for log in actor_logs:
        events = _json_lines(log)
        # Versions only grow, and the run ends with every actor on the final one (an update that
        # would queue behind one in flight is skipped for a newer one: the newest version first).
        loaded = [e["version"] for e in events if e["event"] == "weights_updated"]
        assert loaded and loaded == sorted(set(loaded)) and loaded[-1] == STEPS, (log.name, loaded)
        stopped = [e for e in events if e["event"] == "actor stopped"]
        assert len(stopped) == 1, f"{log.name} did not stop gracefully"
        acked += stopped[0]["rollouts_acked"]
    status = json.loads((run_dir / f"slurm-{job}.status.json").read_text())
    assert status["latest_version"] == STEPS
    assert acked == status["stored_total"] > 0
    assert status["leased"] == 0  # the final checkpoint committed every lease
    assert status["stored_total"] == status["consumed_total"] + status["dropped_stale_total"] + status["buffer_depth"]
    assert sum(r["samples_received"] for r in metrics) == status["consumed_total"]


def test_no_process_of_the_job_is_left(full_job):
    job, _, _, _ = full_job
    assert _wait_gone(job) == []


def test_a_dead_broker_fails_the_job_fast(cluster, tiny_model_dir, tmp_path):
    run_dir = tmp_path / "run"
    env = {"TETHER_PYTHON": sys.executable, "ACTOR_NODES": "0", "STOP_GRACE": "20", "READY_TIMEOUT": "300"}
    job = cluster.sbatch(["--nodes=1", "--gpus-per-node=1", "--time=20", f"--output={tmp_path}/job-%j.out",
                          str(SCRIPT), str(REPO / "configs" / "demo.yaml"),
                          *_overrides(run_dir, tiny_model_dir, **{"learner.steps": 1000})], env=env, cwd=tmp_path)
    deadline = time.monotonic() + 300
    while "learner" not in (steps := cluster.steps(job)):
        assert cluster.job(job).get("JobState") in ("PENDING", "RUNNING"), _explain(cluster, cluster.job(job), run_dir)
        assert time.monotonic() < deadline, f"the learner step never started: {steps}"
        time.sleep(1.0)
    time.sleep(5)  # the learner is starting up and will wait for rollouts that never come
    killed = time.monotonic()
    os.system(f"SLURM_CONF={cluster.conf} scancel --signal=KILL {steps['broker']}")
    info = cluster.wait(job, timeout=120)
    failed_after = time.monotonic() - killed
    print(f"\n[slurm] broker killed: job {info['JobState']} {failed_after:.0f} s later")
    assert info["JobState"] == "FAILED" and info["ExitCode"].startswith("1:"), _explain(cluster, info, run_dir)
    assert failed_after < 60
    output = Path(info["StdOut"]).read_text()
    assert "ERROR: the broker step on n1 exited with status" in output and "failing the job" in output, output[-3000:]
    assert "actors on (none: add them with launch/add_actors.sh" in output
    assert _wait_gone(job) == []


def test_two_learner_nodes_form_one_torchrun_job(cluster, tiny_model_dir, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from tether.common.messages import SamplingSpec
    from tether.learner.source import save_rollouts
    from tether.learner.synthetic import sample_rollouts

    sampler = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    save_rollouts(tmp_path / "rollouts.msgpack", sample_rollouts(
        sampler, groups=4, group_size=4, max_tokens=6, sampling=SamplingSpec(temperature=1.0, max_tokens=6)))
    run_dir = tmp_path / "run"
    env = {"TETHER_PYTHON": sys.executable, "LEARNER_NODES": "2", "ACTOR_NODES": "0", "STOP_GRACE": "20"}
    job = cluster.sbatch(["--nodes=2", "--gpus-per-node=1", "--time=10", f"--output={tmp_path}/job-%j.out",
                          str(SCRIPT), str(REPO / "configs" / "demo.yaml"),
                          *_overrides(run_dir, tiny_model_dir, **{"learner.rollouts_path": tmp_path / "rollouts.msgpack",
                                                                  "learner.publish_to": "none", "learner.max_lag": 5,
                                                                  "learner.micro_batch_size": 4})], env=env, cwd=tmp_path)
    info = cluster.wait(job, timeout=600)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", _explain(cluster, info, run_dir)
    ready = [e for rank in (0, 1) for e in _json_lines(run_dir / "logs" / f"learner-{rank}.jsonl")
             if e["event"] == "learner ready"]
    assert sorted((e["rank"], e["world_size"]) for e in ready) == [(0, 2), (1, 2)]
    assert [r["step"] for r in _json_lines(run_dir / "metrics.jsonl")] == list(range(1, STEPS + 1))
    step_logs = sorted(p.name for p in (run_dir / "logs" / f"slurm-{job}").glob("learner-*.out"))
    assert [name.split("-")[1] for name in step_logs] == ["0", "1"]  # one torchrun per node
    assert _wait_gone(job) == []
