"""A file system that forgets what was not made durable: power cuts for tests, in the spirit
of LazyFS, as a FUSE file system in Python (mfusepy over libfuse 3).

A mount point backed by a directory. The backing directory always holds what is visible
now; the server remembers, beside it, what would survive a power cut:

- file data: the size of each file at its last fsync/fdatasync and, for every 4 KB page
  written or truncated since, the page's bytes as they were then (a file made since the
  mount has nothing durable: it reverts to empty). A write through a descriptor opened
  with O_SYNC or O_DSYNC is durable when it returns;
- directory entries: per directory, the entries (name -> inode) as of its last fsync.
  Strict POSIX: fsync of a file makes its data durable, never its own name. Create, mkdir,
  rename, unlink, rmdir, link and symlink all wait for an fsync of the directory they
  change; a rename between two directories is two changes (the file may come back under
  both names if only the new directory was synced). An inode that a durable entry still
  names is kept aside when its last visible name goes, so a cut can bring it back.
  Permissions, owners and times are not modelled: they survive as they are.

`cut()` is the power failing: every process with a file, a mapping, its working directory
or root on the mount is stopped (SIGSTOP), then the server stops answering (every request
fails with EIO from that instant, so nothing done after the cut can be acknowledged), the
processes are killed (SIGKILL), the file system is unmounted (the kernel's page cache of it,
mmap pages included, goes with it), the backing directory is rewritten to the durable state,
and a new server mounts it. Modes:

- `drop-all`: every unsynced page and entry change is lost;
- `random`: a page cache may write any dirty page back before the power fails, in any
  order: each unsynced page is kept or lost by a seeded coin, and each changed file ends at
  its durable or its current size (also a coin). Directory entries are as in `drop-all`.

Locks are the kernel's (the server implements neither POSIX locks nor flock, so FUSE keeps
them in the kernel, between the processes on this machine): fcntl locks, flock, and LMDB's
robust mutexes in its shared-mapped lock file all work.

    mount = PowercutMount(tmp_path / "powercut"); mount.mount()   # or powercut_mount(dir)
    ... processes work under mount.path ...
    report = mount.cut(mode="random", seed=7)
    mount.stats()   # {"fsync": n, "fdatasync": n, "fsyncdir": n, "sync_writes": n, ...}
    mount.unmount()

The server is this file run as a script: `python powercut.py BACKING MOUNTPOINT SOCKET`
(BACKING holds `root/`, the visible tree, and `kept/`); it takes commands on an abstract
Unix socket, one JSON line each: `{"command": "stats"}` and `{"command": "cut", "mode": ...,
"seed": ...}`, and prints what the cut restored as one JSON line when it exits.
"""

from __future__ import annotations

import errno
import functools
import json
import os
import random
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

PAGE = 4096
DROP_ALL, RANDOM = "drop-all", "random"
MODES = (DROP_ALL, RANDOM)
RENAME_NOREPLACE = 1  # <linux/fs.h>


class MountUnavailable(RuntimeError):
    """FUSE cannot be mounted on this machine (no /dev/fuse, no libfuse 3, not allowed)."""


# -- the durable state (server side) -----------------------------------------------------------

@dataclass(frozen=True)
class Entry:
    kind: str  # "dir", "file" or "symlink"
    ino: int
    target: str = ""  # what a symlink points to (it never changes)


def _entry(st: os.stat_result, target: str = "") -> Entry:
    kind = "dir" if stat.S_ISDIR(st.st_mode) else "symlink" if stat.S_ISLNK(st.st_mode) else "file"
    return Entry(kind, st.st_ino, target)


def _entries(directory: int | str) -> dict[str, Entry]:
    """The entries of a directory (a path or an open descriptor) as they are now."""
    fd = directory if isinstance(directory, int) else os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        found = {}
        for name in os.listdir(fd):
            st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            found[name] = _entry(st, os.readlink(name, dir_fd=fd) if stat.S_ISLNK(st.st_mode) else "")
        return found
    finally:
        if fd is not directory:
            os.close(fd)


@dataclass
class UnsyncedFile:
    """One file changed since its last sync: its size then, the pages changed since, and the
    durable bytes of those pages (none for a page wholly past the durable size)."""

    durable_size: int
    dirty: set[int] = field(default_factory=set)
    durable_pages: dict[int, bytes] = field(default_factory=dict)


