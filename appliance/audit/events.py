"""The audit vocabulary: DICOM PS3.15 A.5 events, built as the dicts the trail chains.

Pure: no I/O. Event IDs and types are enums, so a misspelt name fails where it is written,
not when the record is made; their values are the names the trail's records carry.
"""

from __future__ import annotations

from enum import StrEnum

from appliance.errors import ApplianceError


class EventID(StrEnum):
    """DICOM PS3.16 CID 400 (code system DCM)."""

    APPLICATION_ACTIVITY = "Application Activity"
    AUDIT_LOG_USED = "Audit Log Used"
    BEGIN_TRANSFERRING = "Begin Transferring DICOM Instances"
    INSTANCES_ACCESSED = "DICOM Instances Accessed"
    INSTANCES_TRANSFERRED = "DICOM Instances Transferred"
    STUDY_DELETED = "DICOM Study Deleted"
    EXPORT = "Export"
    IMPORT = "Import"
    QUERY = "Query"
    SECURITY_ALERT = "Security Alert"
    USER_AUTHENTICATION = "User Authentication"


class EventType(StrEnum):
    """DICOM PS3.16 CID 401 and CID 403 (code system DCM)."""

    APPLICATION_START = "Application Start"
    APPLICATION_STOP = "Application Stop"
    LOGIN = "Login"
    LOGOUT = "Logout"
    NODE_AUTHENTICATION = "Node Authentication"
    NETWORK_CONFIGURATION = "Network Configuration"
    SECURITY_CONFIGURATION = "Security Configuration"
    SOFTWARE_CONFIGURATION = "Software Configuration"
    USE_OF_RESTRICTED_FUNCTION = "Use of Restricted Function"
    AUDIT_RECORDING_STOPPED = "Audit Recording Stopped"
    AUDIT_RECORDING_STARTED = "Audit Recording Started"
    OBJECT_SECURITY_ATTRIBUTES_CHANGED = "Object Security Attributes Changed"


EVENT_IDS = {
    EventID.APPLICATION_ACTIVITY: "110100", EventID.AUDIT_LOG_USED: "110101", EventID.BEGIN_TRANSFERRING: "110102",
    EventID.INSTANCES_ACCESSED: "110103", EventID.INSTANCES_TRANSFERRED: "110104", EventID.STUDY_DELETED: "110105",
    EventID.EXPORT: "110106", EventID.IMPORT: "110107", EventID.QUERY: "110112", EventID.SECURITY_ALERT: "110113",
    EventID.USER_AUTHENTICATION: "110114",
}
EVENT_TYPES = {
    EventType.APPLICATION_START: "110120", EventType.APPLICATION_STOP: "110121", EventType.LOGIN: "110122",
    EventType.LOGOUT: "110123", EventType.NODE_AUTHENTICATION: "110126", EventType.NETWORK_CONFIGURATION: "110128",
    EventType.SECURITY_CONFIGURATION: "110129", EventType.SOFTWARE_CONFIGURATION: "110131",
    EventType.USE_OF_RESTRICTED_FUNCTION: "110132", EventType.AUDIT_RECORDING_STOPPED: "110133",
    EventType.AUDIT_RECORDING_STARTED: "110134", EventType.OBJECT_SECURITY_ATTRIBUTES_CHANGED: "110135",
}
OUTCOMES = {0: "success", 4: "minor failure", 8: "serious failure", 12: "major failure"}


class AuditError(ApplianceError):
    """The trail cannot be written: the operation that needed the record does not happen."""

    exit_code = 74


def event(event_id: EventID, *, op: str, action: str = "E", outcome: int = 0, type: EventType | None = None,
          user: str = "", host: str = "", dest: str = "", patient: str = "", study: str = "",
          instances: int | None = None, **detail) -> dict:
    """One audit event (without its place in the chain). Empty fields are left out."""
    if event_id not in EVENT_IDS or (type and type not in EVENT_TYPES) or action not in "CRUDE" \
            or outcome not in OUTCOMES:
        raise ValueError(f"not an audit event: {event_id!r} {type!r} {action!r} {outcome!r}")
    record = {"event": str(event_id), "type": str(type or ""), "op": op, "action": action, "outcome": outcome,
              "user": user, "host": host, "dest": dest, "patient": patient, "study": study, "instances": instances,
              "detail": {k: v for k, v in detail.items() if v not in (None, "", [], {})}}
    return {k: v for k, v in record.items() if v not in (None, "", {}) or k == "outcome"}
