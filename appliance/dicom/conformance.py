"""The DICOM conformance statement, generated from the tables the server itself runs on
(server.py, negotiation.py, transcode.py, query.py, handlers.py, retrieve.py), so that it
cannot drift from what is negotiated and answered. `appliance conformance` prints it; the
README carries it, and tests/dicom/test_conformance.py checks both against a live server.
"""

from __future__ import annotations

from pydicom.uid import UID

from appliance.config import DicomConfig
from appliance.dicom import handlers
from appliance.dicom.negotiation import UNCOMPRESSED
from appliance.dicom.retrieve import PENDING_INTERVAL_S
from appliance.dicom.server import (
    QUERY_RETRIEVE,
    STORAGE_COMMITMENT,
    VERIFICATION,
    storage_sop_classes,
    transfer_syntaxes,
)
from appliance.format import p10, transcode

_LEVEL_KEYS = {
    "PATIENT": (*p10.PATIENT_KEYS, "NumberOfPatientRelatedStudies", "NumberOfPatientRelatedSeries",
                "NumberOfPatientRelatedInstances"),
    "STUDY": (*p10.STUDY_KEYS, "ModalitiesInStudy", "SOPClassesInStudy", "NumberOfStudyRelatedSeries",
              "NumberOfStudyRelatedInstances"),
    "SERIES": (*p10.SERIES_KEYS, "NumberOfSeriesRelatedInstances"),
    "IMAGE": p10.INSTANCE_KEYS,
}
_STATUSES = (
    ("C-STORE", [(0x0000, "Success: sealed, indexed and audited durably"),
                 (handlers.STATUS_NOT_AUTHORISED, "Refused: the calling AE has no store role"),
                 (handlers.STATUS_OUT_OF_RESOURCES, "Refused: out of storage space (nothing half-written)"),
                 (handlers.STATUS_CANNOT_UNDERSTAND, "Error: not a complete, indexable data set (the reason in "
                                                     "Error Comment)"),
                 (handlers.STATUS_PROCESSING_FAILURE, "Failure: processing failure")]),
    ("C-FIND", [(0xFF00, "Pending: a match"), (0x0000, "Success: no more matches"), (0xFE00, "Cancelled"),
                (0xA900, "Failed: Query/Retrieve Level not valid for the model"),
                (0xC000, "Failed: unable to process (a key that is not valid)"),
                (handlers.STATUS_NOT_AUTHORISED, "Refused: the calling AE has no query role")]),
    ("C-GET, C-MOVE", [(0xFF00, f"Pending: after every sub-operation, and every {PENDING_INTERVAL_S:g} s while a "
                                "study is recalled from a cold tier or an instance is transcoded"),
                       (0x0000, "Success: every sub-operation succeeded"),
                       (0xB000, "Warning: some sub-operations failed (Failed SOP Instance UID List)"),
                       (0xA702, "Failed: every sub-operation failed"),
                       (0xA701, "Refused: out of resources (too many contexts, audit trail not writable)"),
                       (0xA801, "Refused: move destination unknown or refusing"),
                       (0xFE00, "Cancelled (C-CANCEL)"),
                       (handlers.STATUS_NOT_AUTHORISED, "Refused: the calling AE has no retrieve role")]),
    ("N-ACTION (Storage Commitment)", [(0x0000, "Success: the report follows"), (0x0123, "No such action type"),
                                       (0x0120, "Missing Transaction UID"),
                                       (handlers.STATUS_NOT_AUTHORISED, "Refused: no store role")]),
)


def _name(uid: str) -> str:
    return UID(uid).name


