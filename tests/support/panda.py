"""Real PandABox data-port captures for the PCAP tests, and a TCP server that replays them.

The captures are the ones the PandABlocks team recorded from real PandAs and
publish with their Python client (``pandablocks`` 0.10.4,
``tests/data_dumps/*.bin``: the exact bytes a PandA's data port sent,
starting at its ``OK``). They are taken from the client's sdist on PyPI at
test time (``pip download``, cached under ``.venv-sims/``; GitHub is not
needed), never copied into this repository.

The official PandABlocks-server simulator (C, on GitHub only) is not built
here: the CI reaches PyPI but not GitHub. :class:`PandaReplay` plays the
server's side of the data port instead: it accepts a connection, reads the
options line, answers with the dump's own ``OK`` and sends the recorded
captures, in chunks of chosen sizes, when a test "arms" it.
"""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
import tarfile
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from support.simulators import ROOT, rebindable_port

PANDABLOCKS = "pandablocks==0.10.4"
DUMPS = ("fast_dump", "slow_dump", "raw_dump", "raw_dump_no_duration")


def dumps_dir() -> Path:
    """The sdist's data_dumps directory, downloaded and unpacked once."""
    root = Path(os.environ.get("TANGOMESH_SIM_VENVS", ROOT / ".venv-sims")) / "pandablocks-sdist"
    name, version = PANDABLOCKS.split("==")
    target = root / f"{name}-{version}" / "tests" / "data_dumps"
    if all((target / f"{d}.bin").exists() for d in DUMPS):
        return target
    root.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                    PANDABLOCKS, "-d", str(root)], check=True)
    with tarfile.open(root / f"{name}-{version}.tar.gz") as tar:
        members = [m for m in tar.getmembers() if "/tests/data_dumps/" in m.name and m.isfile()]
        tar.extractall(root, members=members, filter="data")
    return target


def dump(name: str) -> bytes:
    return (dumps_dir() / f"{name}.bin").read_bytes()


@dataclass
class Capture:
    """A recorded capture taken apart without our decoder: the bytes up to and
    including the header's blank line, the BIN frames as sent, the END line."""

    header: bytes
    frames: list[bytes]
    end: bytes

    @classmethod
    def of(cls, recorded: bytes) -> "Capture":
        assert recorded.startswith(b"OK\n")
        stop = recorded.index(b"</header>\n") + len(b"</header>\n")
        assert recorded[stop:stop + 1] == b"\n"
        header, pos, frames = recorded[3:stop + 1], stop + 1, []
        while recorded[pos:pos + 4] == b"BIN ":
            (length,) = struct.unpack_from("<I", recorded, pos + 4)
            frames.append(recorded[pos:pos + length])
            pos += length
        assert recorded[pos:pos + 4] == b"END " and recorded.endswith(b"\n")
        return cls(header, frames, recorded[pos:])

    @property
    def sample_bytes(self) -> int:
        text = self.header.decode()
        return int(text.split('sample_bytes="')[1].split('"')[0])

    def payload(self) -> bytes:
        return b"".join(f[8:] for f in self.frames)

    def cut(self, samples: int, reason: str) -> bytes:
        """The same capture ended after ``samples`` samples with ``END samples reason``,
        its first samples re-framed into BIN frames of 100 samples."""
        body = self.payload()[:samples * self.sample_bytes]
        step = 100 * self.sample_bytes
        framed = b"".join(b"BIN " + struct.pack("<I", 8 + len(body[i:i + step])) + body[i:i + step]
                          for i in range(0, len(body), step))
        return self.header + framed + f"END {samples} {reason}\n".encode()

    def whole(self) -> bytes:
        return self.header + b"".join(self.frames) + self.end


class PandaReplay:
    """The PandA's side of the data port, on loopback: one client at a time."""

    def __init__(self, port: int = 0) -> None:
        self.port = port or rebindable_port()  # it goes away and comes back on the same port
        self.options: list[bytes] = []  # the options line of each connection
        self.connections = 0
        self._client: socket.socket | None = None
        self._connected = threading.Event()
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self.listen()

    def listen(self) -> None:
        """(Again) accept connections on the same port: the PandA is up."""
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(1)
        self.port = listener.getsockname()[1]
        self._listener = listener
        self._thread = threading.Thread(target=self._accept, args=(listener,), daemon=True)
        self._thread.start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            line = b""
            while not line.endswith(b"\n"):
                more = client.recv(1)
                if not more:
                    break
                line += more
            self.options.append(line)
            client.sendall(b"OK\n")
            self.connections += 1
            self._client = client
            self._connected.set()

    def wait_connected(self, timeout: float = 20) -> None:
        assert self._connected.wait(timeout), "the ingester did not connect to the PandA"

    def arm(self, data: bytes, chunk: int = 4096) -> None:
        """One capture's bytes to the connected client, in ``chunk``-byte writes."""
        self.wait_connected()
        assert self._client is not None
        for i in range(0, len(data), chunk):
            self._client.sendall(data[i:i + chunk])

    def go_away(self) -> None:
        """The PandA disappears: the listener and the connection close."""
        self._connected.clear()
        if self._listener is not None:
            try:  # wakes the accepting thread (a plain close leaves a blocked accept listening)
                self._listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._listener.close()
        if self._client is not None:
            try:
                self._client.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._client.close()
            self._client = None
        if self._thread is not None:
            self._thread.join(2)

    def close(self) -> None:
        self.go_away()


def oracle_columns(recorded: bytes) -> dict[str, np.ndarray]:
    """Each column of a recorded capture as the ``pandablocks`` client decodes
    and scales it (its DataConnection, then its HDF writer's FrameProcessor)."""
    from pandablocks.connections import DataConnection
    from pandablocks.hdf import FrameProcessor
    from pandablocks.responses import FrameData, StartData

    conn = DataConnection()
    conn.connect(scaled=True)
    events = list(conn.receive_bytes(recorded))
    start = next(e for e in events if isinstance(e, StartData))
    rows = np.concatenate([e.data for e in events if isinstance(e, FrameData)])
    processor = FrameProcessor()
    processor.create_processors(start)
    return {f"{f.name}.{f.capture}": np.asarray(v) for f, v in zip(start.fields, processor.scale_data(FrameData(rows)))}


DRANSPOSE = "dranspose==0.2.0"  # MIT; its sdist ships a real recording of the MAX IV PCAP republisher


def republished_recording() -> list[bytes]:
    """``tests/data/pcap-zmq.cbors`` of the dranspose sdist (from PyPI, cached like the dumps):
    the single-part ZeroMQ messages a MAX IV PCAP republisher sent, in order."""
    import cbor2

    root = Path(os.environ.get("TANGOMESH_SIM_VENVS", ROOT / ".venv-sims")) / "dranspose-sdist"
    name, version = DRANSPOSE.split("==")
    target = root / f"{name}-{version}" / "tests" / "data" / "pcap-zmq.cbors"
    if not target.exists():
        root.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                        DRANSPOSE, "-d", str(root)], check=True)
        with tarfile.open(root / f"{name}-{version}.tar.gz") as tar:
            member = tar.getmember(f"{name}-{version}/tests/data/pcap-zmq.cbors")
            tar.extractall(root, members=[member], filter="data")
    messages = []
    with open(target, "rb") as f:
        decoder = cbor2.CBORDecoder(f)
        while True:
            try:
                parts = decoder.decode()
            except (EOFError, cbor2.CBORDecodeEOF):
                break
            assert isinstance(parts, list) and len(parts) == 1
            messages.append(bytes(parts[0]))
    return messages
