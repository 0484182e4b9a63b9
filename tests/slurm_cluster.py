"""A real one-node SLURM cluster in a temp dir: munged, slurmctld and slurmd from Debian's
`slurm-wlm`, each with its own key, socket, config, state and ports, so a test submits
with the real `sbatch` and signals with the real `scancel`.

Everything runs as the current user (SlurmUser is that user), with
`ProctrackType=proctrack/linuxproc` and `TaskPlugin=task/none` (no cgroups needed), and
clients find the cluster through `$SLURM_CONF` (`SlurmCluster.env`).
"""

from __future__ import annotations

import getpass
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from tests.servers import _DIE_WITH_PARENT, free_port

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scancel", "scontrol")
"""What the cluster needs on the PATH (Debian: `apt-get install slurm-wlm munge`)."""

SBIN = ("/usr/sbin", "/usr/bin", "/sbin")


def which(name: str) -> str | None:
    return shutil.which(name) or next(
        (f"{d}/{name}" for d in SBIN if os.access(f"{d}/{name}", os.X_OK)), None)


def missing_binaries() -> list[str]:
    return [b for b in BINARIES if which(b) is None]


SLURM_CONF = """\
ClusterName=ptutils-test
SlurmctldHost={host}(127.0.0.1)
SlurmUser={user}
SlurmdUser={user}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={dir}/munge.socket
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
StateSaveLocation={dir}/state
SlurmdSpoolDir={dir}/spool
SlurmctldPidFile={dir}/slurmctld.pid
SlurmdPidFile={dir}/slurmd.pid
SlurmctldLogFile={dir}/slurmctld.log
SlurmdLogFile={dir}/slurmd.log
SlurmdParameters=config_overrides
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
KillWait=30
MinJobAge=600
InactiveLimit=0
NodeName={node} NodeHostname={host} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
PartitionName=debug Nodes={node} Default=YES MaxTime=INFINITE State=UP
"""


class SlurmCluster:
    """munged + slurmctld + slurmd on free loopback ports, all files under `workdir`."""

    node = "ptnode"

    def __init__(self, workdir: Path, cpus: int = 8) -> None:
        self.dir = Path(workdir)
        self.cpus = cpus
        self.conf = self.dir / "slurm.conf"
        self.procs: list[subprocess.Popen[bytes]] = []

    @property
    def env(self) -> dict[str, str]:
        """The environment a SLURM client (`sbatch`, `squeue`, ...) needs to reach it."""
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def start(self, timeout: float = 60) -> SlurmCluster:
        for sub in ("state", "spool"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        self._start_munge()
        self.conf.write_text(SLURM_CONF.format(
            host=socket.gethostname().split(".")[0], user=getpass.getuser(), dir=self.dir,
            ctld_port=free_port(), slurmd_port=free_port(), node=self.node, cpus=self.cpus))
        self._spawn([which("slurmctld"), "-D", "-i", "-f", str(self.conf)], "slurmctld.out")
        self._spawn([which("slurmd"), "-D", "-N", self.node, "-f", str(self.conf)], "slurmd.out")
        self._wait(self._node_idle, timeout, "the SLURM node to come up idle")
        return self

    def _start_munge(self) -> None:
        key = self.dir / "munge.key"
        key.write_bytes(secrets.token_bytes(1024))
        key.chmod(0o400)
        self._spawn([which("munged"), "-F", "--force", f"--key-file={key}",
                     f"--socket={self.dir}/munge.socket", f"--pid-file={self.dir}/munged.pid",
                     f"--log-file={self.dir}/munged.log", f"--seed-file={self.dir}/munged.seed"],
                    "munged.out")
        self._wait(lambda: (self.dir / "munge.socket").exists(), 20, "munged's socket")

    def _spawn(self, argv: list[str | None], out: str) -> None:
        assert all(argv), f"missing binary in {argv}"
        with open(self.dir / out, "ab") as log:
            self.procs.append(subprocess.Popen(
                [str(a) for a in argv], cwd=self.dir, stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True, env=self.env,
                preexec_fn=_DIE_WITH_PARENT))

    def _node_idle(self) -> bool:
        for proc in self.procs:
            if proc.poll() is not None:
                raise AssertionError(f"{proc.args[0]} exited ({proc.returncode}):\n"
                                     f"{self.logs()}")
        out = self.run("sinfo", "-h", "-N", "-o", "%t", check=False)
        return out.returncode == 0 and out.stdout.strip() in ("idle", "mix", "alloc")

    def _wait(self, pred, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if pred():
                return
            time.sleep(0.2)
        raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}:\n{self.logs()}")

    def run(self, *argv: str, check: bool = True, timeout: float = 30
            ) -> subprocess.CompletedProcess[str]:
        """A SLURM client command against this cluster."""
        out = subprocess.run([which(argv[0]) or argv[0], *argv[1:]], env=self.env,
                             capture_output=True, text=True, timeout=timeout)
        if check and out.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} exited {out.returncode}: {out.stderr}")
        return out

    def sbatch(self, *argv: str, env: dict[str, str] | None = None) -> str:
        """Submit; the job id (of an array: the array's id)."""
        out = subprocess.run([which("sbatch") or "sbatch", "--parsable", *argv],
                             env={**self.env, **(env or {})}, capture_output=True, text=True,
                             timeout=30)
        if out.returncode != 0:
            raise AssertionError(f"sbatch {' '.join(argv)} exited {out.returncode}: "
                                 f"{out.stderr}")
        return out.stdout.strip().split(";")[0]

    def jobs(self) -> dict[str, dict[str, str]]:
        """Job id (`123_0` for array tasks) -> scontrol's fields (JobState, Restarts, ...),
        for every job the controller still knows."""
        try:
            out = self.run("scontrol", "-o", "show", "job", check=False).stdout
        except subprocess.TimeoutExpired:
            return {}  # a busy controller: ask again
        jobs = {}
        for line in out.splitlines():
            fields = dict(re.findall(r"(\w+)=(\S*)", line))
            if "JobId" not in fields:
                continue
            task = fields.get("ArrayTaskId")
            key = f"{fields['ArrayJobId']}_{task}" if task and task != "N/A" else fields["JobId"]
            jobs[key] = fields
        return jobs

    def logs(self) -> str:
        parts = []
        for name in ("munged.log", "slurmctld.log", "slurmd.log", "slurmctld.out",
                     "slurmd.out"):
            path = self.dir / name
            if path.exists():
                parts.append(f"--- {name} ---\n{path.read_text(errors='replace')[-2500:]}")
        return "\n".join(parts)

    def stop(self) -> None:
        """Cancel every job (SIGKILL), then stop the daemons."""
        if self.conf.exists():
            self.run("scancel", "--signal=KILL", "--full", "-u", getpass.getuser(),
                     check=False)
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and any(
                    j.get("JobState") in ("RUNNING", "COMPLETING")
                    for j in self.jobs().values()):
                time.sleep(0.2)
            self.run("scancel", "-u", getpass.getuser(), check=False)
        for proc in reversed(self.procs):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=10)
        self.procs.clear()
