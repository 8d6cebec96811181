"""Placement configuration: which CPUs and GPUs the actors and the learner may use."""

from __future__ import annotations

from dataclasses import dataclass

from tether.common.config.base import Section


def parse_ids(text: str) -> list[int]:
    """CPU or GPU ids from a list such as "0-3,8" (ranges inclusive); "" gives []."""
    ids: list[int] = []
    for part in str(text).replace(" ", "").split(","):
        if not part:
            continue
        low, sep, high = part.partition("-")
        if not low.isdigit() or (sep and not high.isdigit()):
            raise ValueError(f"{part!r} is not an id or a range like 4-7")
        first, last = int(low), int(high) if sep else int(low)
        if last < first:
            raise ValueError(f"range {part!r} runs backwards")
        ids.extend(range(first, last + 1))
    if len(set(ids)) != len(ids):
        raise ValueError(f"{text!r} names an id twice")
    return ids


@dataclass(kw_only=True)
class PlacementConfig(Section):
    """Disjoint hardware per daemon: CPU sets (os.sched_setaffinity, thread counts to match) and GPU sets
    (CUDA_VISIBLE_DEVICES), applied by the launchers (tether demo, launch/run_local.sh, the Slurm script)
    through tether.launch.placement. Empty lists leave a daemon where it was started."""

    SECTION = "placement"

    actor_cpus: str = ""
    """CPUs of the actors, e.g. 0-3: split into equal contiguous shares when there are at least as many
    CPUs as actors, else shared; each actor's vLLM CPU workers bind their threads to its share."""
    learner_cpus: str = ""
    """CPUs of the learner, shared by its torchrun ranks; torch threads per rank: CPUs // ranks."""
    actor_gpus: str = ""
    """GPU ids of the actors (as CUDA_VISIBLE_DEVICES takes them): actor i gets the i-th contiguous set of
    actor.engine.tensor_parallel_size GPUs. Empty: the GPUs the launcher inherited (Slurm's assignment)."""
    learner_gpus: str = ""
    """GPU ids of the learner (CUDA_VISIBLE_DEVICES of torchrun): one rank per GPU."""

    def __post_init__(self) -> None:
        parsed = {}
        for key in ("actor_cpus", "learner_cpus", "actor_gpus", "learner_gpus"):
            try:
                parsed[key] = set(parse_ids(getattr(self, key)))
            except ValueError as exc:
                self.require(False, key, f"must be a list of ids like 0-3,8: {exc}")
        for kind in ("cpus", "gpus"):
            shared = parsed[f"actor_{kind}"] & parsed[f"learner_{kind}"]
            self.require(not shared, f"learner_{kind}",
                         f"must be disjoint from placement.actor_{kind} (both name {sorted(shared)})")
