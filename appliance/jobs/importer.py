"""`appliance import`: store files and directories of DICOM, on every core.

Sealing (SHA-256, zstd, AES-GCM) releases the GIL, but reading, walking and
committing each file in Python does not, and threads of one process fighting
for the GIL cost more than they gain. So the files are shared among worker
processes (one per core), each with its own archive and journal; in each, a
couple of threads seal, and each thread keeps a few stores queued in the
journal while it seals the next file, so that one sync commits several files.
A file is reported only once it is durable; a worker dies with the import
(a kill -9 of it leaves only what its journal holds, replayed at the next start).
"""

from __future__ import annotations

import collections
import ctypes
import multiprocessing
import multiprocessing.connection
import os
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

from appliance import config as cfg
from appliance.admin.home import open_archive
from appliance.audit.events import EventID, event
from appliance.audit.trail import AuditTrail
from appliance.errors import ApplianceError, OutOfSpace, TierUnavailable
from appliance.format.p10 import InstanceInfo
from appliance.store.archive import Archive
from appliance.store.ingest import PendingStore, StoreOutcome

# Stores a sealing thread keeps queued in the journal while it seals the next files.
WINDOW = 4
# Files per worker process below which more processes cost more (each opens an archive
# and makes its journal) than they save.
FILES_PER_PROCESS = 32
_PR_SET_PDEATHSIG = 1


@dataclass
class ImportSummary:
    stored: int = 0
    new_versions: int = 0
    duplicates: int = 0
    rejected: list[tuple[str, str]] = field(default_factory=list)
    bytes: int = 0
    aborted: str = ""

    def as_dict(self) -> dict:
        return {"stored": self.stored, "new_versions": self.new_versions, "duplicates": self.duplicates,
                "rejected": [{"path": p, "reason": r} for p, r in self.rejected], "bytes": self.bytes,
                "aborted": self.aborted}


def iter_files(paths: Iterable[str | os.PathLike]) -> Iterator[Path]:
    """Every regular file under the given files and directories, in a stable order."""
    for path in map(Path, paths):
        if path.is_dir():
            for root, dirs, files in os.walk(path):
                dirs.sort()
                for name in sorted(files):
                    yield Path(root) / name
        else:
            yield path