class Durability:
    """What would survive a power cut, beside the backing tree (`root`) that holds what is
    visible now. Inodes are the backing file system's; `kept` holds inodes that only durable
    entries still name, under their inode number."""

    def __init__(self, root: Path, kept: Path):
        self.root, self.kept = root, kept
        self.root_ino = os.lstat(root).st_ino
        self.dirs: dict[int, dict[str, Entry]] = {}  # directory inode -> its durable entries
        self.refs: Counter[int] = Counter()  # inode -> durable entries naming it
        self.files: dict[int, UnsyncedFile] = {}
        self.counts: Counter[str] = Counter()
        for directory, _, _ in os.walk(root):  # what is there at mount time is durable
            self._set_durable(os.lstat(directory).st_ino, _entries(directory))

    def _set_durable(self, directory: int, entries: dict[str, Entry]) -> None:
        self.refs.subtract(entry.ino for entry in self.dirs.get(directory, {}).values())
        self.refs.update(entry.ino for entry in entries.values())
        self.dirs[directory] = entries

    def created(self, entry: Entry) -> None:
        """A new inode: nothing of it is durable (its number may be a dead inode's)."""
        if entry.kind == "dir":
            self._set_durable(entry.ino, {})
        elif entry.kind == "file":
            self.files[entry.ino] = UnsyncedFile(0)

    def changing(self, ino: int, fd: int, start: int, end: int) -> None:
        """Bytes [start, end) of a file are about to change (a write, or a truncate's span)."""
        unsynced = self.files.get(ino)
        if unsynced is None:
            unsynced = self.files[ino] = UnsyncedFile(os.fstat(fd).st_size)
        for page in range(start // PAGE, (end + PAGE - 1) // PAGE):
            if page not in unsynced.dirty:
                unsynced.dirty.add(page)
                if page * PAGE < unsynced.durable_size:
                    unsynced.durable_pages[page] = os.pread(fd, PAGE, page * PAGE)

    def synced(self, ino: int) -> None:
        self.files.pop(ino, None)

    def synced_dir(self, fd: int) -> None:
        self._set_durable(os.fstat(fd).st_ino, _entries(fd))

    def keep_aside(self, path: str) -> bool:
        """Before the name `path` goes: when a durable entry names its inode, move it into
        `kept` instead (True: the caller must not remove it)."""
        st = os.lstat(path)
        if self.refs[st.st_ino] <= 0:
            return False
        aside = self.kept / str(st.st_ino)
        if os.path.lexists(aside):
            if stat.S_ISDIR(st.st_mode):
                os.rmdir(path)
            else:
                os.unlink(path)
        else:
            os.rename(path, aside)
        return True

    def is_kept(self, ino: int) -> bool:
        return os.path.lexists(self.kept / str(ino))

    # -- the cut ----------------------------------------------------------------------------

    def restore(self, mode: str, seed: int | None) -> dict:
        """Rewrite the backing directory to the durable state (`root` is not mounted now)."""
        rng = random.Random(seed)
        locations: dict[int, Path] = {}
        for base in (self.root, self.kept):
            for directory, dirnames, filenames in os.walk(base):
                for name in dirnames + filenames:
                    locations.setdefault(os.lstat(os.path.join(directory, name)).st_ino,
                                         Path(directory, name))
        locations[self.root_ino] = self.root
        plan = self._durable_tree()
        report = {"mode": mode, "seed": seed, "files": 0, "pages_kept": 0, "pages_lost": 0}
        for relative, entry in plan:
            if entry.kind == "file" and entry.ino in self.files:
                self._restore_file(locations[entry.ino], self.files.pop(entry.ino), mode, rng, report)
        new_root = self.root.with_name("root.new")
        shutil.rmtree(new_root, ignore_errors=True)
        new_root.mkdir()
        for relative, entry in plan:
            path = new_root / relative
            if entry.kind == "dir":
                path.mkdir()
                if entry.ino in locations:
                    path.chmod(stat.S_IMODE(os.lstat(locations[entry.ino]).st_mode))
            elif entry.kind == "symlink":
                path.symlink_to(entry.target)
            elif entry.ino in locations:
                os.link(locations[entry.ino], path)
            else:
                raise RuntimeError(f"powercut: inode {entry.ino} of durable {relative} was lost")
        new_root.chmod(stat.S_IMODE(os.lstat(self.root).st_mode))
        old_root = self.root.with_name("root.old")
        os.rename(self.root, old_root)
        os.rename(new_root, self.root)
        shutil.rmtree(old_root)
        shutil.rmtree(self.kept)
        self.kept.mkdir()
        report["entries"] = len(plan)
        return report

    def _durable_tree(self) -> list[tuple[str, Entry]]:
        """(relative path, entry) of every durable entry reachable from the root, parents
        first. Directories are synced one by one, so two of them may both name a directory
        (a rename between them, one synced): it appears once, at its first name."""
        plan, seen = [], {self.root_ino}

        def walk(directory: int, prefix: str) -> None:
            for name, entry in sorted(self.dirs.get(directory, {}).items()):
                if entry.kind == "dir":
                    if entry.ino in seen:
                        continue
                    seen.add(entry.ino)
                plan.append((prefix + name, entry))
                if entry.kind == "dir":
                    walk(entry.ino, prefix + name + "/")

        walk(self.root_ino, "")
        return plan

    @staticmethod
    def _restore_file(path: Path, unsynced: UnsyncedFile, mode: str, rng: random.Random, report: dict) -> None:
        fd = os.open(path, os.O_RDWR)
        try:
            current = os.fstat(fd).st_size
            if mode == DROP_ALL:
                size, kept = unsynced.durable_size, set()
            else:
                size = rng.choice((unsynced.durable_size, current))
                kept = {page for page in sorted(unsynced.dirty) if rng.random() < 0.5}
            os.ftruncate(fd, size)  # past the current end, kept pages read as the zeros they were
            for page in sorted(unsynced.dirty - kept):
                if page * PAGE < size:
                    durable = unsynced.durable_pages.get(page, b"").ljust(PAGE, b"\0")
                    os.pwrite(fd, durable[:size - page * PAGE], page * PAGE)
        finally:
            os.close(fd)
        report["files"] += 1
        report["pages_kept"] += len(kept)
        report["pages_lost"] += len(unsynced.dirty) - len(kept)


# -- the FUSE server ---------------------------------------------------------------------------

def _serve(backing: Path, mountpoint: Path, control: str) -> int:
    import logging

    import mfusepy

    logging.basicConfig(level=logging.WARNING)  # mfusepy reports a failing operation's traceback (server.log)
    FuseOSError = mfusepy.FuseOSError
    state = Durability(backing / "root", backing / "kept")
    lock = threading.Lock()
    cut: dict = {}
    sync_flags = os.O_SYNC | os.O_DSYNC

    def operation(method):
        @functools.wraps(method)
        def run(self, *args):
            with lock:
                if cut:
                    raise FuseOSError(errno.EIO)  # the power is off
                try:
                    return method(self, *args)
                except OSError as exc:
                    raise FuseOSError(exc.errno or errno.EIO) from None
        return run

    def backing_flags(flags: int) -> int:
        # The kernel gives every write its offset (O_APPEND included); reading a page before it
        # changes needs the descriptor readable; truncation goes through the model.
        access = os.O_RDONLY if flags & os.O_ACCMODE == os.O_RDONLY else os.O_RDWR
        return access | (flags & (os.O_EXCL | os.O_NOFOLLOW)) | os.O_CLOEXEC

    class PowercutFS(mfusepy.Operations):
        use_ns = True
        flag_nullpath_ok = flag_nopath = True  # descriptor-based calls get no path

        def __init__(self):
            self.handles: dict[int, tuple[int, bool]] = {}  # descriptor -> (inode, O_SYNC/O_DSYNC)

        @staticmethod
        def _real(path: str) -> str:
            return os.path.join(state.root, path.lstrip("/"))

        @operation
        def getattr(self, path, fh=None):
            st = os.fstat(fh) if fh is not None else os.lstat(self._real(path))
            links = st.st_nlink - (not stat.S_ISDIR(st.st_mode) and state.is_kept(st.st_ino))
            return {"st_mode": st.st_mode, "st_ino": st.st_ino, "st_nlink": links, "st_uid": st.st_uid,
                    "st_gid": st.st_gid, "st_size": st.st_size, "st_blocks": st.st_blocks,
                    "st_blksize": st.st_blksize, "st_atime": st.st_atime_ns, "st_mtime": st.st_mtime_ns,
                    "st_ctime": st.st_ctime_ns}

        @operation
        def readlink(self, path):
            return os.readlink(self._real(path))

        @operation
        def opendir(self, path):
            return os.open(self._real(path), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)

        @operation
        def readdir(self, path, fh):
            # With use_ino the kernel takes each entry's inode and type from here.
            found = [(e.name, {"st_ino": e.inode(), "st_mode": e.stat(follow_symlinks=False).st_mode}, 0)
                     for e in os.scandir(fh)]
            return [".", "..", *found]

        @operation
        def releasedir(self, path, fh):
            os.close(fh)

        @operation
        def fsyncdir(self, path, datasync, fh):
            state.counts["fsyncdir"] += 1
            state.synced_dir(fh)

        @operation
        def mkdir(self, path, mode):
            real = self._real(path)
            os.mkdir(real, mode)
            state.created(_entry(os.lstat(real)))

        @operation
        def rmdir(self, path):
            real = self._real(path)
            if os.listdir(real):
                raise FuseOSError(errno.ENOTEMPTY)
            if not state.keep_aside(real):
                os.rmdir(real)

        @operation
        def unlink(self, path):
            real = self._real(path)
            if stat.S_ISDIR(os.lstat(real).st_mode):
                raise FuseOSError(errno.EISDIR)
            if not state.keep_aside(real):
                os.unlink(real)

        @operation
        def symlink(self, path, target):
            real = self._real(path)
            os.symlink(target, real)
            state.created(_entry(os.lstat(real), target))

        @operation
        def link(self, path, existing):
            os.link(self._real(existing), self._real(path))

        @operation
        def rename(self, old, new, flags=0):
            source, dest = self._real(old), self._real(new)
            moving = os.lstat(source)
            try:
                victim = os.lstat(dest)
            except FileNotFoundError:
                victim = None
            if flags & ~RENAME_NOREPLACE:
                raise FuseOSError(errno.EINVAL)  # RENAME_EXCHANGE, RENAME_WHITEOUT: not modelled
            if flags and victim is not None:
                raise FuseOSError(errno.EEXIST)
            if victim is not None and victim.st_ino != moving.st_ino:
                if stat.S_ISDIR(moving.st_mode) != stat.S_ISDIR(victim.st_mode):
                    raise FuseOSError(errno.EISDIR if stat.S_ISDIR(victim.st_mode) else errno.ENOTDIR)
                if stat.S_ISDIR(victim.st_mode) and os.listdir(dest):
                    raise FuseOSError(errno.ENOTEMPTY)
                state.keep_aside(dest)
            os.rename(source, dest)

        @operation
        def chmod(self, path, mode):
            os.chmod(self._real(path), mode)

        @operation
        def chown(self, path, uid, gid):
            os.chown(self._real(path), uid, gid, follow_symlinks=False)

        @operation
        def utimens(self, path, times=None):
            os.utime(self._real(path), ns=times, follow_symlinks=False)

        @operation
        def create(self, path, mode, flags):
            real = self._real(path)
            existed = os.path.lexists(real)
            fd = os.open(real, backing_flags(flags) | os.O_CREAT, mode)
            st = os.fstat(fd)
            if not existed:
                state.created(_entry(st))
            elif flags & os.O_TRUNC:
                self._truncate(st.st_ino, fd, 0)
            self.handles[fd] = (st.st_ino, bool(flags & sync_flags))
            return fd

        @operation
        def open(self, path, flags):
            fd = os.open(self._real(path), backing_flags(flags))
            ino = os.fstat(fd).st_ino
            if flags & os.O_TRUNC:
                self._truncate(ino, fd, 0)
            self.handles[fd] = (ino, bool(flags & sync_flags))
            return fd

        @operation
        def read(self, path, size, offset, fh):
            return os.pread(fh, size, offset)

        @operation
        def write(self, path, data, offset, fh):
            ino, sync = self.handles[fh]
            state.changing(ino, fh, offset, offset + len(data))
            written = os.pwrite(fh, data, offset)
            state.counts["writes"] += 1
            state.counts["bytes_written"] += written
            if sync:
                state.counts["sync_writes"] += 1
                state.synced(ino)
            return written

        @operation
        def truncate(self, path, length, fh=None):
            if fh is not None:
                return self._truncate(self.handles[fh][0], fh, length)
            fd = os.open(self._real(path), os.O_RDWR | os.O_CLOEXEC)
            try:
                self._truncate(os.fstat(fd).st_ino, fd, length)
            finally:
                os.close(fd)

        @staticmethod
        def _truncate(ino: int, fd: int, length: int) -> None:
            size = os.fstat(fd).st_size
            state.changing(ino, fd, min(size, length), max(size, length))
            os.ftruncate(fd, length)

        @operation
        def fsync(self, path, datasync, fh):
            state.counts["fdatasync" if datasync else "fsync"] += 1
            state.synced(self.handles[fh][0])

        @operation
        def release(self, path, fh):
            self.handles.pop(fh, None)
            os.close(fh)

        @operation
        def statfs(self, path):
            sv = os.statvfs(state.root)
            return {key: getattr(sv, key) for key in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail",
                                                      "f_files", "f_ffree", "f_favail", "f_flag", "f_namemax")}

    def commands() -> None:
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind("\0" + control)
        server.listen()
        while True:
            connection, _ = server.accept()
            with connection, connection.makefile("rw") as stream:
                request = json.loads(stream.readline())
                with lock:
                    reply = dict(state.counts)
                    if request["command"] == "cut":
                        cut.update(mode=request["mode"], seed=request["seed"])
                stream.write(json.dumps(reply) + "\n")

    class FUSE(mfusepy.FUSE):
        # mfusepy 3.1 drops these arguments of libfuse 3's calls: an ftruncate's file handle
        # (a truncate of an open, unlinked file has no path) and rename's flags.
        def truncate_fuse_3(self, path, length, fip):
            return self.operations.truncate(None if path is None else path.decode(), length,
                                            fip.contents.fh if fip else None)

        def rename_fuse_3(self, old, new, flags):
            return self.operations.rename(old.decode(), new.decode(), flags)

    threading.Thread(target=commands, daemon=True).start()
    FUSE(PowercutFS(), str(mountpoint), foreground=True, nothreads=True, allow_other=True,
                 default_permissions=True, use_ino=True, hard_remove=True, kernel_cache=True,
                 fsname="powercut", subtype="powercut")
    if cut:
        print(json.dumps(state.restore(cut["mode"], cut["seed"])), flush=True)
    return 0


