"""Placement: disjoint CPU sets (and GPU sets) per daemon, planned from the config and really applied.

Unit tests cover the plan (shares, tensor-parallel GPU sets, errors naming the key); the slow test
starts a broker, an actor (real vLLM V1) and a torchrun learner through tether demo's daemon_specs
with placement.actor_cpus=0 and placement.learner_cpus=1, and reads the CPU affinity of every
thread of every process they spawned, vLLM's engine core and workers and torchrun's rank included.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tether.common.config import PlacementConfig, load_config
from tether.common.errors import ConfigError
from tether.launch.placement import Placement, format_ids, parse_ids, plan, split


def test_id_lists_round_trip():
    assert parse_ids("0-3,8") == [0, 1, 2, 3, 8] and parse_ids("") == []
    assert format_ids([8, 0, 1, 2, 3, 10, 11]) == "0-3,8,10-11"
    assert split([0, 1, 2, 3, 4], 2) == [[0, 1, 2], [3, 4]]
    for bad in ("1-", "a", "3-1", "1,1"):
        with pytest.raises(ValueError):
            parse_ids(bad)


def test_actor_cpus_are_split_or_shared_and_the_learner_gets_threads_per_rank():
    placement = PlacementConfig(actor_cpus="0-3", learner_cpus="4-7")
    result = plan(placement, actors=2, learner_ranks=2, available_cpus=set(range(8)))
    assert [p.cpus for p in result.actors] == [(0, 1), (2, 3)]
    assert result.actors[0].env() == {"VLLM_CPU_OMP_THREADS_BIND": "0-1"}
    assert result.learner.cpus == (4, 5, 6, 7) and result.learner.threads == 2
    assert result.learner.overrides("learner") == ["learner.num_threads=2"]
    assert result.learner.env()["OMP_NUM_THREADS"] == "2"
    shared = plan(PlacementConfig(actor_cpus="0"), actors=2, learner_ranks=1, available_cpus={0, 1})
    assert [p.cpus for p in shared.actors] == [(0,), (0,)]  # fewer CPUs than actors: shared
    assert shared.learner == Placement() and shared.broker == Placement()


def test_the_demo_splits_the_cpus_unless_the_config_names_some():
    from tether.launch.demo import default_cpu_placement

    assert default_cpu_placement(PlacementConfig(), [0, 1]) == ["placement.actor_cpus=0", "placement.learner_cpus=1"]
    assert default_cpu_placement(PlacementConfig(), [4, 5, 6]) == ["placement.actor_cpus=4",
                                                                   "placement.learner_cpus=5-6"]
    assert default_cpu_placement(PlacementConfig(), list(range(8))) == ["placement.actor_cpus=0-3",
                                                                        "placement.learner_cpus=4-7"]
    assert default_cpu_placement(PlacementConfig(), [3]) == []  # one CPU: nothing to split
    assert default_cpu_placement(PlacementConfig(learner_cpus="1"), [0, 1]) == []  # the config decides


def test_the_demo_runs_one_actor_and_one_learner_rank_per_cpu_up_to_two():
    from tether.launch.demo import _one_per_cpu

    assert [_one_per_cpu(cpus) for cpus in ("0", "0-1", "0-3", "")] == [1, 2, 2, 2]  # "": unpinned


def test_actor_gpus_are_contiguous_tensor_parallel_sets():
    result = plan(PlacementConfig(actor_gpus="2-5", learner_gpus="0-1"), actors=2, learner_ranks=2,
                  tensor_parallel_size=2, available_cpus={0})
    assert [p.env()["CUDA_VISIBLE_DEVICES"] for p in result.actors] == ["2,3", "4,5"]
    assert result.learner.env() == {"CUDA_VISIBLE_DEVICES": "0,1"}
    # A tensor-parallel actor's CPU share is split between its vLLM workers.
    tp = plan(PlacementConfig(actor_cpus="0-3"), actors=1, learner_ranks=1, tensor_parallel_size=2,
              available_cpus=set(range(4)))
    assert tp.actors[0].env()["VLLM_CPU_OMP_THREADS_BIND"] == "0-1|2-3"


def test_inherited_gpus_are_indexed_as_assigned_never_renumbered():
    """Slurm hands a step CUDA_VISIBLE_DEVICES=4,5,6,7: actors get shares of exactly those ids."""
    result = plan(PlacementConfig(), actors=2, learner_ranks=1, tensor_parallel_size=2, available_cpus={0},
                  inherited_gpus=[4, 5, 6, 7], use_inherited_gpus=True)
    assert [p.gpus for p in result.actors] == [(4, 5), (6, 7)]
    with pytest.raises(ValueError, match=r"placement\.actor_gpus: GPUs 0-1 are not among the GPUs .*=4-7"):
        plan(PlacementConfig(actor_gpus="0-1"), actors=1, learner_ranks=1, available_cpus={0}, inherited_gpus=[4, 5, 6, 7])


@pytest.mark.parametrize(
    ("placement", "kwargs", "message"),
    [
        (PlacementConfig(actor_cpus="0-5"), {}, r"placement\.actor_cpus: CPUs 4-5 are not available here"),
        (PlacementConfig(actor_gpus="0-2"), {"actors": 2, "tensor_parallel_size": 2},
         r"placement\.actor_gpus: 3 GPUs .* need 4"),
        (PlacementConfig(learner_gpus="0"), {"learner_ranks": 2}, r"placement\.learner_gpus: 1 GPUs .* 2 learner ranks"),
    ],
)
def test_placements_that_do_not_fit_name_the_key(placement, kwargs, message):
    with pytest.raises(ValueError, match=message):
        plan(placement, **{"actors": 1, "learner_ranks": 1, "available_cpus": set(range(4)), **kwargs})


def test_config_rules():
    with pytest.raises(ConfigError, match=r"placement\.learner_cpus: must be disjoint from placement\.actor_cpus"):
        load_config(None, ["placement.actor_cpus=0-1", "placement.learner_cpus=1"])
    with pytest.raises(ConfigError, match=r"placement\.actor_gpus: must hold whole sets of .*tensor_parallel_size \(2\)"):
        load_config(None, ["placement.actor_gpus=0-2", "actor.engine.tensor_parallel_size=2"])
    with pytest.raises(ConfigError, match=r"placement\.actor_cpus: must be a list of ids"):
        load_config(None, ["placement.actor_cpus=zero"])


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs")
def test_pin_execs_the_command_on_the_cpus_and_its_children_inherit_them():
    cpu = max(os.sched_getaffinity(0))
    child = ("import os, subprocess, sys; print(sorted(os.sched_getaffinity(0)));"
             " print(subprocess.run([sys.executable, '-c', 'import os; print(sorted(os.sched_getaffinity(0)))'],"
             " capture_output=True, text=True).stdout.strip())")
    out = subprocess.run([sys.executable, "-m", "tether.launch.placement", "pin", str(cpu), "--", sys.executable,
                          "-c", child], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:2] == [f"[{cpu}]", f"[{cpu}]"]
    bad = subprocess.run([sys.executable, "-m", "tether.launch.placement", "pin", "999", "--", "true"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "CPUs 999 are not available" in bad.stderr


def _affinities(pid: int) -> dict[str, set[int]]:
    """CPU affinity of every thread of `pid` and of all its descendants, by "name pid/tid"."""
    import psutil

    found = {}
    root = psutil.Process(pid)
    for proc in [root, *root.children(recursive=True)]:
        try:
            name = " ".join(proc.cmdline()[:4])[-60:]
            for thread in proc.threads():
                found[f"{name} {proc.pid}/{thread.id}"] = set(os.sched_getaffinity(thread.id))
        except (psutil.NoSuchProcess, ProcessLookupError):
            continue
    return found


@pytest.mark.slow
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs")
def test_daemons_and_everything_they_spawn_run_on_their_cpus(tiny_model_dir, tmp_path):
    import psutil
    from test_broker_helpers import free_port

    from tether.common.config import save_resolved
    from tether.launch.demo import DEFAULT_CONFIG, daemon_specs
    from tether.launch.supervisor import Supervisor

    actor_cpu, learner_cpu = sorted(os.sched_getaffinity(0))[:2]
    config = load_config(DEFAULT_CONFIG, [
        f"run.dir={tmp_path}", f"model.path={tiny_model_dir}", f"broker.port={free_port()}",
        f"broker.store_port={free_port()}", f"placement.actor_cpus={actor_cpu}",
        f"placement.learner_cpus={learner_cpu}", "learner.steps=1000",
    ])
    specs = daemon_specs(config, save_resolved(config, tmp_path, "run"), actors=1, learner_ranks=1)
    with Supervisor(grace_seconds=10.0) as supervisor:
        _, actor, learner = (supervisor.start(spec) for spec in specs)
        deadline = time.monotonic() + 300
        # The engine report is written once the engine core and its worker run.
        while not list(Path(tmp_path).glob("engine_report*.json")):
            assert not supervisor.failed(), f"{supervisor.failed()[0].spec.name} died; see its log"
            assert time.monotonic() < deadline, "the actor's engine did not start in 300 s"
            time.sleep(1.0)
        actor_threads, learner_threads = _affinities(actor.process.pid), _affinities(learner.process.pid)
        ranks = [p for p in psutil.Process(learner.process.pid).children(recursive=True)
                 if "tether.learner" in " ".join(p.cmdline())]
        rank_env, rank_cmdline = (ranks[0].environ(), " ".join(ranks[0].cmdline())) if ranks else ({}, "")
    assert len({key.split()[-1].split("/")[0] for key in actor_threads}) >= 2  # the actor and its engine core
    assert all(cpus == {actor_cpu} for cpus in actor_threads.values()), actor_threads
    assert len(actor_threads) > 4  # vLLM's threads (OpenMP, ZeroMQ, ...) are in the count
    assert ranks and all(cpus == {learner_cpu} for cpus in learner_threads.values()), learner_threads
    assert rank_env.get("OMP_NUM_THREADS") == "1" and "learner.num_threads=1" in rank_cmdline


def test_shell_plan_is_what_run_local_sh_evaluates():
    """`python -m tether.launch.placement shell` prints bash assignments; run_local.sh evals them."""
    script = (
        'declare -A placement_prefix placement_args; '
        f'eval "$({sys.executable} -m tether.launch.placement shell --actors 2 --learner-ranks 2 '
        'placement.actor_cpus=0 placement.learner_gpus=4-5 placement.actor_gpus=0-1)"; '
        'eval "p=(${placement_prefix[actor-1]})"; printf "%s\\n" "${p[@]}"; echo "=="; '
        'eval "p=(${placement_prefix[learner]}) a=(${placement_args[learner]})"; printf "%s\\n" "${p[@]}" "${a[@]}"'
    )
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    actor, learner = out.stdout.split("==\n")
    assert actor.split("\n")[:4] == ["env", "CUDA_VISIBLE_DEVICES=1", "VLLM_CPU_OMP_THREADS_BIND=0", sys.executable]
    assert actor.split("\n")[4:8] == ["-m", "tether.launch.placement", "pin", "0"]
    assert learner.split() == ["env", "CUDA_VISIBLE_DEVICES=4,5"]  # not pinned: no CPU set, no thread override
    bad = subprocess.run([sys.executable, "-m", "tether.launch.placement", "shell", "--actors", "3",
                          "--learner-ranks", "1", "placement.actor_gpus=0-1"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "placement.actor_gpus: 2 GPUs (0-1) for 3 actors" in bad.stderr
