"""Journals of other processes (store/journal.py): a crashed writer's journal replayed exactly
once by whoever opens the home next, and a fresh read waiting until every live writer has
applied what it had acknowledged (read-your-writes across processes: `appliance export` run
the moment a C-STORE is answered finds the instance)."""

from __future__ import annotations

import fcntl
import logging
import os
import time
from pathlib import Path
from typing import Callable

from appliance.format.journal import Record, read_records
from appliance.fsutil import fsync_dir
from appliance.store.journal import STATE_FORMAT, STATE_SUFFIX, SUFFIX, Applier

# How long a reader waits for another process to apply what it acknowledged.
OTHER_WRITERS_TIMEOUT_S = 10.0
LOG = logging.getLogger("appliance.journal")


def orphans(directory: Path) -> dict[bytes, list[Path]]:
    """Journal files whose writer is gone (no flock on them), by journal id, in order."""
    found: dict[str, list[Path]] = {}
    if not directory.is_dir():
        return {}
    for path in sorted(directory.glob(f"*{SUFFIX}")):
        journal_hex = path.name.split("-", 1)[0]
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            found.pop(journal_hex, None)
            found[journal_hex] = None  # one file held: the whole journal is alive
            continue
        os.close(fd)
        if found.get(journal_hex, []) is not None:
            found.setdefault(journal_hex, []).append(path)
    return {bytes.fromhex(k): v for k, v in found.items() if v}


def replay(directory: Path, kek_id: bytes, journal_key: Callable[[bytes], bytes], applier: Applier) -> int:
    """Apply every record of every orphaned journal, make it durable, delete the files.
    Returns the number of records replayed. Safe to run in several processes at once
    (each journal is replayed under its files' locks)."""
    replayed = 0
    for journal_id, paths in orphans(directory).items():
        locks = []
        try:
            for path in paths:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                locks.append(fd)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:  # another process is replaying it
                    break
            else:
                records: list[Record] = []
                for path in paths:
                    _, found = read_records(path, journal_key, kek_id)
                    records.extend(found)
                records.sort(key=lambda record: record.number)
                if records:
                    applier.apply(records, replaying=True)
                applier.checkpoint()
                for path in paths:
                    path.unlink(missing_ok=True)
                (directory / f"{journal_id.hex()}{STATE_SUFFIX}").unlink(missing_ok=True)
                fsync_dir(directory)
                applier.forget(journal_id)
                replayed += len(records)
        finally:
            for fd in locks:
                os.close(fd)
    _sweep(directory)
    return replayed


def _sweep(directory: Path) -> None:
    """Remove what crashed writers left beside their journals: a file being made, a state
    file whose journal is gone."""
    if not directory.is_dir():
        return
    journals = {path.name.split("-", 1)[0] for path in directory.glob(f"*{SUFFIX}")}
    for path in [*directory.glob("*.new"), *directory.glob(f"*{STATE_SUFFIX}")]:
        if path.suffix == STATE_SUFFIX and path.name[:-len(STATE_SUFFIX)] in journals:
            continue
        if _unlocked(path):
            path.unlink(missing_ok=True)


def _unlocked(path: Path) -> bool:
    """Whether no process holds a lock on the file (its writer is gone)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def wait_for_other_writers(directory: Path, own: bytes | None = None,
                           timeout: float = OTHER_WRITERS_TIMEOUT_S) -> None:
    """Wait until every other live journal (not `own`) has applied the records it had
    acknowledged when this was called; give up on one whose applying fails or takes longer
    than `timeout` (logged)."""
    try:
        names = [name for name in os.listdir(directory) if name.endswith(STATE_SUFFIX)]
    except FileNotFoundError:
        return
    deadline = time.monotonic() + timeout
    for name in names:
        if own is not None and name == own.hex() + STATE_SUFFIX:
            continue
        try:
            fd = os.open(directory / name, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            continue  # that writer closed its journal
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                continue  # its writer is gone: a writer replays what it left
            except BlockingIOError:
                pass
            target, applied, failing = _read_state(fd)
            while applied < target:
                if failing or time.monotonic() > deadline:
                    LOG.warning("another process has not applied what it acknowledged (%s): reading without it",
                                "applying fails there" if failing else "still applying")
                    break
                time.sleep(0.002)
                _, applied, failing = _read_state(fd)
        finally:
            os.close(fd)


def _read_state(fd: int) -> tuple[int, int, bool]:
    while True:  # read again if a write came in between (a torn read)
        first = os.pread(fd, STATE_FORMAT.size, 0)
        if len(first) == STATE_FORMAT.size and os.pread(fd, STATE_FORMAT.size, 0) == first:
            acked, applied, failing = STATE_FORMAT.unpack(first)
            return acked, applied, bool(failing)
        if len(first) < STATE_FORMAT.size:
            return 0, 0, False  # not written yet: nothing acknowledged
