"""Where each daemon runs: its CPU set, its GPUs and its thread count, and how a launcher applies them.

The config (`placement.*`, tether.common.config.placement) names CPU and GPU sets for the actors
and the learner; `plan()` turns them into one `Placement` per daemon, and a launcher applies a
Placement in three ways at once:

- `env()`: CUDA_VISIBLE_DEVICES (the daemon's GPUs), OMP/MKL thread counts, and for actors the
  CPU list their vLLM CPU workers bind their OpenMP threads to (VLLM_CPU_OMP_THREADS_BIND);
- `command(argv)`: the argv prefixed with `python -m tether.launch.placement pin CPUS --`, which
  calls os.sched_setaffinity and execs the daemon, so the daemon and everything it spawns (vLLM's
  engine core and workers, torchrun's ranks) inherit the CPU set;
- `overrides(role)`: the daemon's own torch thread count (actor.num_threads, learner.num_threads).

CPUs and GPUs are one option in two forms: a CPU set stands in for a GPU where there is none
(disjoint CPU sets let actors and learner overlap in time, as separate GPUs do). Users of the shell
launchers get the same plan through `python -m tether.launch.placement shell ...`.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from tether.common.config.placement import parse_ids

__all__ = ["Placement", "RunPlacement", "available_cpus_here", "format_ids", "inherited_gpus", "parse_ids", "plan", "split"]


def format_ids(ids: Sequence[int]) -> str:
    """The shortest list form: [0, 1, 2, 3, 8] -> "0-3,8"."""
    parts, ids = [], sorted(ids)
    start = prev = None
    for i in [*ids, None]:
        if start is not None and (i is None or i != prev + 1):
            parts.append(str(start) if start == prev else f"{start}-{prev}")
            start = None
        if i is not None and start is None:
            start = i
        prev = i
    return ",".join(parts)


def split(ids: Sequence[int], parts: int) -> list[list[int]]:
    """`ids` in `parts` contiguous shares of (near) equal size, the larger ones first."""
    if parts < 1:
        raise ValueError("parts must be >= 1")
    size, extra = divmod(len(ids), parts)
    shares, start = [], 0
    for i in range(parts):
        end = start + size + (1 if i < extra else 0)
        shares.append(list(ids[start:end]))
        start = end
    return shares


@dataclass(frozen=True)
class Placement:
    """One daemon's hardware. Empty `cpus`: not pinned; `gpus` None: CUDA_VISIBLE_DEVICES as inherited."""

    cpus: tuple[int, ...] = ()
    gpus: tuple[int, ...] | None = None
    threads: int | None = None
    """torch/OpenMP threads of the daemon (per rank for the learner)."""
    vllm_workers: int = 0
    """Workers of the actor's vLLM engine (tensor parallel size), which share the CPUs for their threads."""

    def env(self) -> dict[str, str]:
        env: dict[str, str] = {}
        if self.gpus is not None:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, self.gpus))
        if self.threads:
            env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(self.threads)
        if self.cpus and self.vllm_workers:
            # vLLM's CPU workers bind their OpenMP threads themselves; without an explicit list its "auto"
            # mode reserves cores for the scheduler and can leave a small set with none.
            env["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(format_ids(s) for s in split(self.cpus, self.vllm_workers))
        return env

    def command(self, argv: Sequence[str], python: str = sys.executable) -> list[str]:
        if not self.cpus:
            return list(argv)
        return [python, "-m", "tether.launch.placement", "pin", format_ids(self.cpus), "--", *argv]

    def overrides(self, role: str) -> list[str]:
        """Config overrides that give the daemon's own torch the thread count (role: actor or learner)."""
        return [f"{role}.num_threads={self.threads}"] if self.threads else []


@dataclass(frozen=True)
class RunPlacement:
    actors: tuple[Placement, ...]
    learner: Placement
    broker: Placement = Placement()
    """The broker is light and never pinned: it floats over whatever the others leave."""


def available_cpus_here() -> set[int]:
    """The CPUs this process may run on (its affinity; every CPU where affinity is not supported)."""
    return set(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))


