"""Third-party detector simulators for the ingester tests, installed at test time, never vendored.

Each simulator lives in its own virtual environment under ``.venv-sims/``
at the repository root (ignored by git; ``TANGOMESH_SIM_VENVS`` moves it),
created on first use from PyPI with the pinned requirement below and reused
while the requirement is unchanged. They are other people's programs (ALBA's
``eiger-simulator`` is GPL): run as separate processes on loopback, driven
through their REST API, read through their ZeroMQ streams.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ALBA = ("alba", ["eiger-simulator==0.5.1"])
TICKIT = ("tickit", ["tickit-devices==0.4.1", "cbor2<6"])  # its stream v2 breaks under cbor2 6


def sim_venv(name: str, requirements: list[str]) -> Path:
    """The venv of one simulator, created and installed if missing or stale; returns its bin/."""
    root = Path(os.environ.get("TANGOMESH_SIM_VENVS", ROOT / ".venv-sims"))
    venv = root / name
    stamp = venv / ".requirements"
    wanted = "\n".join(requirements)
    if not (stamp.exists() and stamp.read_text() == wanted):
        t0 = time.monotonic()
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", *requirements], check=True)
        stamp.write_text(wanted)
        print(f"installed {name} simulator venv in {time.monotonic() - t0:.0f} s", file=sys.stderr)
    return venv / "bin"


def install_all(*sims: tuple[str, list[str]]) -> None:
    """Create the simulators' venvs side by side (pip waits on the network more than on the CPU)."""
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(len(sims)) as pool:
        for future in [pool.submit(sim_venv, *sim) for sim in sims]:
            future.result()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


#: Ports a test server that goes away and comes back binds again: below Linux's ephemeral
#: range (32768-60999), where a client reconnecting meanwhile can take the very port for its
#: own end (TCP connects to itself when nothing listens), and the server's bind then fails.
REBIND_PORTS = (20000, 32000)


def rebindable_port() -> int:
    """A free loopback port outside the ephemeral range, for a server that restarts on it."""
    import random

    for _ in range(200):
        port = random.randrange(*REBIND_PORTS)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue
    raise RuntimeError(f"no free port in {REBIND_PORTS}")


@dataclass
class RestDetector:
    """A simulator's SIMPLON REST API: PUT ``{"value": ...}`` to config and command paths."""

    base: str
    version: str

    def put(self, path: str, value: object = None, timeout: float = 30) -> object:
        body = json.dumps({"value": value} if value is not None else {}).encode()
        req = urllib.request.Request(f"{self.base}/{path.format(v=self.version)}", data=body, method="PUT",
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as reply:
            text = reply.read()
        return json.loads(text) if text.strip() else None

    def config(self, key: str, value: object, subsystem: str = "detector") -> None:
        self.put(f"{subsystem}/api/{{v}}/config/{key}", value)

    def command(self, name: str, timeout: float = 30) -> object:
        return self.put(f"detector/api/{{v}}/command/{name}", timeout=timeout)


class SimProcess:
    """A simulator process on loopback; its log kept for failure messages."""

    def __init__(self, argv: list[str], log: Path, rest: RestDetector, probe_path: str) -> None:
        self.log = log
        self.rest = rest
        self._out = open(log, "wb")
        self.proc = subprocess.Popen(argv, stdout=self._out, stderr=subprocess.STDOUT, cwd=log.parent)
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{rest.base}/{probe_path.format(v=rest.version)}", timeout=2).read()
                break
            except Exception:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"simulator did not come up:\n{self.log_text()}") from None
                time.sleep(0.2)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self._out.close()


def start_alba(dataset: Path, zmq_port: int, compression: str, log: Path) -> SimProcess:
    """ALBA's eiger-simulator streaming the frames of ``dataset`` (HDF5 ``/entry/data/<name>``)."""
    bin_dir = sim_venv(*ALBA)
    port = free_port()
    return SimProcess([str(bin_dir / "eiger-simulator"), "--host", "127.0.0.1", "--port", str(port),
                       "--zmq", f"tcp://127.0.0.1:{zmq_port}", "--dataset", str(dataset),
                       "--default-compression", compression, "--log-level", "warning"],
                      log, RestDetector(f"http://127.0.0.1:{port}", "1.6.0"), "detector/api/{v}/config/nimages")


def start_tickit(workdir: Path, stream_v1_port: int, stream_v2_port: int) -> SimProcess:
    """Diamond's tickit EIGER (REST + stream v1 and v2), on loopback."""
    bin_dir = sim_venv(*TICKIT)
    port = free_port()
    config = workdir / "eiger.yaml"
    config.write_text(f"""- type: tickit_devices.eiger.Eiger
  name: eiger
  inputs: {{}}
  host: 127.0.0.1
  port: {port}
  stream_host: 127.0.0.1
  stream_legacy_port: {stream_v1_port}
  stream_cbor_port: {stream_v2_port}
""")
    return SimProcess([str(bin_dir / "tickit"), "all", str(config)], workdir / "tickit.log",
                      RestDetector(f"http://127.0.0.1:{port}", "1.8.0"), "detector/api/{v}/config/nimages")


def tickit_site_packages() -> Path:
    bin_dir = sim_venv(*TICKIT)
    return next((bin_dir.parent / "lib").glob("python3*/site-packages"))
