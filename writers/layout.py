"""Where a writer puts a scan's files, who may write them, and how they become final.

Paths
    ``<BeamtimeRoot>/<PathTemplate>`` + the writer's suffix. The template's
    fields come from the scan document; ``processed`` must be relative (no
    absolute path, no ``..`` from the wire), and the directory, once symlinks
    are resolved, must still be inside the root.

Ownership
    One writer per file: a writer holds an exclusive ``flock`` on
    ``<file>.lock`` (which names the owner) for as long as it writes. A second
    writer aiming at the same file is refused and told who owns it. The kernel
    drops the lock of a killed writer, so a crash never blocks the next owner.
    A finished file is never overwritten.

Crash safety
    A file is written as ``<file>.part`` and renamed to its final name only
    when complete, after an ``fsync``; the directory is synced after the
    rename. A final name therefore always holds a complete file; a killed
    writer leaves only a ``.part``. Each final file's SHA-256 is appended to the
    directory's ``SHA256SUMS`` (``sha256sum -c SHA256SUMS`` verifies them).

Links
    Inside the scan directory nothing is followed: the lock, the part file,
    ``SHA256SUMS`` and temporary image files are opened with ``O_NOFOLLOW``
    (the part file created with ``O_EXCL``), only regular files are accepted,
    and a part file is published only if it is still the file the claim
    created. A link planted there (``<file>.lock`` -> a file elsewhere) is
    refused with :class:`WriterError`, counted by the writer, and the file it
    points to is never opened for writing.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import socket
import stat
import string
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.scan import ScanError, ScanMeta, safe_relative

CHECKSUMS = "SHA256SUMS"
PART = ".part"
LOCK = ".lock"
DEFAULT_TEMPLATE = "{processed}/{scan_name}/{scan}_{pipeline}"
TEMPLATE_FIELDS = ("processed", "beamtime", "beamline", "scan", "scan_name", "number", "pipeline")
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
UNSAFE_CHARS = re.compile(r"[^A-Za-z0-9._-]")


class WriterError(ValueError):
    """A scan this writer cannot or must not write; the message says why."""


def safe_file_part(name: str) -> str:
    """A product or result name as a piece of a file name."""
    cleaned = UNSAFE_CHARS.sub("_", name).strip("._") or "unnamed"
    return cleaned[:128]


@dataclass(frozen=True)
class OutputLayout:
    root: Path
    template: str = DEFAULT_TEMPLATE

    def __post_init__(self) -> None:
        if not self.root.is_absolute():
            raise ValueError(f"BeamtimeRoot {str(self.root)!r} must be an absolute path")
        if not self.root.is_dir():
            raise ValueError(f"BeamtimeRoot {str(self.root)!r} is not a directory")
        try:
            fields = [f for _, f, spec, conv in string.Formatter().parse(self.template) if f is not None]
        except ValueError as exc:
            raise ValueError(f"PathTemplate {self.template!r}: {exc}") from None
        unknown = sorted(set(fields) - set(TEMPLATE_FIELDS))
        if unknown or not fields:
            raise ValueError(f"PathTemplate {self.template!r} uses unknown fields {unknown}; "
                             f"known: {', '.join(TEMPLATE_FIELDS)}")
        if "{scan}" not in self.template:
            raise ValueError(f"PathTemplate {self.template!r} must contain {{scan}}, or scans overwrite each other")

    def stem(self, meta: ScanMeta, pipeline: str) -> Path:
        """The scan's file path without suffix; WriterError for a path that
        would leave the root."""
        raw = meta.raw
        name = raw["scan"].get("name", "")
        fields = {
            "beamtime": raw["beamtime"]["id"], "beamline": raw["beamtime"]["beamline"],
            "scan": meta.scan_id, "scan_name": name if SAFE_NAME.match(name or "") else meta.scan_id,
            "number": meta.number, "pipeline": pipeline or "all",
        }
        try:
            fields["processed"] = safe_relative(raw["beamtime"]["paths"]["processed"])
            relative = safe_relative(self.template.format(**fields))
        except ScanError as exc:
            raise WriterError(f"scan {meta.scan_id}: refused output path: {exc}") from None
        path = self.root / relative
        root = self.root.resolve()
        parent = path.parent.resolve()  # symlinks that exist already are followed
        if not parent.is_relative_to(root):
            raise WriterError(f"scan {meta.scan_id}: output directory {path.parent} resolves to {parent}, "
                              f"outside the beamtime root {root}")
        return path


def owner_info(device: str) -> dict[str, Any]:
    return {"owner": device, "host": socket.gethostname(), "pid": os.getpid(),
            "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


NOFOLLOW = os.O_NOFOLLOW | os.O_CLOEXEC


def open_regular(path: Path, flags: int, mode: int = 0o644) -> int:
    """``os.open`` that follows no link at ``path`` and accepts only a regular
    file: WriterError otherwise, naming the path (the link's target is never
    opened)."""
    try:
        fd = os.open(path, flags | NOFOLLOW | os.O_NONBLOCK, mode)
    except OSError as exc:
        if os.path.islink(path):
            raise WriterError(f"{path} is a symbolic link; writers follow no link in the scan directory") from None
        raise WriterError(f"{path}: {exc.strerror}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise WriterError(f"{path} is not a regular file; refused")
    os.set_blocking(fd, True)
    return fd


class FileClaim:
    """The exclusive right to write ``final`` (see the module doc); with
    ``part`` (the default) the empty part file is created for the writer to
    open by name. The image writer claims its name only, and replaces its
    files whole (:func:`write_atomically`)."""

    def __init__(self, final: Path, owner: dict[str, Any], part: bool = True) -> None:
        self.final = final
        self.part = final.with_name(final.name + PART)
        self.lock = final.with_name(final.name + LOCK)
        final.parent.mkdir(parents=True, exist_ok=True)
        fd = open_regular(self.lock, os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another writer"
            os.close(fd)
            raise WriterError(f"{final} is being written by {holder}; one writer per file") from None
        self._fd: int | None = fd
        if os.path.lexists(final):
            self.release()
            raise WriterError(f"{final} exists already; a finished file is never overwritten")
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(owner).encode(), 0)
        if os.path.lexists(self.part):  # left by a writer that was killed (or planted): kept, renamed, not opened
            stale = self.part.with_name(f"{self.part.name}.crashed-{time.strftime('%Y%m%dT%H%M%S')}")
            self.part.rename(stale)
        self._part_id: tuple[int, int] | None = None
        if part:
            try:
                fd_part = open_regular(self.part, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
            except WriterError:
                self.release()
                raise
            self._part_id = _identity(fd_part)
            os.close(fd_part)

    def check_part(self) -> None:
        """WriterError unless the part file is still the regular file this
        claim created (not replaced by a link or another file meanwhile)."""
        try:
            now = os.lstat(self.part)
        except FileNotFoundError:
            raise WriterError(f"{self.part} has disappeared") from None
        if self._part_id is None or not stat.S_ISREG(now.st_mode) or (now.st_dev, now.st_ino) != self._part_id:
            raise WriterError(f"{self.part} was replaced while being written; not published")

    def publish(self) -> str:
        """Make the part file final (fsync, rename, directory fsync), record its
        checksum, and give up the claim. Returns the SHA-256."""
        self.check_part()
        fsync_path(self.part)
        os.rename(self.part, self.final)
        fsync_path(self.final.parent)
        digest = record_checksum(self.final)
        self.release()
        return digest

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.lock.unlink(missing_ok=True)  # while still held: a waiter then finds the final file
        finally:
            os.close(self._fd)  # drops the flock
            self._fd = None


def _identity(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | NOFOLLOW)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_file(path: Path, block: int = 4 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def record_checksum(path: Path) -> str:
    """Append ``<sha256>  <name>`` to the directory's SHA256SUMS (one write
    with O_APPEND: lines of several writers never interleave)."""
    digest = sha256_file(path)
    line = f"{digest}  {path.name}\n".encode()
    fd = open_regular(path.parent / CHECKSUMS, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)
    return digest


def read_checksums(directory: Path) -> dict[str, str]:
    """file name -> SHA-256 as recorded (the latest line per name wins)."""
    path = directory / CHECKSUMS
    if not path.exists():
        return {}
    out = {}
    for line in path.read_text().splitlines():
        digest, _, name = line.partition("  ")
        if name:
            out[name] = digest
    return out


def write_atomically(final: Path, data: bytes) -> None:
    """Replace ``final`` with ``data`` so that readers see the old or the new
    file, never a half-written one (images refreshed during a scan)."""
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    if os.path.lexists(tmp):
        tmp.unlink()  # a left-over (or planted) temporary: the name is removed, never written through
    with os.fdopen(open_regular(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL), "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, final)