def inherited_gpus() -> list[int] | None:
    """The GPU ids of CUDA_VISIBLE_DEVICES as this process inherited it (None when unset or not numeric)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None or not visible.strip():
        return None
    try:
        return parse_ids(visible)
    except ValueError:
        return None  # UUIDs or MIG names: not indexable here; leave the environment alone


def plan(placement, *, actors: int, learner_ranks: int, tensor_parallel_size: int = 1,
         available_cpus: set[int] | None = None, inherited_gpus: list[int] | None = None,
         use_inherited_gpus: bool = False) -> RunPlacement:
    """One Placement per daemon from a PlacementConfig; ValueError naming the key when it cannot fit.

    CPU ids must be ones this process may run on (`available_cpus`, default its own affinity). GPU ids
    are physical ids as CUDA_VISIBLE_DEVICES takes them; where the launcher already has a restricted
    CUDA_VISIBLE_DEVICES (`inherited_gpus`, e.g. Slurm's assignment) they must be among those, and with
    `use_inherited_gpus` an empty placement.actor_gpus means "share out the inherited ones".
    """
    available = available_cpus_here() if available_cpus is None else available_cpus
    cpu_sets = {key: parse_ids(getattr(placement, key)) for key in ("actor_cpus", "learner_cpus")}
    for key, ids in cpu_sets.items():
        missing = sorted(set(ids) - available)
        if missing:
            raise ValueError(f"placement.{key}: CPUs {format_ids(missing)} are not available here "
                             f"(this process may use {format_ids(sorted(available))})")
    gpu_sets = {key: parse_ids(getattr(placement, key)) for key in ("actor_gpus", "learner_gpus")}
    if inherited_gpus is not None:
        for key, ids in gpu_sets.items():
            missing = sorted(set(ids) - set(inherited_gpus))
            if missing:
                raise ValueError(f"placement.{key}: GPUs {format_ids(missing)} are not among the GPUs this "
                                 f"launcher was given (CUDA_VISIBLE_DEVICES={format_ids(inherited_gpus)})")
        if use_inherited_gpus and not gpu_sets["actor_gpus"]:
            gpu_sets["actor_gpus"] = list(inherited_gpus)

    actor_cpus = cpu_sets["actor_cpus"]
    shares = split(actor_cpus, actors) if actors and len(actor_cpus) >= actors else [actor_cpus] * actors
    actor_gpus = gpu_sets["actor_gpus"]
    if actor_gpus and len(actor_gpus) < actors * tensor_parallel_size:
        raise ValueError(f"placement.actor_gpus: {len(actor_gpus)} GPUs ({format_ids(actor_gpus)}) for {actors} "
                         f"actors of tensor_parallel_size {tensor_parallel_size}: need {actors * tensor_parallel_size}")
    actor_placements = tuple(
        Placement(
            cpus=tuple(shares[i]),
            gpus=tuple(actor_gpus[i * tensor_parallel_size:(i + 1) * tensor_parallel_size]) if actor_gpus else None,
            vllm_workers=tensor_parallel_size if shares[i] else 0,
        )
        for i in range(actors)
    )
    learner_cpus, learner_gpus = cpu_sets["learner_cpus"], gpu_sets["learner_gpus"]
    if learner_gpus and len(learner_gpus) < learner_ranks:
        raise ValueError(f"placement.learner_gpus: {len(learner_gpus)} GPUs ({format_ids(learner_gpus)}) for "
                         f"{learner_ranks} learner ranks (one rank per GPU)")
    learner = Placement(
        cpus=tuple(learner_cpus),
        gpus=tuple(learner_gpus) if learner_gpus else None,
        threads=max(1, len(learner_cpus) // max(1, learner_ranks)) if learner_cpus else None,
    )
    return RunPlacement(actors=actor_placements, learner=learner)


# ------------------------------------------------------------------------------------- command line
def _pin(cpus: str, argv: list[str]) -> int:
    """Pin this process to `cpus` and exec `argv`, so the daemon and all it spawns inherit the set."""
    if not argv:
        print("tether placement pin: no command after --", file=sys.stderr)
        return 2
    try:
        wanted = set(parse_ids(cpus))
    except ValueError as exc:
        print(f"tether placement pin: {exc}", file=sys.stderr)
        return 2
    missing = wanted - available_cpus_here()
    if not wanted or missing:
        print(f"tether placement pin: CPUs {format_ids(sorted(missing)) or '(none)'} are not available "
              f"(this process may use {format_ids(sorted(available_cpus_here()))})", file=sys.stderr)
        return 2
    os.sched_setaffinity(0, wanted)
    try:
        os.execvp(argv[0], argv)
    except OSError as exc:
        print(f"tether placement pin: cannot run {argv[0]}: {exc}", file=sys.stderr)
        return 127
    return 0  # not reached


def _shell(args) -> int:
    """Print the plan as bash associative-array assignments for the shell launchers."""
    from tether.common.config import load_config_or_exit

    parser = argparse.ArgumentParser(prog="tether placement shell")
    config = load_config_or_exit(parser, args.config, args.overrides, check_model_dir=False)
    try:
        result = plan(config.placement, actors=args.actors, learner_ranks=args.learner_ranks,
                      tensor_parallel_size=config.actor.engine.tensor_parallel_size,
                      inherited_gpus=inherited_gpus(), use_inherited_gpus=args.use_inherited_gpus)
    except ValueError as exc:
        print(f"tether placement: {exc}", file=sys.stderr)
        return 2
    named = {"broker": (result.broker, "broker"), "learner": (result.learner, "learner")}
    named.update({f"actor-{i}": (p, "actor") for i, p in enumerate(result.actors)})
    for name, (placement, role) in named.items():
        env = [f"{k}={v}" for k, v in placement.env().items()]
        prefix = (["env", *env] if env else []) + placement.command([], python=args.python)
        print(f"placement_prefix[{name}]={shlex.quote(shlex.join(prefix))}")
        print(f"placement_args[{name}]={shlex.quote(shlex.join(placement.overrides(role)))}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m tether.launch.placement pin CPUS -- CMD...` or `... shell --config FILE ...`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["pin"]:
        if len(argv) < 3 or argv[2] != "--":
            print("usage: python -m tether.launch.placement pin CPUS -- COMMAND [ARGS...]", file=sys.stderr)
            return 2
        return _pin(argv[1], argv[3:])
    parser = argparse.ArgumentParser(prog="python -m tether.launch.placement", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    shell = sub.add_parser("shell", help="print each daemon's placement as bash assignments (launch/run_local.sh)")
    shell.add_argument("--config", default=None)
    shell.add_argument("--actors", type=int, required=True)
    shell.add_argument("--learner-ranks", type=int, required=True)
    shell.add_argument("--python", default=sys.executable, help="interpreter the pin prefix runs")
    shell.add_argument("--use-inherited-gpus", action="store_true",
                       help="share out the inherited CUDA_VISIBLE_DEVICES when placement.actor_gpus is empty")
    shell.add_argument("overrides", nargs="*")
    sub.add_parser("pin", help="pin to CPUS and exec COMMAND (pin CPUS -- COMMAND ...)")
    args = parser.parse_args(argv)
    return _shell(args)


if __name__ == "__main__":
    sys.exit(main())
