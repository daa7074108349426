"""Filesystem backend: hot RAID, or any mounted disk used as a tier.

Layout under the tier root: `ab/cd/abcd...` (two levels of 256 fan-out
directories by the first four hex digits of the name; the first level is made
when the tier is first opened, the second as objects arrive), and `.incoming/`
for objects being written (`<name>.<pid>.tmp`). A put writes the temp file,
fsyncs it, renames it into place and fsyncs the directory, so an object is
either absent or whole and durable. A staged object (`stage`, then `publish`) is
the same in two steps, so that one publish makes many objects durable together.
65,536 directories keep a 100-million-object tier near 1,500 entries per directory.
"""

from __future__ import annotations

import os
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator

from appliance.errors import BlobMissing, TierUnavailable
from appliance.fsutil import atomic_file, free_bytes, fsync_dir

_NAME = re.compile(r"^[0-9a-f]{8,64}$")
_INCOMING = ".incoming"
_FANOUT = [f"{n:02x}" for n in range(256)]
_SYNC_THREADS = 16


class StagedFile:
    """An object being written to `.incoming/`, not yet synced (`FilesystemBackend.stage`)."""

    def __init__(self, tmp: Path, final: Path):
        self.tmp, self.final = tmp, final
        self.fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        self.published = False

    def write(self, data) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view):]

    def set_stored_time(self, mtime_ns: int) -> None:
        os.utime(self.fd, ns=(mtime_ns, mtime_ns))

    def discard(self) -> None:
        """Remove it, wherever it is (a store that failed or was refused)."""
        self._close()
        (self.final if self.published else self.tmp).unlink(missing_ok=True)

    def _close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _syncer() -> ThreadPoolExecutor:
    """Threads for one round of syncs (gone when it ends: none kept idle between rounds)."""
    return ThreadPoolExecutor(max_workers=_SYNC_THREADS, thread_name_prefix="hot-sync")


def fanout_path(name: str) -> str:
    """Where an object lives relative to a filesystem tier's root (also the layout off-site)."""
    return f"{name[:2]}/{name[2:4]}/{name}"


