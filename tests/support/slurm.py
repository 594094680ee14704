"""A real single-node Slurm cluster for the tests: Debian's slurmctld, slurmd and munge.

The packages are installed by ``make system-deps`` (as root); this module
writes a cluster configuration of its own into a directory (node = this
host, its CPUs and memory from ``slurmd -C``, no accounting, Linux process
tracking: no systemd or cgroups needed), points ``SLURM_CONF`` at it for the
daemons and every client started after (``sbatch``, ``squeue``, ``scancel``
in the tangomesh commands the tests run), starts munged (as user munge, if
its socket does not answer yet), slurmctld and slurmd, and waits until the
node is idle. :meth:`SlurmCluster.close` shuts the daemons down again.

Pitfalls handled (shared/reference/batch2-facts.md): munged's log directory
must belong to munge; with munge down every Slurm command hangs ~90 s, so
munge is checked first and every call here is bounded.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

SBIN = Path("/usr/sbin")
PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")


def _run(argv: list[str], timeout: float = 20.0, check: bool = True, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=check, **kw)


def installed() -> bool:
    return all((SBIN / d).exists() for d in ("slurmctld", "slurmd", "munged")) and shutil.which("sbatch") is not None


def munge_answers() -> bool:
    try:
        return _run(["munge", "-n"], timeout=5, check=False).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


class SlurmCluster:
    def __init__(self, directory: Path, partition: str = "tangomesh") -> None:
        if not installed():
            raise RuntimeError(f"Slurm is not installed: run 'make system-deps' as root (Debian {', '.join(PACKAGES)})")
        self.directory = directory
        self.partition = partition
        self.node = socket.gethostname().split(".")[0]
        self.started_munge = False
        self.conf = directory / "slurm.conf"
        for sub in ("spool/slurmd", "spool/slurmctld", "log"):
            (directory / sub).mkdir(parents=True, exist_ok=True)
        cpus, memory = self._node_size()
        self.conf.write_text("\n".join([
            "ClusterName=tangomesh-test",
            f"SlurmctldHost={self.node}(127.0.0.1)",
            "AuthType=auth/munge", "CredType=cred/munge", "MpiDefault=none",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none", "AccountingStorageType=accounting_storage/none",
            "SchedulerType=sched/backfill", "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core_Memory",
            "DefMemPerCPU=1000", "ReturnToService=2", "KillWait=5", "SlurmUser=root",
            f"SlurmctldPidFile={directory}/slurmctld.pid", f"SlurmdPidFile={directory}/slurmd.pid",
            f"SlurmdSpoolDir={directory}/spool/slurmd", f"StateSaveLocation={directory}/spool/slurmctld",
            f"SlurmctldLogFile={directory}/log/slurmctld.log", f"SlurmdLogFile={directory}/log/slurmd.log",
            # more CPUs than the machine has: the jobs are mostly idle workers, and a test needs several
            f"NodeName={self.node} NodeAddr=127.0.0.1 CPUs={max(4, cpus)} RealMemory={memory} State=UNKNOWN",
            f"PartitionName={partition} Nodes={self.node} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES",
            "SlurmdParameters=config_overrides", ""]))
        self.env = {"SLURM_CONF": str(self.conf)}
        os.environ.update(self.env)  # for the daemons, the test process and the commands it starts
        try:
            self._start()
        except BaseException:
            self.close()
            raise

    def _node_size(self) -> tuple[int, int]:
        out = _run([str(SBIN / "slurmd"), "-C"]).stdout
        cpus = int(re.search(r"CPUs=(\d+)", out).group(1))
        memory = int(re.search(r"RealMemory=(\d+)", out).group(1))
        return cpus, max(1000, memory - 2000)

    def _start(self) -> None:
        if not munge_answers():
            for path in ("/run/munge", "/var/log/munge", "/var/lib/munge"):
                Path(path).mkdir(parents=True, exist_ok=True)
            _run(["chown", "-R", "munge:munge", "/run/munge", "/var/log/munge", "/var/lib/munge", "/etc/munge"])
            _run(["runuser", "-u", "munge", "--", str(SBIN / "munged")])
            self.started_munge = True
            deadline = time.monotonic() + 10
            while not munge_answers():
                if time.monotonic() > deadline:
                    raise RuntimeError("munged did not answer within 10 s")
                time.sleep(0.1)
        _run([str(SBIN / "slurmctld")])
        _run([str(SBIN / "slurmd")])
        deadline = time.monotonic() + 30
        while True:
            state = _run(["sinfo", "-h", "-o", "%T"], check=False).stdout
            if re.search(r"idle|mix|alloc", state):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"the Slurm node is not up after 30 s ({state.strip()!r}); "
                                   f"see {self.directory / 'log'}")
            time.sleep(0.25)

    def jobs(self, name_prefix: str = "") -> dict[str, str]:
        """job id -> state, of the jobs (still) known whose name starts with ``name_prefix``."""
        out = _run(["squeue", "-h", "-o", "%i %j %T"], check=False).stdout
        return {i: t for i, j, t in (line.split() for line in out.splitlines() if line.strip())
                if j.startswith(name_prefix)}

    def close(self) -> None:
        if munge_answers():
            _run(["scontrol", "shutdown"], check=False)
        for pid_file in ("slurmd.pid", "slurmctld.pid"):
            try:
                pid = int((self.directory / pid_file).read_text())
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline:
                    os.kill(pid, 0)
                    time.sleep(0.1)
                os.kill(pid, 9)
            except (OSError, ValueError):
                pass
        if self.started_munge:
            try:
                os.kill(int(Path("/run/munge/munged.pid").read_text()), 15)
            except (OSError, ValueError):
                pass
        for key in self.env:
            os.environ.pop(key, None)
