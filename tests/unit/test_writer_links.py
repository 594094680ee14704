"""Links planted in a scan directory: the writers follow none of them.

A beamtime directory is writable by the beamtime's users; a ``<file>.lock``,
``<file>.part`` or ``SHA256SUMS`` link pointing at a file elsewhere must never
make a writer create, truncate or append to that file (writers/layout.py).
"""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
import zmq

from support import scan_geometry
from services import codec, protocol
from services.sim.profiles import PROFILES, ProfileScan
from writers.component import WriterComponent, WriterConfig
from writers.layout import CHECKSUMS, FileClaim, OutputLayout, WriterError, record_checksum, write_atomically
from writers.nexus import NexusFile, NexusSettings

PIPE = "counters"
SECRET = b"root:x:0:0:do not touch\n"


@pytest.fixture
def outside(tmp_path):
    """A file outside the beamtime root, and the root beside it."""
    target = tmp_path / "outside" / "passwd"
    target.parent.mkdir()
    target.write_bytes(SECRET)
    root = tmp_path / "beamtime"
    (root / "scan").mkdir(parents=True)
    return root, target


@pytest.mark.parametrize("planted", [".lock", ".part"])
def test_a_claim_refuses_a_planted_link_and_leaves_its_target_alone(outside, planted):
    root, target = outside
    final = root / "scan" / "a.nxs"
    final.with_name(final.name + planted).symlink_to(target)
    if planted == ".lock":
        with pytest.raises(WriterError, match="symbolic link"):
            FileClaim(final, {"owner": "test/writer/one"})
    else:  # a planted part is moved aside as a link (never opened) and a fresh part made
        claim = FileClaim(final, {"owner": "test/writer/one"})
        assert not claim.part.is_symlink() and claim.part.stat().st_size == 0
        claim.release()
    assert target.read_bytes() == SECRET


def test_a_part_swapped_for_a_link_while_written_is_not_published(outside):
    root, target = outside
    claim = FileClaim(root / "scan" / "b.nxs", {"owner": "test/writer/one"})
    claim.part.unlink()
    claim.part.symlink_to(target)
    with pytest.raises(WriterError, match="replaced while being written"):
        claim.publish()
    assert target.read_bytes() == SECRET and not (root / "scan" / "b.nxs").exists()


def test_checksums_and_images_do_not_write_through_links(outside):
    root, target = outside
    done = root / "scan" / "c.nxs"
    done.write_bytes(b"finished")
    (root / "scan" / CHECKSUMS).symlink_to(target)
    with pytest.raises(WriterError, match="symbolic link"):
        record_checksum(done)
    image = root / "scan" / "c.png"
    tmp = image.with_name(f".{image.name}.tmp-{os.getpid()}")
    tmp.symlink_to(target)
    write_atomically(image, b"png bytes")
    assert image.read_bytes() == b"png bytes" and not tmp.exists()
    assert target.read_bytes() == SECRET


def test_the_writer_counts_a_planted_lock_and_goes_on(outside):
    root, target = outside
    written: list[str] = []
    component = WriterComponent("test/writer/links", "", "127.0.0.1", "127.0.0.1",
                                OutputLayout(root), "nexus",
                                lambda run: NexusFile(run, NexusSettings()), WriterConfig(), on_file=written.append)
    component.start()
    push = zmq.Context.instance().socket(zmq.PUSH)
    push.linger = 1000
    push.connect(component.endpoints[protocol.DATA_IN])
    try:
        for scan in ("evil", "good"):
            doc = ProfileScan(PROFILES["counters"], PIPE, 6, geometry=scan_geometry("line", 2, 3)).document(scan, 1)
            if scan == "evil":
                directory = root / "processed" / scan
                directory.mkdir(parents=True)
                (directory / f"{scan}_{PIPE}.nxs.lock").symlink_to(target)
            codec.send(push, codec.Message(codec.SCAN_START, scan=scan, stream=PIPE, meta={protocol.META_SCAN: doc}))
            codec.send(push, codec.Message(codec.RESULT, scan=scan, stream=PIPE, index=0, count=6,
                                           arrays={"i0": np.arange(6.0)}))
            codec.send(push, codec.Message(codec.SCAN_END, scan=scan, stream=PIPE, meta={"points": 6}))
        deadline = time.monotonic() + 10
        while not written and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        push.close()
        component.stop()
    assert [os.path.basename(p) for p in written] == [f"good_{PIPE}.nxs"]
    assert target.read_bytes() == SECRET
    assert component.counters.errors == 1 and "symbolic link" in component.refused[("evil", PIPE)]
