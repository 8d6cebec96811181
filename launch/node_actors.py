"""`python -m tether.launch.node_actors --config FILE [--count N] [--first-index I] [key=value ...]`

This node's actors, one process per node (the Slurm script runs it as the actor step's task):

- starts N actor daemons (`python -m tether.actor`, id actor-<host>-<index>), each on its share of
  the node (tether.launch.placement): GPUs from placement.actor_gpus, else from the
  CUDA_VISIBLE_DEVICES this process inherited (Slurm's assignment for the step), indexed as given and
  cut into contiguous sets of actor.engine.tensor_parallel_size; CPUs from placement.actor_cpus.
  N defaults to the GPUs divided by the tensor parallel size (1 without GPUs);
- prints each actor's placement, and sends each actor's output to <run.dir>/logs/<actor id>.out;
- SIGTERM or SIGINT stops them gracefully (SIGTERM to each, a grace period, then SIGKILL) and exits
  0 when every actor stopped cleanly;
- an actor that exits on its own stops the others and exits 1 naming it, so the step, and the
  job watching it, fail as soon as an actor dies.
"""

from __future__ import annotations

import argparse
import signal
import socket
import sys
import time
from pathlib import Path

from tether.common.config import load_config_or_exit
from tether.common.config.placement import parse_ids
from tether.launch.placement import format_ids, inherited_gpus, plan
from tether.launch.supervisor import ProcessSpec, Supervisor


def _say(message: str) -> None:
    print(f"[tether node_actors {socket.gethostname()}] {message}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tether.launch.node_actors", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=None, help="YAML run config")
    parser.add_argument("--count", type=int, default=None,
                        help="actors on this node (default: GPUs / tensor_parallel_size, 1 without GPUs)")
    parser.add_argument("--first-index", type=int, default=0, help="index of the first actor id on this node")
    parser.add_argument("--grace", type=float, default=30.0, help="seconds each actor gets to stop on SIGTERM")
    parser.add_argument("overrides", nargs="*", help="key=value overrides for every actor")
    args = parser.parse_args(argv)
    config = load_config_or_exit(parser, args.config, args.overrides)
    tp = config.actor.engine.tensor_parallel_size
    inherited = inherited_gpus()
    gpus = len(parse_ids(config.placement.actor_gpus) or inherited or [])
    count = args.count if args.count is not None else max(1, gpus // tp)
    if count < 1:
        parser.error("--count must be >= 1")
    try:
        where = plan(config.placement, actors=count, learner_ranks=1, tensor_parallel_size=tp,
                     inherited_gpus=inherited, use_inherited_gpus=True)
    except ValueError as exc:
        parser.exit(2, f"{parser.prog}: {exc}\n")
    if gpus > count * tp:
        _say(f"warning: {gpus - count * tp} of the {gpus} GPUs given to this node stay idle "
             f"({count} actors x tensor_parallel_size {tp})")

    host = socket.gethostname().split(".")[0]
    logs = Path(config.run.dir) / "logs"
    cfg = ["--config", args.config] if args.config else []
    specs = []
    for i, placement in enumerate(where.actors):
        actor_id = f"actor-{host}-{args.first_index + i}"
        argv_ = placement.command([sys.executable, "-m", "tether.actor", *cfg, *args.overrides,
                                   f"actor.actor_id={actor_id}", *placement.overrides("actor")])
        env = {"PYTHONUNBUFFERED": "1", **placement.env()}
        specs.append(ProcessSpec(actor_id, argv_, logs / f"{actor_id}.out", env))
        _say(f"{actor_id}: CUDA_VISIBLE_DEVICES={env.get('CUDA_VISIBLE_DEVICES', '(inherited: none)')} "
             f"cpus={format_ids(placement.cpus) or '(not pinned)'} log={logs / f'{actor_id}.out'}")

    with Supervisor(grace_seconds=args.grace) as supervisor:
        children = [supervisor.start(spec) for spec in specs]
        try:
            while True:
                ended = [c for c in children if c.returncode is not None]
                if ended:
                    child = ended[0]
                    _say(f"{child.spec.name} exited with status {child.returncode} on its own; stopping this "
                         f"node's other actors (log: {child.spec.log_path})")
                    return 1
                time.sleep(1.0)
        except KeyboardInterrupt:
            # One stop: Slurm signals every process of the step and may signal again; the stop in
            # progress (SIGTERM to each actor, grace period, SIGKILL) must not be interrupted by it.
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            _say("stopping the actors (SIGTERM, then SIGKILL after the grace period)")
            supervisor.stop_all()
            codes = {c.spec.name: c.returncode for c in children}
            _say(f"actors stopped: {codes}")
            return 0 if all(code == 0 for code in codes.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