class FilesystemBackend:
    """`create`: make the tier's directory if it is missing (the hot tier). A cold tier's
    directory is a mount point: when it is missing, the disk is not there, and every call
    raises TierUnavailable instead of filling the root file system."""

    def __init__(self, name: str, root: Path, *, create: bool = True):
        self.name = name
        self.root = Path(root)
        self._incoming = self.root / _INCOMING
        self._ready = False
        if create:
            self.root.mkdir(parents=True, exist_ok=True)
        if self.root.is_dir():
            self._prepare()

    def _prepare(self) -> None:
        """Check the tier's directory is there; lay out the fan-out directories on first use."""
        if not self.root.is_dir():
            raise TierUnavailable(f"tier {self.name}: {self.root} is not there (disk not mounted?)")
        if self._ready:
            return
        self._incoming.mkdir(exist_ok=True)
        missing = [d for d in _FANOUT if not (self.root / d).is_dir()]
        for directory in missing:
            (self.root / directory).mkdir(exist_ok=True)
        if missing:
            fsync_dir(self.root)
        self._ready = True

    def path(self, name: str) -> Path:
        if not _NAME.match(name):
            raise ValueError(f"invalid object name {name!r}")
        self._prepare()
        return self.root / fanout_path(name)

    @contextmanager
    def create(self, name: str) -> Iterator[BinaryIO]:
        final = self.path(name)
        if not final.parent.is_dir():
            final.parent.mkdir(exist_ok=True)
            fsync_dir(final.parent.parent)
        with atomic_file(self._incoming / f"{name}.{os.getpid()}.tmp", final) as fp:
            yield fp

    def free_bytes(self) -> int:
        self._prepare()
        return free_bytes(self.root)

    def write_unsynced(self, name: str, data, mtime_ns: int) -> None:
        """Write an object whose bytes are durable elsewhere already (the ingest journal), in
        place and without waiting for the disk; `make_durable` later. Readers find it only
        through the index, which names it once this returned. `mtime_ns`: when it was stored
        (a rebuild of the index orders versions by it)."""
        path = self.path(name)
        if not path.parent.is_dir():
            path.parent.mkdir(exist_ok=True)
            fsync_dir(path.parent.parent)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.utime(fd, ns=(mtime_ns, mtime_ns))
        finally:
            os.close(fd)

    def set_stored_time(self, name: str, mtime_ns: int) -> None:
        os.utime(self.path(name), ns=(mtime_ns, mtime_ns))

    def make_durable(self, names: Iterable[str]) -> None:
        """fsync objects written by write_unsynced, then their directories (each once). The
        syncs run side by side: the file system commits them together, not one by one."""
        paths = [self.path(name) for name in names]
        with _syncer() as pool:
            list(pool.map(_fdatasync_if_there, paths))
            list(pool.map(fsync_dir, sorted({path.parent for path in paths})))

    def stage(self, name: str) -> StagedFile:
        """Begin writing an object in `.incoming/`; `publish` makes it the object, durably."""
        final = self.path(name)
        return StagedFile(self._incoming / f"{name}.{os.getpid()}.tmp", final)

    def publish(self, staged: list[StagedFile]) -> None:
        """Make staged objects durable under their names, all together: their data synced
        side by side, renamed into place, each directory synced once. Raises OSError (and
        then none of them may be counted on)."""
        with _syncer() as pool:
            list(pool.map(lambda f: os.fdatasync(f.fd), staged))
            for directory in sorted({f.final.parent for f in staged}):
                if not directory.is_dir():
                    directory.mkdir(exist_ok=True)
                    fsync_dir(directory.parent)
            for f in staged:
                os.rename(f.tmp, f.final)
                f.published = True
                f._close()
            list(pool.map(fsync_dir, sorted({f.final.parent for f in staged})))

    def put(self, name: str, src: BinaryIO) -> None:
        with self.create(name) as dst:
            shutil.copyfileobj(src, dst, 1 << 20)

    def read_order(self, names: Iterable[str]) -> list[str]:
        return list(names)

    def locate(self, name: str) -> str:
        return ""

    def check(self) -> None:
        self._prepare()

    def open(self, name: str) -> BinaryIO:
        try:
            return open(self.path(name), "rb")
        except FileNotFoundError:
            raise BlobMissing(f"object {name} is missing from tier {self.name}") from None

    def size(self, name: str) -> int:
        try:
            return self.path(name).stat().st_size
        except FileNotFoundError:
            raise BlobMissing(f"object {name} is missing from tier {self.name}") from None

    def delete(self, name: str) -> None:
        path = self.path(name)
        for stale in self._incoming.glob(f"{name}.*.tmp"):  # a killed writer's partial put
            pid = stale.name.split(".")[1]
            if pid.isdigit() and not _writer_alive(int(pid), stale):
                stale.unlink(missing_ok=True)
        try:
            path.unlink()
        except FileNotFoundError:
            return
        fsync_dir(path.parent)

    def list(self) -> Iterator[str]:
        self._prepare()
        for first in _FANOUT:
            for second in sorted(os.listdir(self.root / first)):
                for name in os.listdir(self.root / first / second):
                    if _NAME.match(name):
                        yield name

    def sweep_incoming(self) -> int:
        """Remove temp files of writers that are no longer running (killed mid-put)."""
        removed = 0
        for entry in os.listdir(self._incoming):
            parts = entry.split(".")
            pid = int(parts[1]) if len(parts) == 3 and parts[1].isdigit() else None
            if pid is not None and (pid == os.getpid() or _writer_alive(pid, self._incoming / entry)):
                continue
            (self._incoming / entry).unlink(missing_ok=True)
            removed += 1
        return removed


def _fdatasync_if_there(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:  # deleted meanwhile (a duplicate, a superseded version)
        return
    try:
        os.fdatasync(fd)
    finally:
        os.close(fd)


def _writer_alive(pid: int, temp: Path) -> bool:
    """Whether the process that wrote `temp` may still be writing it: process `pid` runs (a
    zombie does not: a killed import worker waits as one until something reaps it) and
    started before the file was last written (pids wrap: a newer process with the same pid
    is not its writer)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        written = temp.stat().st_mtime
    except FileNotFoundError:
        return False
    fields = stat.rsplit(")", 1)[1].split()  # the name in parentheses may hold spaces
    if fields[0] in ("Z", "X"):
        return False
    return _boot_time() + int(fields[19]) / os.sysconf("SC_CLK_TCK") <= written + 1


def _boot_time() -> float:
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("btime "):
            return float(line.split()[1])
    return 0.0
    return True
