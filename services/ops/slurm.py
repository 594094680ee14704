"""Worker servers as Slurm jobs: the cluster backend of ``tangomesh scale``.

:class:`SlurmLauncher` is a :class:`~services.ops.mesh.Launcher`: ``start``
submits the server as a batch job (``sbatch --parsable``), ``stop`` cancels
it and waits until Slurm has let it go. The job runs the same console script
a host would (``PipelineWorker <instance>``) with the submitting shell's
environment (``TANGO_HOST`` among it), so the worker registers with the
topology manager from its node and the master uses it like any other. A job
that Slurm ends (``scancel``, time limit, node failure) is a worker that
stops heartbeating: the master gives its units to the others after
``WorkerTimeoutSeconds``, nothing is lost.

What goes to ``sbatch`` comes from :class:`SlurmSettings`: partition,
reservation, account, time limit, CPUs, memory and the nodes, which is what
DESY's beamtime metadata gives a beamtime in its ``onlineAnalysis`` section
(:meth:`SlurmSettings.from_online_analysis`). Jobs are named
``tangomesh-<server instance>`` (the pipeline and the worker's number), their
output goes to the mesh home's ``logs/`` as ``<server>-<job id>.log``, and
the job id to ``run/<server>.slurm``.
"""

from __future__ import annotations

import logging
import re
import shlex
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from services.ops.home import executable

log = logging.getLogger("tangomesh.slurm")

#: How long a Slurm command may take (a down munge makes each hang ~90 s).
COMMAND_TIMEOUT_S = 20.0
#: Job states after which a job holds nothing any more.
FINISHED = {"BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL", "OUT_OF_MEMORY",
            "PREEMPTED", "TIMEOUT"}
_TIME = re.compile(r"^(\d+-)?\d{1,2}(:\d{2}){0,2}$|^\d+$|^UNLIMITED$|^INFINITE$")
_NAME = re.compile(r"^[A-Za-z0-9._,-]*$")


class SlurmError(RuntimeError):
    """Slurm refused or did not answer; the message is Slurm's."""


@dataclass(frozen=True)
class SlurmSettings:
    partition: str = ""
    reservation: str = ""
    account: str = ""
    time_limit: str = ""  # sbatch --time: minutes, [D-]HH:MM[:SS], UNLIMITED
    cpus_per_task: int = 1
    mem_mb: int = 0  # 0: the partition's default per CPU
    nodelist: tuple[str, ...] = ()
    extra: tuple[str, ...] = field(default=())  # further sbatch options, as given

    def __post_init__(self) -> None:
        for name in ("partition", "reservation", "account"):
            if not _NAME.match(getattr(self, name)):
                raise ValueError(f"Slurm {name} {getattr(self, name)!r}: letters, digits, . _ , - only")
        if self.time_limit and not _TIME.match(self.time_limit):
            raise ValueError(f"Slurm time limit {self.time_limit!r}: minutes, [D-]HH:MM[:SS] or UNLIMITED")
        if self.cpus_per_task < 1 or self.mem_mb < 0:
            raise ValueError("Slurm CPUs per task >= 1 and memory >= 0 MB")
        if any(not _NAME.match(n) or not n for n in self.nodelist):
            raise ValueError(f"Slurm node names {list(self.nodelist)}: letters, digits, . _ , - only")

    @classmethod
    def from_online_analysis(cls, section: Mapping[str, Any], **more: Any) -> "SlurmSettings":
        """From a DESY beamtime metadata file's ``onlineAnalysis`` object:
        ``slurmPartition``, ``slurmReservation``, ``userAccount`` (the
        account jobs are charged to) and ``reservedNodes``; ``more`` for the
        rest (time limit, CPUs, memory)."""
        nodes = section.get("reservedNodes") or []
        return cls(partition=str(section.get("slurmPartition") or ""),
                   reservation=str(section.get("slurmReservation") or ""),
                   account=str(section.get("userAccount") or ""),
                   nodelist=tuple(str(n) for n in nodes), **more)

    def sbatch_options(self) -> list[str]:
        out = [f"--cpus-per-task={self.cpus_per_task}"]
        for option, value in (("--partition", self.partition), ("--reservation", self.reservation),
                              ("--account", self.account), ("--time", self.time_limit)):
            if value:
                out.append(f"{option}={value}")
        if self.mem_mb:
            out.append(f"--mem={self.mem_mb}M")
        if self.nodelist:
            out.append(f"--nodelist={','.join(self.nodelist)}")
        return [*out, *self.extra]


def _slurm(*argv: str) -> str:
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S,
                                stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        raise SlurmError(f"{argv[0]} not found: is this a Slurm submit host?") from None
    except subprocess.TimeoutExpired:
        raise SlurmError(f"{argv[0]} did not answer within {COMMAND_TIMEOUT_S:.0f} s (munge or slurmctld down?)") \
            from None
    if result.returncode != 0:
        raise SlurmError(f"{' '.join(argv[:2])}: {result.stderr.strip() or result.stdout.strip()}")
    return result.stdout


def job_state(job_id: str) -> str:
    """The job's state (``RUNNING``, ``PENDING``, ...), "" once Slurm has forgotten it."""
    out = _slurm("squeue", "-h", "-j", job_id, "-o", "%T", "--states=all")
    return out.strip().splitlines()[0] if out.strip() else ""


class SlurmLauncher:
    """Starts and stops servers (in practice: workers) as Slurm batch jobs."""

    def __init__(self, root: Path, settings: SlurmSettings, stop_timeout: float = 60.0) -> None:
        self.root = root
        self.settings = settings
        self.stop_timeout = stop_timeout
        for sub in ("logs", "run"):
            (root / sub).mkdir(parents=True, exist_ok=True)

    def job_file(self, server: Any) -> Path:
        return self.root / "run" / f"{server.file_stem}.slurm"

    def start(self, server: Any) -> None:
        command = shlex.join([executable(server.executable), server.instance])
        job = _slurm("sbatch", "--parsable", f"--job-name=tangomesh-{server.instance}",
                     f"--output={self.root / 'logs' / f'{server.file_stem}-%j.log'}", "--export=ALL",
                     *self.settings.sbatch_options(), f"--wrap=exec {command}").strip().split(";")[0]
        if not job.isdigit():
            raise SlurmError(f"sbatch gave no job id: {job!r}")
        self.job_file(server).write_text(job)
        log.info("%s submitted as Slurm job %s", server.name, job)

    def stop(self, server: Any) -> None:
        """Cancel the server's job (SIGTERM: the worker deregisters) and wait
        until Slurm has let it go."""
        path = self.job_file(server)
        try:
            job = path.read_text().strip()
        except OSError:
            return
        if job_state(job) not in FINISHED | {""}:
            _slurm("scancel", job)
        deadline = time.monotonic() + self.stop_timeout
        while job_state(job) not in FINISHED | {""}:
            if time.monotonic() > deadline:
                raise SlurmError(f"Slurm job {job} of {server.name} still there {self.stop_timeout:.0f} s after scancel")
            time.sleep(0.25)
        path.unlink(missing_ok=True)

    def stop_supervising(self) -> None:
        pass

    def shutdown(self) -> None:
        pass
