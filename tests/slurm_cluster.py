"""A real Slurm cluster on this host for tests: munge, slurmctld and two slurmd "nodes".

Debian's slurm-wlm and munge are installed when absent (as root, `apt-get install -y slurm-wlm munge`).
Everything else lives in one scratch directory: slurm.conf, gres.conf, state, spool, logs and pid
files, with ports asked from the kernel, so the cluster never touches a system configuration and
two of them do not collide. The nodes are `slurmd -N n1|n2` on localhost with proctrack/linuxproc,
task/none and select/cons_tres; each declares GPUS_PER_NODE GPUs backed by placeholder files, so
Slurm's GPU allocation and its CUDA_VISIBLE_DEVICES assignment are exercised without a GPU (torch
sees none and everything computes on the CPU).

    with SlurmCluster(tmp_path) as cluster:
        job = cluster.sbatch(["--nodes=2", "launch/slurm.sbatch", config], env={...})
        info = cluster.wait(job, timeout=600)          # scontrol's fields: JobState, ExitCode, ...

`stop()` (also on exit) cancels every job, stops the daemons it started (slurmd, slurmctld, and
munged when it started it) and checks that no slurmstepd of this cluster is left.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import stat
import subprocess
import time
from pathlib import Path

NODES = ("n1", "n2")
CPUS_PER_NODE = 4
GPUS_PER_NODE = 4
INSTALL_TIMEOUT_S = 900


class SlurmUnavailable(RuntimeError):
    """Slurm cannot be set up here (not installed and not installable); the message says why."""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def _run(cmd: list[str], timeout: float, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(f"{' '.join(cmd)} did not finish within {timeout:.0f} s") from exc
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}")
    return proc


def ensure_installed() -> None:
    """Install Debian's slurm-wlm and munge unless slurmctld, slurmd and munged are already there."""
    needed = ("slurmctld", "slurmd", "munged", "sbatch", "scontrol", "squeue")
    if all(shutil.which(tool) for tool in needed):
        return
    if os.geteuid() != 0:
        raise SlurmUnavailable("Slurm is not installed and installing it needs root (apt-get install -y slurm-wlm munge)")
    if not shutil.which("apt-get"):
        raise SlurmUnavailable("Slurm is not installed and this system has no apt-get")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    _run(["apt-get", "update", "-qq"], INSTALL_TIMEOUT_S, env=env)
    _run(["apt-get", "install", "-y", "-qq", "slurm-wlm", "munge"], INSTALL_TIMEOUT_S, env=env)
    missing = [tool for tool in needed if not shutil.which(tool)]
    if missing:
        raise RuntimeError(f"apt-get installed slurm-wlm and munge but {missing} are still missing")


