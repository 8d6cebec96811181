"""`torchrun --nproc-per-node R -m tether.learner --config FILE key=value ...`

Initialises the default process group (NCCL on CUDA, gloo on CPU), builds the Learner on every
rank (resuming from the newest checkpoint of the run directory), registers every rank with the
broker under one training session, and loops: step, publish, checkpoint (and commit). Rollouts
come from the broker, or from learner.rollouts_path; weights go to the broker's weight group
(learner.publish_to).

Every rank dies with its torchrun agent (the agent starts ranks in their own process sessions, so
killing the agent alone would otherwise leave them training as orphans).
"""

from __future__ import annotations

import argparse
import os
import uuid
from pathlib import Path

import torch
import torch.distributed as dist

from tether.common.config import load_config_or_exit, save_resolved
from tether.common.logging import configure_logging, get_logger
from tether.common.process import die_with_parent, exit_now
from tether.learner.publish import StaticRendezvous
from tether.learner.source import BrokerBatchSource, FileBatchSource
from tether.learner.trainer import Learner


def _init_distributed(device: str) -> None:
    if dist.is_initialized() or "RANK" not in os.environ:
        return  # a plain `python -m tether.learner` runs as one unsharded process
    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend="nccl" if cuda else "gloo")


def _model_dir(config) -> Path:
    if config.model.path:
        return Path(config.model.path)
    # Embedded default: the tiny model every actor also loads from <run_dir>/tiny-model.
    path = Path(config.run.dir) / "tiny-model"
    if not (path / "config.json").is_file():
        raise SystemExit(f"model.path is empty and {path} does not exist: build it first (tether tiny-model) or set model.path")
    return path


def _session_id() -> str:
    """One id for all ranks of this launch (rank 0 draws it): the broker's training session."""
    session = [uuid.uuid4().hex[:16]]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(session, src=0)
    return session[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tether.learner", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=None, help="YAML run config")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. learner.steps=10")
    args = parser.parse_args(argv)
    config = load_config_or_exit(parser, args.config, args.overrides)
    cfg = config.learner
    if "TORCHELASTIC_RUN_ID" in os.environ:
        die_with_parent()
    torch.set_num_threads(cfg.num_threads)
    _init_distributed(config.run.device)
    rank = dist.get_rank() if dist.is_initialized() else 0
    configure_logging(component=f"learner-{rank}", run_dir=config.run.dir, level=config.run.log_level, console=rank == 0)
    log = get_logger(__name__)
    if rank == 0:
        save_resolved(config, config.run.dir, "learner")
    session = _session_id()

    link = connection = None
    if not cfg.rollouts_path or cfg.publish_to == "broker":
        from tether.common.peer import BrokerConnection
        from tether.learner.broker_link import LearnerLink

        connection = BrokerConnection.from_config(config.broker, peer_id=f"learner-{rank}", role="learner")
        link = LearnerLink(connection, rank=rank, session=session, version=lambda: learner.version,
                           committed_version=lambda: learner.committed_version)
    source = (FileBatchSource(cfg.rollouts_path) if cfg.rollouts_path
              else BrokerBatchSource(link, group_size=config.actor.sampling.group_size))
    rendezvous = None
    if rank == 0 and cfg.publish_to == "broker":
        rendezvous = link
    elif rank == 0 and cfg.publish_to == "static":
        host, port, size = cfg.static_group.rsplit(":", 2)
        rendezvous = StaticRendezvous(host, int(port), int(size))

    learner = Learner(config, _model_dir(config), source=source, rendezvous=rendezvous, session=session)
    if connection is not None:
        connection.start()
        welcome = link.register(config.broker.connect_timeout_s)
        log.info("registered with the broker", session=session, latest_version=welcome.latest_version)
    log.info("learner ready", rank=rank, world_size=learner.world_size, device=str(learner.device),
             body_dtype=str(learner.body_dtype), algorithm=cfg.algorithm, version=learner.version, session=session)
    try:
        while learner.version < cfg.steps:
            learner.step()
            learner.maybe_publish()
            learner.maybe_checkpoint()
        if not learner.deliver_final_weights(config.weights.timeout_s):
            log.warning("some actors do not hold the final version", version=learner.version)
        if link is not None and rank == 0:
            # Let the broker acknowledge the final commit, so a clean stop leaves nothing leased.
            connection.wait_until(lambda: link.commit_pending is None, 30.0)
    finally:
        learner.close()
        if connection is not None:
            connection.close()
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    # Checkpoints are written synchronously, sinks closed and the process group destroyed by now: skip
    # the interpreter's teardown of torch's object graph, time torchrun and the launcher wait for.
    exit_now(main())