def plan(workers: int, files: int, cores: int | None = None) -> tuple[int, int]:
    """(processes, sealing threads in each) for `workers` files sealed at once."""
    processes = max(1, min(cores or os.cpu_count() or 1, workers, files // FILES_PER_PROCESS))
    return processes, max(1, workers // processes)


# One result: (file number, outcome or None, reason, stops the import).
_Result = tuple[int, "StoreOutcome | None", str, bool]


def run_import(config: cfg.Config, files: list[Path], workers: int,
               on_result: Callable[[Path, StoreOutcome | None, str], None], source: str = "") -> ImportSummary:
    """Store `files`; call on_result(path, outcome, reason) as each one is durable or refused.

    A file that is not a storable instance is rejected and the import goes on; a full disk
    or a hot tier that is not there stops it (what was reported stored stays stored). Each
    study that received files gets an Import audit record (`source`: where they came from),
    whatever stopped the import."""
    summary = ImportSummary()
    studies: dict[str, list] = {}  # study UID -> [PatientID, stored, duplicates]

    def record(number: int, outcome: StoreOutcome | None, reason: str, fatal: bool) -> None:
        path = files[number]
        if outcome is not None:
            study = studies.setdefault(outcome.info.study_uid, [outcome.info.patient.get("PatientID", ""), 0, 0])
            study[2 if outcome.status == "duplicate" else 1] += 1
        if outcome is None:
            summary.rejected.append((str(path), reason))
            summary.aborted = summary.aborted or (reason if fatal else "")
        elif outcome.status == "duplicate":
            summary.duplicates += 1
        else:
            summary.stored += 1
            summary.new_versions += outcome.status == "new_version"
            summary.bytes += outcome.info.length
        on_result(path, outcome, reason)

    processes, threads = plan(workers, len(files))
    if processes == 1:
        stop = threading.Event()
        lock = threading.Lock()
        taken = iter(range(len(files)))

        def take() -> int | None:
            with lock:
                return None if stop.is_set() else next(taken, None)

        def report(result: _Result) -> None:
            with lock:
                record(*result)
                if result[3]:
                    stop.set()

        try:
            with open_archive(config, writer=True) as archive:
                _store_share(archive, files, take, report, threads)
        finally:
            _audit_studies(config, studies, source)
        return summary
    try:
        _run_processes(config, files, processes, threads, record)
    finally:
        _audit_studies(config, studies, source)
    return summary


def _audit_studies(config: cfg.Config, studies: dict[str, list], source: str) -> None:
    """One Import record per study that received files."""
    if not studies:
        return
    trail = AuditTrail(config.audit_dir, config.audit_key_file, enabled=config.appliance.audit.enabled)
    for study_uid, (patient, stored, duplicates) in sorted(studies.items()):
        trail.record(event(EventID.IMPORT, op="import", action="C", study=study_uid, patient=str(patient),
                           instances=stored, duplicates=duplicates, source=source[:500]))


def _run_processes(config: cfg.Config, files: list[Path], processes: int, threads: int,
                   record: Callable[[int, StoreOutcome | None, str, bool], None]) -> None:
    context = multiprocessing.get_context("fork")  # fast, and nothing of the archive is open yet
    counter, stop = context.Value("q", 0), context.Event()
    workers, pipes = [], []
    for number in range(processes):
        receiver, sender = context.Pipe(duplex=False)
        worker = context.Process(target=_worker, args=(config.home, files, threads, counter, stop, sender),
                                 name=f"import-{number}", daemon=True)
        worker.start()
        sender.close()  # the worker's end: its death closes the pipe
        workers.append(worker)
        pipes.append(receiver)
    failure = ""
    try:
        while pipes:
            for pipe in multiprocessing.connection.wait(pipes):
                try:
                    result = pipe.recv()
                except EOFError:
                    result = "an import worker died before it finished"
                if result is None or isinstance(result, str):  # done, or could not go on
                    pipes.remove(pipe)
                    pipe.close()
                    if isinstance(result, str):
                        failure = failure or result
                        stop.set()
                    continue
                record(*result)
                if result[3]:
                    stop.set()
    except BaseException:
        stop.set()
        raise
    finally:
        for worker in workers:
            worker.join()
    if failure:
        raise ApplianceError(failure)


def _worker(home: Path, files: list[Path], threads: int, counter, stop, pipe) -> None:
    """One worker process: store the files it takes from `counter` until none are left."""
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the import's own process decides
    lock = threading.Lock()

    def take() -> int | None:
        if stop.is_set():
            return None
        with counter.get_lock():
            number = counter.value
            if number >= len(files):
                return None
            counter.value = number + 1
        return number

    def report(result: _Result) -> None:
        number, outcome, reason, fatal = result
        if outcome is not None:  # what the import's process reports, not the whole index entry
            info = outcome.info
            outcome = StoreOutcome(outcome.status, InstanceInfo(
                content_address=info.content_address, length=info.length, transfer_syntax=info.transfer_syntax,
                has_file_meta=info.has_file_meta, patient={"PatientID": info.patient.get("PatientID", "")},
                study={"StudyInstanceUID": info.study_uid}))
        with lock:
            pipe.send((number, outcome, reason, fatal))
        if fatal:
            stop.set()

    try:
        with open_archive(cfg.load(home), writer=True) as archive:
            _store_share(archive, files, take, report, threads)
        pipe.send(None)
    except ApplianceError as exc:
        pipe.send(str(exc))
    except BaseException as exc:  # noqa: BLE001 - said to the import's process, which fails
        pipe.send(f"an import worker failed: {type(exc).__name__}: {exc}")


def _store_share(archive: Archive, files: list[Path], take: Callable[[], int | None],
                 report: Callable[[_Result], None], threads: int) -> None:
    """Store the files `take()` hands out, on `threads` threads, reporting each one."""
    sealers = [threading.Thread(target=_seal_files, args=(archive, files, take, report), name=f"import-{n}")
               for n in range(threads)]
    for sealer in sealers:
        sealer.start()
    for sealer in sealers:
        sealer.join()


def _seal_files(archive: Archive, files: list[Path], take: Callable[[], int | None],
                report: Callable[[_Result], None]) -> None:
    queued: collections.deque[tuple[int, PendingStore]] = collections.deque()

    def settle_oldest() -> None:
        number, pending = queued.popleft()
        try:
            report((number, pending.result(), "", False))
        except (OutOfSpace, TierUnavailable) as exc:
            report((number, None, str(exc), True))
        except ApplianceError as exc:
            report((number, None, str(exc), False))

    while (number := take()) is not None:
        try:
            queued.append((number, archive.store_file_later(files[number])))
        except (OutOfSpace, TierUnavailable) as exc:
            report((number, None, str(exc), True))
        except ApplianceError as exc:
            report((number, None, str(exc), False))
        if len(queued) >= WINDOW:
            settle_oldest()
    while queued:
        settle_oldest()
