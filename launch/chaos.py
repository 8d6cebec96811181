"""`tether chaos`: a real run on the tiny model while its daemons are killed, and the proof that
nothing acked was lost or trained twice.

One run of the broker, actors and a torchrun learner (the same daemons `tether demo` starts). At
chosen learner steps it injects the faults clusters inflict, waits for the run to recover, and
measures it:

- the only actor's whole process tree is killed with -9; a replacement with the same id and a
  second actor joining late (through launch/add_actors.sh) start at once (both must catch up to the
  current weights),
- an actor is stopped (SIGSTOP) past the peer timeout and continued (it must come back),
- the broker is killed with -9 and restarted on its journal,
- the learner (torchrun and its ranks) is killed with -9 and restarted: it resumes from its newest
  checkpoint and the steps after it are trained again.

The run must reach its last step. Then the books are audited at the level of rollout ids, from the
broker's journal (what was acked, what was dropped) and the learner's consumption log (which
rollouts each step received, learner/consumption_log.py): every acked rollout was received by
exactly one step of the final model's lineage, or dropped stale (counted), or is still buffered;
nothing else was trained, and nothing was trained twice.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from tether.broker.journal import DROP, PUT, Journal
from tether.broker.ledger import Ledger
from tether.common.config import RunConfig, load_config, save_resolved
from tether.common.messages import Status, StatusRequest
from tether.common.net import free_port
from tether.common.peer import BrokerConnection, BrokerError
from tether.launch.demo import DEFAULT_CONFIG, actor_spec, daemon_specs
from tether.launch.supervisor import Child, ProcessSpec, Supervisor
from tether.learner.consumption_log import final_lineage

CHAOS_OVERRIDES = [
    "learner.rollouts_per_step=16", "learner.micro_batch_size=16", "actor.sampling.group_size=4",
    "learner.max_lag=2", "learner.checkpoint_interval=5", "actor.max_groups_in_flight=4",
    "actor.max_unacked_rollouts=32", "broker.buffer_capacity=64", "broker.heartbeat_interval_s=0.5",
    "broker.peer_timeout_s=4", "broker.incomplete_group_ttl_s=10", "weights.timeout_s=20",
    "broker.update_timeout_s=30", "broker.journal_compact_every=-1", "actor.resend_interval_s=1",
]
"""A short, fault-friendly run: small steps, quick death detection and timeouts, a checkpoint every
5 steps, and a journal that keeps its whole history for the audit."""

OPEN_ENDED_STEPS = 1_000_000
"""The learner's step count until the last fault: the run cannot end before every fault landed,
however fast it trains. The learner resumed by the last fault gets the real count."""


@dataclass
class Audit:
    """The books at the level of rollout ids, after the run."""

    acked: int
    trained: int
    """Acked rollouts received by exactly one step of the final lineage."""
    trained_twice: int
    dropped: int
    buffered: int
    """Acked, neither trained nor dropped: still buffered (or leased) when the run ended."""
    lost: int
    """Acked and nowhere: neither trained, dropped nor buffered. Must be 0."""
    unexplained: int
    """Trained or dropped without ever being acked, or both trained and dropped. Must be 0."""

    @property
    def exactly_once(self) -> bool:
        return self.lost == 0 and self.trained_twice == 0 and self.unexplained == 0


def audit(run_dir: Path, journal_path: Path) -> Audit:
    """Audit a finished run (its broker stopped) from the journal and the learner's consumption log.

    The journal must keep its whole history (broker.journal_compact_every=-1).
    """
    acked: set[str] = set()
    dropped: set[str] = set()
    for kind, value in Journal(journal_path).replay():
        if kind == PUT:
            acked.add(value.rollout_id)
        elif kind == DROP:
            dropped.update(value.ids)
            if value.arrived:
                acked.update(value.ids)
    ledger = Ledger(1, dedup_window=0, journal=Journal(journal_path), compact_every=None)
    ledger.replay()
    remaining = {r.rollout_id for r in ledger.buffer.rollouts()}
    remaining |= {r.rollout_id for lease in ledger.leases.values() for r in lease.rollouts}
    received = Counter(rid for ids in final_lineage(run_dir).values() for rid in ids)
    trained = set(received)
    return Audit(
        acked=len(acked), trained=len(trained & acked), trained_twice=sum(1 for n in received.values() if n > 1),
        dropped=len(dropped), buffered=len(remaining - trained - dropped),
        lost=len(acked - trained - dropped - remaining),
        unexplained=len((trained | dropped) - acked) + len(trained & dropped),
    )


@dataclass
class FaultResult:
    fault: str
    at_step: int
    recovery_s: float
    """From the fault to the recovery condition (see each fault)."""
    steps_lost: int = 0
    """Learner steps trained again (a learner resumed from an older checkpoint)."""
    dropped_stale: int = 0
    """Rollouts dropped as stale from the fault until recovery."""
    detail: str = ""


@dataclass
class ChaosReport:
    steps: int
    wall_s: float
    faults: list[FaultResult] = field(default_factory=list)
    audit: Audit | None = None
    books_balance: bool = False

    def table(self) -> str:
        rows = [f"{'fault':<34} {'at step':>7} {'recovery s':>10} {'steps lost':>10} {'dropped':>8}  detail"]
        for f in self.faults:
            rows.append(f"{f.fault:<34} {f.at_step:>7} {f.recovery_s:>10.1f} {f.steps_lost:>10} "
                        f"{f.dropped_stale:>8}  {f.detail}")
        a = self.audit
        if a is not None:
            rows.append("")
            rows.append(f"acked {a.acked}: trained once {a.trained}, dropped stale {a.dropped}, still buffered "
                        f"{a.buffered}; lost {a.lost}, trained twice {a.trained_twice}, unexplained "
                        f"{a.unexplained} -> {'EXACTLY ONCE' if a.exactly_once else 'VIOLATED'}")
        rows.append(f"run: {self.steps} steps in {self.wall_s:.0f} s; books balance: {self.books_balance}")
        return "\n".join(rows)


class ChaosRun:
    """The daemons of one run under a Supervisor, with fault injection and progress probes."""

    def __init__(self, config: RunConfig, run_config_path: Path, supervisor: Supervisor, learner_ranks: int = 1):
        self.config = config
        self.run_config_path = run_config_path
        self.supervisor = supervisor
        self.specs = {s.name: s for s in daemon_specs(config, run_config_path, 0, learner_ranks, restarts=0)}
        self.children: dict[str, Child] = {}
        self.metrics = Path(config.run.dir) / "metrics.jsonl"

    def start(self, name: str, *overrides: str) -> Child:
        spec = self.specs.get(name) or actor_spec(self.config, self.run_config_path, name, restarts=0)
        if overrides:
            spec = replace(spec, argv=[*spec.argv, *overrides])
        self.children[name] = self.supervisor.start(spec)
        return self.children[name]

    def add_actor(self, prefix: str, index: int) -> Child:
        """Start actor `<prefix>-<index>` through launch/add_actors.sh, as an operator would."""
        name = f"{prefix}-{index}"
        script = Path(__file__).resolve().parent / "add_actors.sh"
        spec = ProcessSpec(name, ["bash", str(script), str(self.run_config_path), "1", "--first-index", str(index),
                                  "--id-prefix", prefix], Path(self.config.run.dir) / "logs" / f"{name}.out",
                           {"TETHER_PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
        self.children[name] = self.supervisor.start(spec)
        return self.children[name]

    def kill(self, name: str, signum: int = signal.SIGKILL) -> None:
        child = self.children[name]
        self.supervisor.kill(child, signum)
        if signum == signal.SIGKILL:
            child.process.wait(30)
            child.stopped = True

    def step(self) -> int:
        if not self.metrics.is_file():
            return 0
        steps = [json.loads(line)["step"] for line in self.metrics.read_text().splitlines() if line.endswith("}")]
        return max(steps, default=0)

    def status(self, timeout: float = 5.0) -> Status | None:
        try:
            with BrokerConnection.from_config(self.config.broker, peer_id=f"chaos-{time.monotonic_ns()}",
                                              role="tool") as probe:
                return probe.request(StatusRequest(), timeout=timeout)
        except BrokerError:
            return None

    def wait(self, condition: Callable[[], bool], what: str, timeout: float) -> float:
        """Seconds until `condition()`; RuntimeError naming `what` after `timeout` or if a daemon died."""
        start = time.monotonic()
        while not condition():
            dead = [n for n, c in self.children.items() if not c.stopped and c.returncode not in (None, 0)]
            if dead:
                raise RuntimeError(f"{dead[0]} exited with {self.children[dead[0]].returncode} while waiting for "
                                   f"{what}; see {self.children[dead[0]].spec.log_path}")
            if time.monotonic() - start > timeout:
                raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what} (learner at step {self.step()})")
            time.sleep(0.2)
        return time.monotonic() - start

    def actor_current(self, actor_id: str) -> bool:
        status = self.status()
        if status is None:
            return False
        return any(p.peer_id == actor_id and p.alive and p.ready and p.loaded_version == status.latest_version
                   for p in status.peers)

    def dropped(self) -> int:
        status = self.status()
        return status.dropped_stale_total if status is not None else 0


def run_chaos(run_dir: Path, model_path: str, *, steps_after: int = 10, learner_ranks: int = 1,
              timeout: float = 900.0, extra_overrides: list[str] | None = None, sigstop: bool = True,
              log: Callable[[str], None] = print) -> ChaosReport:
    """The whole scenario (see module docstring); raises RuntimeError when the run cannot recover.

    The run ends `steps_after` steps past the checkpoint the killed learner resumed from.
    """
    overrides = [f"run.dir={run_dir}", f"model.path={model_path}", f"learner.steps={OPEN_ENDED_STEPS}",
                 f"broker.port={free_port()}", f"broker.store_port={free_port()}", *CHAOS_OVERRIDES,
                 *(extra_overrides or [])]
    config = load_config(DEFAULT_CONFIG, overrides)
    run_config = save_resolved(config, Path(run_dir), "run")
    report = ChaosReport(steps=0, wall_s=0.0)
    started = time.monotonic()
    deadline = started + timeout
    left = lambda: max(30.0, deadline - time.monotonic())  # noqa: E731
    with Supervisor(grace_seconds=20.0) as supervisor:
        run = ChaosRun(config, run_config, supervisor, learner_ranks)
        run.start("broker")
        run.start("actor-0")
        run.start("learner")

        def at(step: int) -> int:
            run.wait(lambda: run.step() >= step, f"learner step {step}", left())
            return run.step()

        def progress_after(step: int) -> Callable[[], bool]:
            return lambda: run.step() > step

        # 1-2. The only actor's whole process tree is killed with -9; a replacement with the same id
        #      and a second actor that joins the run late start at once. The learner starves until
        #      one is up; both must catch up to the weights published meanwhile and contribute.
        s = at(2)
        t0, d0 = time.monotonic(), run.dropped()
        run.kill("actor-0")
        run.start("actor-0")
        run.add_actor("actor", 1)  # the way an operator adds one: launch/add_actors.sh
        run.wait(progress_after(run.step()), "a learner step after the only actor was killed", left())
        trained_on = time.monotonic() - t0
        for name, fault, detail in (("actor-0", "actor killed -9, replaced", "replacement"),
                                    ("actor-1", "actor joins late", "late actor")):
            run.wait(lambda name=name: run.actor_current(name), f"the {detail} to hold the current weights", left())
            report.faults.append(FaultResult(fault, s, time.monotonic() - t0, dropped_stale=run.dropped() - d0,
                                             detail=f"learner stepped again after {trained_on:.1f}s; until the "
                                                    f"{detail} holds the latest version"))
            log(f"[chaos] {fault} at step {s}: recovered in {report.faults[-1].recovery_s:.1f}s")

        # 3. An actor stops past the peer timeout (declared dead), then continues and must come back.
        if sigstop:
            s = run.step()
            t0, d0 = time.monotonic(), run.dropped()
            run.kill("actor-1", signal.SIGSTOP)
            time.sleep(config.broker.peer_timeout_s * 2)
            kept_training = run.step() > s
            run.kill("actor-1", signal.SIGCONT)
            run.wait(lambda: run.actor_current("actor-1"), "the stopped actor to come back", left())
            report.faults.append(FaultResult("actor stopped past the timeout", s, time.monotonic() - t0,
                                             dropped_stale=run.dropped() - d0,
                                             detail=f"stopped {2 * config.broker.peer_timeout_s:.0f}s; learner "
                                                    f"{'kept training' if kept_training else 'waited'}"))
            log(f"[chaos] actor-1 stopped at step {s}; back after {report.faults[-1].recovery_s:.1f}s")

        # 4. The broker is killed and restarted on its journal.
        s = at(run.step() + 1)
        t0, d0 = time.monotonic(), run.dropped()
        run.kill("broker")
        time.sleep(2.0)
        run.start("broker")
        run.wait(progress_after(run.step()), "a learner step after the broker restart", left())
        report.faults.append(FaultResult("broker killed -9, restarted", s, time.monotonic() - t0,
                                         dropped_stale=run.dropped() - d0, detail="down 2s; until the next step"))
        log(f"[chaos] broker killed at step {s}; training again after {report.faults[-1].recovery_s:.1f}s")

        # 5. The learner is killed between checkpoints and resumed from its newest one.
        interval = config.learner.checkpoint_interval
        s = at((run.step() // interval + 1) * interval + interval // 2)
        t0, d0 = time.monotonic(), run.dropped()
        run.kill("learner")
        resumed_from = (s // interval) * interval
        report.steps = resumed_from + steps_after
        run.start("learner", f"learner.steps={report.steps}")
        run.wait(lambda: run.step() > s or run.children["learner"].returncode == 0, "the learner to pass the step it "
                 "was killed at", left())
        report.faults.append(FaultResult("learner killed -9, resumed", s, time.monotonic() - t0,
                                         steps_lost=s - resumed_from, dropped_stale=run.dropped() - d0,
                                         detail=f"resumed from checkpoint {resumed_from}; until past step {s}"))
        log(f"[chaos] learner killed at step {s}; past it again after {report.faults[-1].recovery_s:.1f}s")

        learner = run.children["learner"]
        if not supervisor.wait_for(learner, timeout=left()) or learner.returncode != 0:
            raise RuntimeError(f"the learner did not finish; see {learner.spec.log_path}")
        status = run.status(timeout=10.0)
        report.books_balance = status is not None and status.leased == 0 and status.stored_total == (
            status.consumed_total + status.dropped_stale_total + status.buffer_depth)
        for name in ("actor-0", "actor-1"):
            supervisor.stop(run.children[name])
        supervisor.stop(run.children["broker"])
    report.wall_s = time.monotonic() - started
    report.audit = audit(Path(run_dir), Path(config.broker.journal_path))
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tether chaos", description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", default="runs/chaos", help="run directory (default runs/chaos)")
    parser.add_argument("--model", default="", help="model directory (default: build the tiny model there)")
    parser.add_argument("--steps-after", type=int, default=10,
                        help="steps the resumed learner trains past its checkpoint before the run ends")
    parser.add_argument("--json", default=None, help="write the report as JSON here")
    args = parser.parse_args(argv)
    run_dir = Path(args.run_dir)
    if run_dir.exists() and any(run_dir.glob("checkpoints")):
        parser.error(f"{run_dir} holds a previous run; choose an empty --run-dir")
    model = args.model
    if not model:
        from tether.common.tiny_model import build_tiny_model

        model = str(run_dir / "tiny-model")
        if not (Path(model) / "config.json").is_file():
            build_tiny_model(model, seed=0)
    report = run_chaos(run_dir, model, steps_after=args.steps_after)
    print(report.table())
    if args.json:
        Path(args.json).write_text(json.dumps(asdict(report), indent=2))
    return 0 if report.audit is not None and report.audit.exactly_once and report.books_balance else 1


if __name__ == "__main__":
    sys.exit(main())