class SlurmCluster:
    """slurmctld plus slurmd nodes n1 and n2 on this host, configured under `root`."""

    def __init__(self, root: Path, cpus_per_node: int = CPUS_PER_NODE, gpus_per_node: int = GPUS_PER_NODE):
        self.root = Path(root)
        self.cpus_per_node = cpus_per_node
        self.gpus_per_node = gpus_per_node
        self.conf = self.root / "slurm.conf"
        self.daemons: list[subprocess.Popen] = []
        self._started_munged = False

    # ------------------------------------------------------------------------------- set-up
    def __enter__(self) -> SlurmCluster:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def env(self) -> dict[str, str]:
        """The environment for client commands (and jobs: sbatch exports it) to talk to this cluster."""
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def start(self, timeout: float = 120.0) -> None:
        ensure_installed()
        if os.geteuid() != 0:
            raise SlurmUnavailable("slurmd must run as root to start jobs as the submitting user")
        self._ensure_munged()
        self._write_config()
        logs = self.root / "log"
        self.daemons.append(subprocess.Popen(
            ["slurmctld", "-D", "-i", "-f", str(self.conf)], env=self.env, stdout=open(logs / "slurmctld.out", "wb"),  # noqa: SIM115
            stderr=subprocess.STDOUT, start_new_session=True))
        for node in NODES:
            self.daemons.append(subprocess.Popen(
                ["slurmd", "-D", "-N", node, "-f", str(self.conf)], env=self.env,
                stdout=open(logs / f"slurmd-{node}.out", "wb"), stderr=subprocess.STDOUT, start_new_session=True))  # noqa: SIM115
        deadline = time.monotonic() + timeout
        while True:
            dead = [d for d in self.daemons if d.poll() is not None]
            if dead:
                raise RuntimeError(f"a Slurm daemon exited at start-up ({dead[0].args[0]}); logs in {logs}:\n"
                                   + self.logs_tail())
            states = self.node_states()
            if states and all(state.lower().startswith("idle") for state in states.values()):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"Slurm nodes not idle after {timeout:.0f} s: {states}; logs in {logs}:\n"
                                   + self.logs_tail())
            time.sleep(1.0)

    def _ensure_munged(self) -> None:
        if _run(["bash", "-c", "munge -n | unmunge"], 30, check=False).returncode == 0:
            return  # a munged is already serving this host
        key = Path("/etc/munge/munge.key")
        if not key.exists():
            _run(["mungekey", "--create", "--keyfile", str(key)], 60)
            shutil.chown(key, "munge", "munge")
            key.chmod(0o600)
        run = Path("/run/munge")
        run.mkdir(parents=True, exist_ok=True)
        shutil.chown(run, "munge", "munge")
        _run(["runuser", "-u", "munge", "--", "munged"], 60)
        self._started_munged = True
        deadline = time.monotonic() + 30
        while _run(["bash", "-c", "munge -n | unmunge"], 30, check=False).returncode != 0:
            if time.monotonic() > deadline:
                raise RuntimeError("munged started but munge -n | unmunge still fails")
            time.sleep(0.5)

    def _write_config(self) -> None:
        for sub in ("state", "log", "gpus", *(f"spool/{node}" for node in NODES)):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        # Placeholder GPUs: Slurm indexes GPUs by device files and wants character devices; these are
        # nodes of the kernel's harmless memory devices (null, zero, full, urandom), never opened.
        minors = (3, 5, 7, 9)
        if self.gpus_per_node > len(minors):
            raise ValueError(f"at most {len(minors)} placeholder GPUs per node")
        for i in range(self.gpus_per_node):
            device = self.root / "gpus" / f"gpu{i}"
            if not device.exists():
                os.mknod(device, 0o600 | stat.S_IFCHR, os.makedev(1, minors[i]))
        nodes = "\n".join(
            f"NodeName={node} NodeHostname=localhost NodeAddr=127.0.0.1 Port={_free_port()} "
            f"CPUs={self.cpus_per_node} RealMemory=4000 Gres=gpu:{self.gpus_per_node} State=UNKNOWN"
            for node in NODES)
        root = self.root
        self.conf.write_text(f"""\
ClusterName=tether{os.getpid()}
SlurmctldHost=localhost
SlurmctldPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
GresTypes=gpu
MpiDefault=none
SwitchType=switch/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SlurmdParameters=config_overrides
ReturnToService=2
KillWait=10
MinJobAge=3600
InactiveLimit=0
MessageTimeout=30
{nodes}
PartitionName=tether Nodes={",".join(NODES)} Default=YES MaxTime=INFINITE State=UP
""")
        (self.root / "gres.conf").write_text(
            f"NodeName={','.join(NODES)} Name=gpu File={root}/gpus/gpu[0-{self.gpus_per_node - 1}]\n")

    # ------------------------------------------------------------------------------- use
    def node_states(self) -> dict[str, str]:
        proc = _run(["sinfo", "-h", "-N", "-o", "%N %T"], 30, env=self.env, check=False)
        return dict(line.split() for line in proc.stdout.splitlines() if len(line.split()) == 2)

    def sbatch(self, args: list[str], env: dict[str, str] | None = None, cwd: Path | None = None) -> str:
        """Submit; returns the job id."""
        proc = _run(["sbatch", "--parsable", *args], 60, env={**self.env, **(env or {})}) if cwd is None else \
            subprocess.run(["sbatch", "--parsable", *args], capture_output=True, text=True, timeout=60,
                           env={**self.env, **(env or {})}, cwd=cwd)
        if proc.returncode != 0:
            raise RuntimeError(f"sbatch failed: {proc.stderr.strip()}")
        return proc.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """scontrol's fields of a job (JobState, ExitCode, NodeList, StdOut, ...)."""
        proc = _run(["scontrol", "show", "job", "-o", job_id], 30, env=self.env, check=False)
        return dict(item.split("=", 1) for item in proc.stdout.split() if "=" in item)

    def steps(self, job_id: str) -> dict[str, str]:
        """Running steps of a job: name -> JOB.STEP."""
        proc = _run(["squeue", "-h", "-s", "-j", job_id, "-o", "%i %j"], 30, env=self.env, check=False)
        return {name: step for step, name in (line.split() for line in proc.stdout.splitlines() if len(line.split()) == 2)}

    def wait(self, job_id: str, timeout: float) -> dict[str, str]:
        """Block until the job has ended; its fields. TimeoutError (naming the state) when it has not."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.job(job_id)
            if info.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                                        "PREEMPTED", "BOOT_FAIL", "DEADLINE"):
                return info
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {info.get('JobState')} after {timeout:.0f} s")
            time.sleep(1.0)

    def cancel_all(self) -> None:
        _run(["scancel", "--full", "--partition=tether"], 30, env=self.env, check=False)

    def logs_tail(self, lines: int = 30) -> str:
        out = []
        for log in sorted((self.root / "log").glob("*")):
            text = log.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"--- {log.name}\n" + "\n".join(text))
        return "\n".join(out)

    # ------------------------------------------------------------------------------- tear-down
    def stop(self) -> None:
        """Cancel every job, stop slurmd/slurmctld (and munged if started here); leave nothing running."""
        if self.conf.exists() and self.daemons and all(d.poll() is None for d in self.daemons[:1]):
            self.cancel_all()
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and _run(["squeue", "-h"], 30, env=self.env, check=False).stdout.strip():
                time.sleep(1.0)
        for daemon in reversed(self.daemons):
            if daemon.poll() is None:
                os.killpg(daemon.pid, signal.SIGTERM)
        for daemon in reversed(self.daemons):
            try:
                daemon.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(daemon.pid, signal.SIGKILL)
                daemon.wait(timeout=30)
        self.daemons.clear()
        for stepd in self.stray_stepds():
            os.kill(stepd, signal.SIGKILL)
        if self._started_munged:
            pid_file = Path("/run/munge/munged.pid")
            if pid_file.exists():
                try:
                    os.kill(int(pid_file.read_text().strip()), signal.SIGTERM)
                except (ValueError, ProcessLookupError):
                    pass
            self._started_munged = False

    def stray_stepds(self) -> list[int]:
        """slurmstepd processes of this cluster's nodes (their spool directory is under root)."""
        found = []
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                environ = (proc / "environ").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if "slurmstepd" in cmdline and str(self.conf) in environ:
                found.append(int(proc.name))
        return found
