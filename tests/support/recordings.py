"""Real detector recordings published by others, fetched by the test set-up from PyPI, never vendored.

dranspose (MAX IV, MIT) ships real captures of the Xspress3 stream in its
sdist: ``tests/data/xspress3-dump.cbors`` (NanoMAX 2023, old three-message
form), ``xspress3-multipart.cbors`` (2024, new 3-part form with
``extra_tags``) and ``xspress3mini-dump20.cbors`` (an Xspress3 Mini, real
fluorescence). The sdist is downloaded once with pip (``pip download
--no-deps --no-binary :all: dranspose==0.2.0``: PyPI is reachable from CI,
GitHub is not) into ``.venv-sims/recordings/`` (ignored by git;
``TANGOMESH_SIM_VENVS`` moves it, as for the simulators) and the files are
read from the tarball.

A ``.cbors`` file is a CBOR sequence, one array of byte strings (the ZeroMQ
parts) per message. Read with plain cbor2 and a tag handling of our own (the
self-describe tag 55799 unwrapped): dranspose's own reader uses a tag hook
whose signature cbor2 6 changed.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
from pathlib import Path

from support.simulators import ROOT

DRANSPOSE = "dranspose==0.2.0"
XSPRESS_FILES = ("xspress3-dump.cbors", "xspress3-multipart.cbors", "xspress3mini-dump20.cbors")


def cache_dir() -> Path:
    return Path(os.environ.get("TANGOMESH_SIM_VENVS", ROOT / ".venv-sims")) / "recordings"


def dranspose_sdist() -> Path:
    """The dranspose sdist, downloaded from PyPI on first use."""
    cache = cache_dir()
    name, _, version = DRANSPOSE.partition("==")
    found = sorted(cache.glob(f"{name}-{version}.tar.gz"))
    if not found:
        cache.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                        "--dest", str(cache), DRANSPOSE], check=True)
        found = sorted(cache.glob(f"{name}-{version}.tar.gz"))
    if not found:
        raise FileNotFoundError(f"pip download {DRANSPOSE} left no sdist in {cache}")
    return found[0]


def recording_bytes(name: str) -> bytes:
    """One file of dranspose's ``tests/data``, from the sdist."""
    with tarfile.open(dranspose_sdist()) as tar:
        member = next((m for m in tar.getmembers() if m.name.endswith(f"/tests/data/{name}")), None)
        if member is None:
            raise FileNotFoundError(f"{name} is not in {DRANSPOSE}'s sdist")
        extracted = tar.extractfile(member)
        assert extracted is not None
        return extracted.read()


def messages(name: str) -> list[list[bytes]]:
    """The recorded ZeroMQ messages of one ``.cbors`` file, each its list of parts."""
    import cbor2

    out = []
    stream = io.BytesIO(recording_bytes(name))
    size = len(stream.getbuffer())
    decoder = cbor2.CBORDecoder(stream)
    while stream.tell() < size:
        item = decoder.decode()
        while isinstance(item, cbor2.CBORTag) and item.tag == 55799:  # self-describe: no meaning of its own
            item = item.value
        if not (isinstance(item, list) and all(isinstance(p, bytes) for p in item)):
            raise ValueError(f"{name}: a record that is not a list of byte strings: {type(item).__name__}")
        out.append(item)
    return out
