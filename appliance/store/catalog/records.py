"""The catalog's typed records: what the index holds, as the rest of the appliance sees it.

Each record is a frozen dataclass made from the msgpack value the index keeps (`from_raw`)
and, where the catalog writes it back, turned into that value again (`raw`): the schema on
disk (store/index.py's docstring) does not change with these types. Fields read off an
instance for C-FIND (patient, study, series and instance attributes) stay a mapping of
DICOM keywords (`attributes`): the matcher and the responses work by keyword.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, ClassVar, Mapping

_EMPTY: Mapping[str, Any] = MappingProxyType({})


@dataclass(frozen=True)
class HotCopy:
    """A copy on a filesystem tier, one file per sealed blob."""

    name: str
    verified: float = 0  # last key-less check (or write)
    deep: float = 0  # last decrypt and re-hash

    @property
    def where(self) -> str:
        """The object that holds it on its tier."""
        return self.name

    def raw(self) -> dict:
        return {"name": self.name, "verified": self.verified, **({"deep": self.deep} if self.deep else {})}


@dataclass(frozen=True)
class PackCopy:
    """A copy inside a pack on a cold tier."""

    pack: str
    offset: int
    length: int
    verified: float = 0
    deep: float = 0

    @property
    def where(self) -> str:
        return self.pack

    def raw(self) -> dict:
        return {"pack": self.pack, "offset": self.offset, "length": self.length, "verified": self.verified,
                **({"deep": self.deep} if self.deep else {})}


Copy = HotCopy | PackCopy


def copy_from_raw(raw: dict) -> Copy:
    if "pack" in raw:
        return PackCopy(raw["pack"], raw["offset"], raw["length"], raw.get("verified", 0), raw.get("deep", 0))
    return HotCopy(raw["name"], raw.get("verified", 0), raw.get("deep", 0))


@dataclass(frozen=True)
class Damage:
    """Why a version has no good copy left (a scrub found them all bad)."""

    since: int
    reason: str


@dataclass(frozen=True)
class Blob:
    """One stored version: its sealed bytes (size, xxh3-128, data key) and its copies by tier."""

    ca: bytes  # content address: SHA-256 of the P10 bytes as received
    sop: str
    size: int  # the P10 bytes
    sealed_size: int
    xxh3: bytes
    key_id: bytes
    compression: int
    stored: int
    copies: Mapping[str, Copy]
    damaged: Damage | None = None

    @classmethod
    def from_raw(cls, ca: bytes, raw: dict) -> "Blob":
        damaged = raw.get("damaged")
        return cls(ca, raw["sop"], raw["size"], raw["sealed_size"], raw["xxh3"], raw["key_id"], raw["compression"],
                   raw.get("stored", 0), MappingProxyType({t: copy_from_raw(c) for t, c in raw["copies"].items()}),
                   Damage(damaged["since"], damaged["reason"]) if damaged else None)

    def hot(self, tier: str) -> HotCopy | None:
        copy = self.copies.get(tier)
        return copy if isinstance(copy, HotCopy) else None

    def in_pack(self, tier: str, pack_id: str) -> PackCopy | None:
        """Its copy on `tier` when that copy is in pack `pack_id`."""
        copy = self.copies.get(tier)
        return copy if isinstance(copy, PackCopy) and copy.pack == pack_id else None


@dataclass(frozen=True)
class Pack:
    """A pack on a cold tier: sealed blobs of one study and a sealed trailer index."""

    id: str
    tier: str
    study: str
    size: int
    xxh3: bytes
    where: str  # cartridge label, or ""
    written: int
    verified: float
    deep: float
    blobs: tuple[bytes, ...]

    @classmethod
    def from_raw(cls, pack_id: str, raw: dict) -> "Pack":
        return cls(pack_id, raw["tier"], raw["study"], raw["size"], raw["xxh3"], raw.get("where", ""),
                   raw.get("written", 0), raw.get("verified", 0), raw.get("deep", 0), tuple(raw.get("blobs", ())))

    def raw(self) -> dict:
        return {"tier": self.tier, "study": self.study, "size": self.size, "xxh3": self.xxh3, "where": self.where,
                "written": self.written, "verified": self.verified, **({"deep": self.deep} if self.deep else {}),
                "blobs": list(self.blobs)}


@dataclass(frozen=True)
class Instance:
    """A SOP instance: its current version and the versions kept, and what C-FIND needs of it."""

    sop_uid: str
    study: str
    series: str
    transfer_syntax: str
    charset: str
    current: bytes
    versions: tuple[bytes, ...]
    attributes: Mapping[str, Any] = field(default_factory=lambda: _EMPTY)  # SOPClassUID, InstanceNumber, Rows, ...

    @classmethod
    def from_raw(cls, sop_uid: str, raw: dict) -> "Instance":
        own = {"study", "series", "transfer_syntax", "charset", "current", "versions"}
        return cls(sop_uid, raw["study"], raw["series"], raw.get("transfer_syntax", ""), raw.get("charset", ""),
                   raw["current"], tuple(raw["versions"]),
                   MappingProxyType({k: v for k, v in raw.items() if k not in own}))

    @property
    def sop_class(self) -> str:
        return self.attributes.get("SOPClassUID", "")


@dataclass(frozen=True)
class Study:
    """A study: its C-FIND attributes and what the appliance keeps about it."""

    uid: str
    patient: str  # the patient key (PatientID "\\0" IssuerOfPatientID)
    series: int
    instances: int
    modalities: tuple[str, ...]
    sop_classes: tuple[str, ...]
    received_bytes: int
    stored_bytes: int
    first_stored: int
    last_stored: int
    last_access: int  # 0: never retrieved or exported
    recalled: int  # when a recall of it last ran (0: never)
    source_aes: tuple[str, ...]
    packs: Mapping[str, tuple[str, ...]]  # tier -> pack ids
    attributes: Mapping[str, Any] = field(default_factory=lambda: _EMPTY)  # StudyDate, AccessionNumber, ...

    _OWN: ClassVar[frozenset[str]] = frozenset({"patient", "series", "instances", "modalities", "sop_classes", "received_bytes",
                                                "stored_bytes", "first_stored", "last_stored", "last_access", "recalled", "source_aes",
                                                "packs"})

    @classmethod
    def from_raw(cls, uid: str, raw: dict) -> "Study":
        return cls(uid, raw["patient"], raw["series"], raw["instances"], tuple(raw.get("modalities", ())),
                   tuple(raw.get("sop_classes", ())), raw.get("received_bytes", 0), raw.get("stored_bytes", 0),
                   raw.get("first_stored", 0), raw.get("last_stored", 0), raw.get("last_access", 0),
                   raw.get("recalled", 0), tuple(raw.get("source_aes", ())),
                   MappingProxyType({tier: tuple(ids) for tier, ids in raw.get("packs", {}).items()}),
                   MappingProxyType({k: v for k, v in raw.items() if k not in cls._OWN}))


@dataclass(frozen=True)
class Patient:
    key: str
    studies: int
    # PatientID, PatientName, PatientBirthDate, ...
    attributes: Mapping[str, Any] = field(default_factory=lambda: _EMPTY)

    @classmethod
    def from_raw(cls, key: str, raw: dict) -> "Patient":
        return cls(key, raw.get("studies", 0), MappingProxyType({k: v for k, v in raw.items() if k != "studies"}))


@dataclass(frozen=True)
class Job:
    """The one lifecycle job of a study (jobs/lifecycle.py)."""

    study: str
    kind: str  # migrate, evict, expire
    targets: tuple[str, ...]
    drop_hot: bool
    rule: str
    reason: str
    created: int
    attempts: int = 0
    next_try: int = 0
    error: str = ""
    pending: Mapping[str, str] = field(default_factory=lambda: _EMPTY)  # tier -> pack id being written

    @classmethod
    def from_raw(cls, study: str, raw: dict) -> "Job":
        return cls(study, raw["kind"], tuple(raw.get("targets", ())), bool(raw.get("drop_hot")), raw.get("rule", ""),
                   raw.get("reason", ""), raw.get("created", 0), raw.get(
                       "attempts", 0), raw.get("next_try", 0), raw.get("error", ""),
                   MappingProxyType(dict(raw.get("pending", {}))))

    def raw(self) -> dict:
        return {"kind": self.kind, "targets": list(self.targets), "drop_hot": self.drop_hot, "rule": self.rule,
                "reason": self.reason, "created": self.created, "attempts": self.attempts, "next_try": self.next_try, "error": self.error,
                "pending": dict(self.pending)}


@dataclass(frozen=True)
class Hold:
    """A legal hold on a study ("study:UID") or on every study of a patient ("patient:ID")."""

    key: str
    reason: str
    by: str
    since: int

    @classmethod
    def from_raw(cls, key: str, raw: dict) -> "Hold":
        return cls(key, raw.get("reason", ""), raw.get("by", ""), raw.get("since", 0))

    def raw(self) -> dict:
        return {"reason": self.reason, "by": self.by, "since": self.since}


@dataclass(frozen=True)
class Alarm:
    key: str  # stable: "tier:s3", "recall:PV0002L9", ...
    message: str
    action: str
    since: int

    @classmethod
    def from_raw(cls, key: str, raw: dict) -> "Alarm":
        return cls(key, raw["message"], raw["action"], raw["since"])


@dataclass(frozen=True)
class Replica:
    """An object the off-site target holds, verified there."""

    path: str  # "objects/ab/cd/<name>", "packs/ab/cd/<id>"
    size: int
    xxh3: bytes
    verified: float
    run: int
    target: str

    @classmethod
    def from_raw(cls, path: str, raw: dict) -> "Replica":
        return cls(path, raw["size"], raw["xxh3"], raw.get("verified", 0), raw.get("run", 0), raw.get("target", ""))

    def raw(self) -> dict:
        return {"size": self.size, "xxh3": self.xxh3, "verified": self.verified, "run": self.run,
                "target": self.target}
