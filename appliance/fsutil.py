"""Durable file-system primitives: the only place that knows fsync ordering."""

from __future__ import annotations

import errno
import fcntl
import os
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Iterator

from appliance.errors import HomeLocked, OutOfSpace


def fsync_dir(path: Path) -> None:
    _fsync(path, os.O_RDONLY | os.O_DIRECTORY)


def fsync_file(path: Path) -> None:
    _fsync(path, os.O_RDONLY | os.O_NOFOLLOW)


def _fsync(path: Path, flags: int) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_dirs(path: Path) -> None:
    """`mkdir -p` whose new directories are durable: each one's parent is fsynced."""
    missing = []
    while not path.is_dir():
        missing.append(path)
        path = path.parent
    for directory in reversed(missing):
        directory.mkdir(exist_ok=True)
        fsync_dir(directory.parent)


def sync_tree(root: Path) -> None:
    """fsync every file and directory under `root`, `root` last (files copied or made
    without a sync of their own, before something commits to them)."""
    for directory, _, files in os.walk(root, topdown=False):
        for name in files:
            fsync_file(Path(directory, name))
        fsync_dir(Path(directory))


@contextmanager
def atomic_file(tmp: Path, final: Path, mode: int = 0o644) -> Iterator[BinaryIO]:
    """Write `tmp`, fsync, rename to `final`, fsync the directory: `final` is old or new,
    never half; on any failure `tmp` is removed and a full disk raises OutOfSpace."""
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "wb") as fp:
            yield fp
            fp.flush()
            os.fsync(fp.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, final)
        fsync_dir(final.parent)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise_if_out_of_space(exc)
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_file_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    with atomic_file(path.with_name(f".{path.name}.tmp"), path, mode) as fp:
        fp.write(data)


def free_bytes(path: Path) -> int:
    """Bytes an unprivileged writer may still use on the volume holding `path`."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def raise_if_out_of_space(exc: OSError) -> None:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        raise OutOfSpace(f"out of space on the data volume ({exc.filename or 'write'})") from None


@contextmanager
def flocked(path: Path, *, make_parent: Path | None = None) -> Iterator[None]:
    """Hold an exclusive flock on `path` (created if missing), waiting for it; `make_parent`:
    a directory to make first when the lock's own directory does not exist yet."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o660)
    except FileNotFoundError:
        if make_parent is None:
            raise
        make_parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o660)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


class HomeLock:
    """flock on HOME/.lock: shared for everyday writers (serve, import), exclusive for
    maintenance that must be alone (fsck repair, rebuild, key rotation). With `name`, a lock
    of its own (HOME/.<name>.lock) for jobs that must not run twice at once (scrub, replicate)."""

    def __init__(self, home: Path, *, exclusive: bool, name: str = ""):
        self._path = home / (f".{name}.lock" if name else ".lock")
        self._name = name
        self._exclusive = exclusive
        self._fd: int | None = None

    def __enter__(self) -> "HomeLock":
        self._fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, (fcntl.LOCK_EX if self._exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            self._fd = None
            what = "this needs the home to itself" if self._exclusive else "a maintenance command is running"
            if self._name:
                what = f"another {self._name} is running"
            raise HomeLocked(f"{self._path.parent} is in use by another appliance process ({what})") from None
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
