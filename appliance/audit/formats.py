"""Export formats (pure): RFC 5424 syslog lines and DICOM PS3.15 A.5 AuditMessages."""

from __future__ import annotations

import base64
import json
import xml.etree.ElementTree as ET

from appliance.audit.chain import canonical
from appliance.audit.events import EVENT_IDS, EVENT_TYPES


def _sd_escape(value) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("]", "\\]")


def to_syslog(record: dict, hostname: str) -> str:
    """An RFC 5424 line: facility 13 (log audit); severity notice, warning for failures and
    security alerts; the record's fields as structured data."""
    severity = 4 if record.get("outcome") or record["event"] == "Security Alert" else 5
    order = ("seq", "event", "type", "op", "action", "outcome", "user", "host", "dest", "patient", "study",
             "instances")
    fields = {k: record[k] for k in order if k in record}
    fields["detail"] = json.dumps(record.get("detail", {}), sort_keys=True, separators=(",", ":"))
    data = " ".join(f'{k}="{_sd_escape(v)}"' for k, v in fields.items())
    message = f"{record['event']}: {record['op']} by {record.get('user', '-')}"
    msgid = "".join(c if "!" <= c <= "~" else "_" for c in record["op"])[:32] or "-"
    return (f"<{13 * 8 + severity}>1 {record['time']} {hostname or '-'} pacs-vault - {msgid} "
            f"[audit@32473 {data}] {message}")


def _code(parent: ET.Element, tag: str, code: str, meaning: str, system: str = "DCM") -> None:
    ET.SubElement(parent, tag, {"csd-code": code, "codeSystemName": system, "originalText": meaning})


def to_atna_xml(record: dict, source_id: str) -> str:
    """A DICOM PS3.15 A.5 AuditMessage."""
    message = ET.Element("AuditMessage")
    ident = ET.SubElement(message, "EventIdentification", {
        "EventActionCode": record["action"], "EventDateTime": record["time"],
        "EventOutcomeIndicator": str(record["outcome"])})
    _code(ident, "EventID", EVENT_IDS[record["event"]], record["event"])
    if record.get("type"):
        _code(ident, "EventTypeCode", EVENT_TYPES[record["type"]], record["type"])
    if record["outcome"] and record.get("detail", {}).get("reason"):
        ET.SubElement(ident, "EventOutcomeDescription").text = str(record["detail"]["reason"])
    requestor = ET.SubElement(message, "ActiveParticipant", {"UserID": record.get("user", "") or "-",
                                                             "UserIsRequestor": "true"})
    if record.get("host"):
        requestor.set("NetworkAccessPointID", record["host"])
        requestor.set("NetworkAccessPointTypeCode", "2" if record["host"][:1].isdigit() or ":" in record["host"]
                      else "1")
    if record["op"] in ("c-store", "import"):
        _code(requestor, "RoleIDCode", "110153", "Source Role ID")
    if record.get("dest"):
        destination = ET.SubElement(message, "ActiveParticipant", {"UserID": record["dest"],
                                                                   "UserIsRequestor": "false"})
        _code(destination, "RoleIDCode", "110152", "Destination Role ID")
    archive = ET.SubElement(message, "ActiveParticipant", {"UserID": source_id, "UserIsRequestor": "false"})
    _code(archive, "RoleIDCode", "110150", "Application")
    ET.SubElement(message, "AuditSourceIdentification", {"AuditSourceID": source_id})
    if record.get("study"):
        study = ET.SubElement(message, "ParticipantObjectIdentification", {
            "ParticipantObjectID": record["study"], "ParticipantObjectTypeCode": "2",
            "ParticipantObjectTypeCodeRole": "3"})
        _code(study, "ParticipantObjectIDTypeCode", "110180", "Study Instance UID")
        if record.get("instances") is not None:
            ET.SubElement(study, "ParticipantObjectDetail", {"type": "NumberOfInstances",
                                                             "value": str(record["instances"])})
    if record.get("patient"):
        patient = ET.SubElement(message, "ParticipantObjectIdentification", {
            "ParticipantObjectID": record["patient"], "ParticipantObjectTypeCode": "1",
            "ParticipantObjectTypeCodeRole": "1"})
        _code(patient, "ParticipantObjectIDTypeCode", "2", "Patient Number", "RFC-3881")
    if record["event"] == "Query" and record.get("detail", {}).get("keys"):
        query = ET.SubElement(message, "ParticipantObjectIdentification", {
            "ParticipantObjectID": str(record["detail"].get("sop_class", "")), "ParticipantObjectTypeCode": "2",
            "ParticipantObjectTypeCodeRole": "24"})
        _code(query, "ParticipantObjectIDTypeCode", "110181", "SOP Class UID")
        ET.SubElement(query, "ParticipantObjectQuery").text = base64.b64encode(
            canonical(record["detail"]["keys"])).decode()
    return ET.tostring(message, encoding="unicode")
