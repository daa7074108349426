"""`appliance import`: store files and directories of DICOM, several files at a time.

Sealing (SHA-256, zstd, AES-GCM) releases the GIL, so a small pool of workers
keeps both cores busy; each file is reported only once it is durable.
"""

from __future__ import annotations

import os
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

from appliance.errors import ApplianceError, OutOfSpace, TierUnavailable
from appliance.store.archive import Archive, StoreOutcome


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


def run_import(archive: Archive, files: list[Path], workers: int,
               on_result: Callable[[Path, StoreOutcome | None, str], None]) -> ImportSummary:
    """Store `files`; call on_result(path, outcome, reason) as each one finishes.

    A file that is not a storable instance is rejected and the import goes on;
    a full disk or a hot tier that is not there stops it (what was reported stored stays stored)."""
    summary = ImportSummary()
    pending: dict[Future, Path] = {}
    queue = iter(files)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="import") as pool:
        while True:
            while not summary.aborted and len(pending) < workers * 2:
                path = next(queue, None)
                if path is None:
                    break
                pending[pool.submit(archive.store_file, path)] = path
            if not pending:
                return summary
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                path = pending.pop(future)
                try:
                    outcome = future.result()
                except (OutOfSpace, TierUnavailable) as exc:
                    summary.aborted = str(exc)
                    summary.rejected.append((str(path), str(exc)))
                    on_result(path, None, str(exc))
                    continue
                except ApplianceError as exc:
                    summary.rejected.append((str(path), str(exc)))
                    on_result(path, None, str(exc))
                    continue
                if outcome.status == "duplicate":
                    summary.duplicates += 1
                else:
                    summary.stored += 1
                    summary.new_versions += outcome.status == "new_version"
                    summary.bytes += outcome.info.length
                on_result(path, outcome, "")
