"""`appliance export STUDY_UID DEST [--transfer-syntax UID]`: a study's instances as Part 10 files.

The stored bytes come through the archive's read API (recalled first when the study is on cold
tiers only, verified as they stream); without a transfer syntax, or in the syntax an instance was
stored in, it is written byte-exact; otherwise transcoded in memory (format/transcode.py). Each
file appears whole or not at all (temp file, fsync, rename), only once every byte verified.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Iterator

from pydicom.uid import UID

from appliance.audit.events import EventID, event
from appliance.errors import ApplianceError, OutOfSpace
from appliance.format import p10
from appliance.format.transcode import TranscodeCounts, transcode
from appliance.fsutil import atomic_file
from appliance.store.archive import Archive
from appliance.store.catalog import Instance


@dataclass
class ExportResult:
    written: list[Path] = field(default_factory=list)
    failures: list[tuple[str, str]] = field(default_factory=list)  # (SOP Instance UID, reason)
    counts: TranscodeCounts = field(default_factory=TranscodeCounts)


def export_study(archive: Archive, study_uid: str, dest: Path, transfer_syntax: str | None = None) -> ExportResult:
    """Write every current instance of a study as DEST/<SOPInstanceUID>.dcm, as stored or in
    `transfer_syntax`.

    An instance that cannot be read, or transcoded to that syntax, is listed in the failures and
    not written; a full disk stops the export (OutOfSpace). The export is audited, whatever
    happened (what was written, what failed)."""
    if transfer_syntax is not None and not UID(transfer_syntax).is_transfer_syntax:
        raise ApplianceError(f"{transfer_syntax} is not a transfer syntax")
    dest.mkdir(parents=True, exist_ok=True)
    instances = archive.instances_of_study(study_uid)
    archive.touch_study(study_uid)
    if archive.needs_recall(study_uid):
        archive.recall_study(study_uid)
    result = ExportResult()
    try:
        for record in instances:
            sop_uid = record.sop_uid
            target = dest / f"{sop_uid}.dcm"
            try:
                with atomic_file(dest / f".{sop_uid}.dcm.partial", target) as out:
                    _write(out, archive.open_blob(record.current), record, sop_uid, transfer_syntax,
                           result.counts)
            except OutOfSpace:
                raise
            except ApplianceError as exc:
                result.failures.append((sop_uid, str(exc)))
            else:
                result.written.append(target)
    finally:
        archive.audit.record(event(
            EventID.EXPORT, op="export", action="R", outcome=4 if result.failures else 0, study=study_uid,
            patient=archive.patient_id_of(study_uid), instances=len(result.written), dest=str(dest.resolve()),
            failed=len(result.failures), transfer_syntax=transfer_syntax, transcoded=result.counts.summary()))
    return result


def _write(out: BinaryIO, stored: Iterator[bytes], record: Instance, sop_uid: str, transfer_syntax: str | None,
           counts: TranscodeCounts) -> None:
    stored_ts = record.transfer_syntax
    if transfer_syntax in (None, stored_ts):
        pieces = stored
    else:
        pieces = transcode(stored, stored_ts, transfer_syntax, counts=counts)
        out.write(p10.file_meta(record.sop_class, sop_uid, transfer_syntax))
    for piece in pieces:
        out.write(piece)