def statement() -> str:
    """The statement as Markdown."""
    defaults = DicomConfig()
    storage = storage_sop_classes()
    syntaxes = transfer_syntaxes()
    lines = [
        "### Implementation",
        "",
        f"- Implementation Class UID `{p10.IMPLEMENTATION_CLASS_UID}`, version name `{p10.IMPLEMENTATION_VERSION}`;"
        f" AE title `{defaults.ae_title}` on port {defaults.port} unless `dicom:` in appliance.yaml says otherwise.",
        f"- Maximum PDU length received: {defaults.max_pdu_kb} KB (`dicom.max_pdu_kb`); PDUs sent fit the peer's "
        "maximum. Asynchronous operations window: 1 (not negotiated).",
        f"- Associations: {defaults.max_associations} at once, {defaults.max_associations_per_ae} per calling AE "
        f"title, {defaults.max_associations_per_address} per source address; a connection without a complete "
        f"A-ASSOCIATE-RQ after {defaults.association_request_timeout_s:g} s is closed; an association idle for "
        f"{defaults.idle_timeout_s:g} s is released. Optional TLS (`dicom.tls`), with or without client "
        "certificates.",
        "- Refused associations: calling AE title not registered (`appliance ae add`) or called AE title not "
        "ours (permanent, service user), protocol version or application context not supported, local limit "
        "exceeded (transient, service provider).",
        "",
        "### SOP classes",
        "",
        "| SOP class | UID | archive as SCP | archive as SCU |",
        "|---|---|---|---|",
        f"| {_name(VERIFICATION)} | `{VERIFICATION}` | yes | no |",
        f"| Storage: {len(storage)} classes, every storage SOP class of the DICOM dictionary, retired ones "
        "included (below) | | yes (C-STORE) | yes (C-GET sub-operations, SCP/SCU role selection; C-MOVE) |",
    ]
    lines += [f"| {_name(uid)} | `{uid}` | yes (C-{_name(uid).rsplit(' ', 1)[-1]}) | no |"
              for uid in sorted(QUERY_RETRIEVE)]
    lines += [
        f"| {_name(STORAGE_COMMITMENT)} | `{STORAGE_COMMITMENT}` | yes (N-ACTION; N-EVENT-REPORT sent on the "
        "same association, else on a new one to the registered address, our SCP role proposed) | no |",
        "",
        "A storage SOP class that is not in the dictionary is accepted only with "
        "`dicom.allow_unknown_sop_classes: true`.",
        "",
        "<details><summary>The storage SOP classes</summary>",
        "",
        "| SOP class | UID |",
        "|---|---|",
        *(f"| {_name(uid)} | `{uid}` |" for uid in storage),
        "",
        "</details>",
        "",
        "### Transfer syntaxes",
        "",
        f"- Storage, as SCP: every one of the {len(syntaxes)} transfer syntaxes below; an instance is stored "
        "byte-exact in the one it arrives in. Chosen per presentation context: "
        + ", ".join(_name(ts) for ts in UNCOMPRESSED) + " first when proposed, else the requestor's first.",
        "- Storage, as SCU (C-GET sub-operations on the requestor's SCP-role contexts, accepted in the "
        "requestor's order; C-MOVE, proposing each stored syntax in a context of its own and one context of "
        "the uncompressed syntaxes per SOP class): the stored syntax when the peer accepted it, byte-exact; "
        "otherwise transcoded as the table below says (the stored bytes never change). A sub-operation whose "
        "instance cannot be sent so fails, with the reason in the final response's Error Comment.",
        "- Verification, Query/Retrieve, Storage Commitment: " + ", ".join(_name(ts) for ts in UNCOMPRESSED) + ".",
        "",
        "| transfer syntax | UID | sent as, when the peer does not accept it |",
        "|---|---|---|",
    ]
    for ts in syntaxes:
        targets = [t for t in transcode.targets_for(ts) if t != ts]
        decoding = transcode.DECODINGS.get(ts)
        note = ", ".join(_name(t) for t in targets) if targets else "only as stored"
        if decoding is not None:
            note += " (decoded" + (", lossy data kept lossy, never re-encoded" if decoding.lossy else ", lossless") + ")"
        lines.append(f"| {_name(ts)} | `{ts}` | {note} |")
    lines += [
        "",
        "### Query (C-FIND)",
        "",
        "Patient Root at PATIENT, STUDY, SERIES and IMAGE level; Study Root at STUDY, SERIES and IMAGE. Relational "
        "queries (a lower level without the unique keys above it) are answered. Matching (PS3.4 C.2.2.2): single "
        "value, universal, wild card (`*`, `?`) on text, range on dates and times, list of UIDs; person names "
        "ignore case and trailing empty components, and their component groups (alphabetic, ideographic, "
        "phonetic) match one by one. Keys not listed match only universally and are returned empty.",
        "",
        "| level | matching and return keys |",
        "|---|---|",
        *(f"| {level} | {', '.join(keys)} |" for level, keys in _LEVEL_KEYS.items()),
        "",
        "Character sets: a query in any character set pydicom reads (ISO-IR 100 to 203, ISO 2022 with Japanese, "
        "Korean and Chinese, UTF-8, GB18030, GBK) is compared decoded; each response is in the requestor's "
        "character set when that can carry every value, else in UTF-8 (ISO_IR 192). Specific Character Set, "
        "Query/Retrieve Level and Retrieve AE Title are in every response.",
        "",
        "### Status codes",
        "",
        "| service | status | meaning |",
        "|---|---|---|",
        *(f"| {service} | `0x{code:04X}` | {meaning} |" for service, codes in _STATUSES for code, meaning in codes),
        "",
        "Storage Commitment reports: committed when the instance is indexed, of the class named, and its copy "
        "verifies (size and sealed-bytes hash); otherwise Failure Reason `0x0112` (no such instance) or "
        "`0x0119` (class mismatch).",
        "",
        "### Extended negotiation",
        "",
        "SCP/SCU Role Selection: accepted for storage SOP classes (C-GET). User Identity: recorded in the audit "
        "trail, not verified, no response. SOP Class (Common) Extended Negotiation: none.",
    ]
    return "\n".join(lines) + "\n"