# -- the test side -----------------------------------------------------------------------------

@dataclass
class CutReport:
    """What one cut did: the processes it killed and what the durable state restored."""

    mode: str
    seed: int | None
    killed: dict[int, str]  # pid -> command line
    files: int
    pages_kept: int
    pages_lost: int
    entries: int


class PowercutMount:
    """The mount point `directory/mount`, backed by `directory/backing`, served by a child process."""

    def __init__(self, directory: Path):
        directory = Path(directory)
        self.path = directory / "mount"
        self._backing = directory / "backing"
        self._log = directory / "server.log"
        self._control = f"powercut-{uuid.uuid4().hex}"  # an abstract socket name
        self._server: subprocess.Popen | None = None
        self._totals: Counter[str] = Counter()

    def mount(self) -> None:
        for part in ("root", "kept"):
            (self._backing / part).mkdir(parents=True, exist_ok=True)
        self.path.mkdir(parents=True, exist_ok=True)
        if shutil.which("fusermount3") is None or not os.path.exists("/dev/fuse"):
            raise MountUnavailable("needs /dev/fuse and fusermount3 (Debian package fuse3)")
        self._server = subprocess.Popen(
            [sys.executable, __file__, str(self._backing), str(self.path), self._control],
            stdout=subprocess.PIPE, stderr=open(self._log, "ab"), text=True, cwd="/")
        deadline = time.monotonic() + 30
        while not os.path.ismount(self.path):
            if self._server.poll() is not None or time.monotonic() > deadline:
                self._server.kill()
                self._server.wait()
                raise MountUnavailable(f"the FUSE server did not mount {self.path}: "
                                       + self._log.read_text(errors="replace")[-2000:])
            time.sleep(0.02)
        while self._request({"command": "stats"}) is None:  # the command socket is up too
            time.sleep(0.02)

    def stats(self) -> dict[str, int]:
        """Calls seen since the first mount: fsync, fdatasync, fsyncdir, sync_writes (writes
        through O_SYNC/O_DSYNC descriptors), writes, bytes_written."""
        live = Counter(self._request({"command": "stats"}))
        return {key: (self._totals + live)[key] for key in
                ("fsync", "fdatasync", "fsyncdir", "sync_writes", "writes", "bytes_written")}

    def cut(self, mode: str = DROP_ALL, seed: int | None = None) -> CutReport:
        """The power fails now; the mount comes back in its durable state."""
        if mode not in MODES:
            raise ValueError(f"mode is one of {MODES}")
        stopped = self._stop_users()
        self._totals.update(self._request({"command": "cut", "mode": mode, "seed": seed}))
        killed = {pid: _command_line(pid) for pid in stopped}
        self._kill(stopped)
        self._unmount_and_wait()
        restored = json.loads(self._server.stdout.readline() or "null")
        if self._server.returncode != 0 or restored is None:
            raise RuntimeError(f"the powercut server failed at the cut: {self._log.read_text()[-3000:]}")
        self.mount()
        del restored["mode"], restored["seed"]
        return CutReport(mode, seed, killed, **restored)

    def unmount(self) -> None:
        """Kill whatever still uses the mount, then unmount it (no cut: the backing keeps all)."""
        if self._server is None:
            return
        self._kill(self._stop_users())
        self._unmount_and_wait()
        self._server = None

    def _request(self, message: dict) -> dict | None:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.connect("\0" + self._control)
                with sock.makefile("rw") as stream:
                    stream.write(json.dumps(message) + "\n")
                    stream.flush()
                    return json.loads(stream.readline())
        except ConnectionRefusedError:
            return None

    def _stop_users(self) -> list[int]:
        """SIGSTOP every process using the mount until none is left running (a fork of one
        that was still running is found by the next pass)."""
        stopped: list[int] = []
        while True:
            found = [pid for pid in processes_using(self.path, exclude={self._server.pid}) if pid not in stopped]
            if not found:
                return stopped
            for pid in found:
                if pid == os.getpid():
                    raise RuntimeError(f"the test process itself holds files on {self.path}")
                with _gone_is_fine():
                    os.kill(pid, signal.SIGSTOP)
                stopped.append(pid)

    def _kill(self, pids: list[int]) -> None:
        for pid in pids:
            with _gone_is_fine():
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while processes_using(self.path, exclude={self._server.pid}):  # the dead hold nothing (zombies neither)
            if time.monotonic() > deadline:
                raise RuntimeError(f"processes still use {self.path} after SIGKILL")
            time.sleep(0.01)

    def _unmount_and_wait(self) -> None:
        for _ in range(200):
            if subprocess.run(["fusermount3", "-u", str(self.path)], capture_output=True).returncode == 0:
                break
            time.sleep(0.05)
        else:
            raise RuntimeError(f"cannot unmount {self.path}")
        self._server.wait(60)


@contextmanager
def powercut_mount(directory: Path) -> Iterator[PowercutMount]:
    mount = PowercutMount(directory)
    mount.mount()
    try:
        yield mount
    finally:
        mount.unmount()


def processes_using(mount: Path, exclude: set[int] = frozenset()) -> list[int]:
    """Processes with a descriptor, a mapping, a working directory or a root under `mount`."""
    prefix = str(mount)
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) in exclude:
            continue
        base = f"/proc/{name}"
        try:
            links = [os.readlink(f"{base}/cwd"), os.readlink(f"{base}/root")]
            for fd in os.listdir(f"{base}/fd"):
                with _gone_is_fine():
                    links.append(os.readlink(f"{base}/fd/{fd}"))
            with open(f"{base}/maps") as maps:
                mapped = f" {prefix}/" in maps.read()
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue  # gone meanwhile, or a kernel thread
        if mapped or any(link == prefix or link.startswith(prefix + "/") for link in links):
            found.append(int(name))
    return found


def _command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return str(pid)


@contextmanager
def _gone_is_fine() -> Iterator[None]:
    try:
        yield
    except (FileNotFoundError, ProcessLookupError):
        pass


if __name__ == "__main__":
    raise SystemExit(_serve(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]))
