"""Typed errors. Each knows the exit code the CLI returns and, where it can
reach the wire, the DICOM status a C-STORE answers with.

Messages are for a human and never carry key material or patient data.
"""


class ApplianceError(Exception):
    """Base class: one clear line for a human."""

    exit_code = 1
    dicom_status = 0xC000  # "Error: cannot understand"


class Incomplete(ApplianceError):
    """The command ran to its end, but not everything succeeded (what failed is in its output)."""


class ConfigError(ApplianceError):
    """A configuration file is missing, unparsable or invalid (names file and line)."""

    exit_code = 78  # EX_CONFIG


class KeyFileError(ApplianceError):
    """The key-encryption key file is missing, unreadable, too open or not the one the keyring needs."""

    exit_code = 77  # EX_NOPERM


class KeyMissing(ApplianceError):
    """A data key is gone: its study was deleted (crypto-shredded) or the keyring lost it."""

    exit_code = 77


class HomeLocked(ApplianceError):
    """Another process holds the lock this operation needs."""

    exit_code = 75  # EX_TEMPFAIL


class NotInitialised(ApplianceError):
    """The home directory has no appliance.yaml."""

    exit_code = 78


class InvalidInstance(ApplianceError):
    """Input is not a complete DICOM instance the archive can index."""

    exit_code = 65  # EX_DATAERR
    dicom_status = 0xC000


class IntegrityError(ApplianceError):
    """Stored bytes do not verify: tampered, truncated, extended, swapped or rotten.

    The bytes are never served."""

    exit_code = 90


class BlobMissing(IntegrityError):
    """A copy the index lists is not in its tier."""

    exit_code = 91


class OutOfSpace(ApplianceError):
    """The data volume is full; nothing was half-written."""

    exit_code = 74  # EX_IOERR
    dicom_status = 0xA700


class NotFound(ApplianceError):
    """No such study, series or instance in the index."""

    exit_code = 66  # EX_NOINPUT


class TierUnavailable(ApplianceError):
    """A tier cannot be reached now (S3 down, cartridge not loaded, restore pending, its file
    gone from the tiers directory): retry later.

    Nothing was removed from the source of whatever operation met it."""

    exit_code = 75  # EX_TEMPFAIL
    dicom_status = 0xA702


class CartridgeOffline(TierUnavailable):
    """The tape cartridge holding a pack is not mounted; `label` says which one to load."""

    def __init__(self, message: str, label: str):
        super().__init__(message)
        self.label = label


class TranscodeError(ApplianceError):
    """A stored instance cannot be converted to the transfer syntax asked for (its stored bytes are
    fine and stay as they are). The message fits a DICOM Error Comment (64 characters): the
    retrieve fails that sub-operation with it, never the association."""

    exit_code = 65  # EX_DATAERR
    dicom_status = 0xA702  # "Refused: out of resources, unable to perform sub-operations"

    def __init__(self, reason: str):
        super().__init__(reason[:64])


class PolicyViolation(ApplianceError):
    """An operation would break retention or a legal hold; nothing was changed."""

    exit_code = 77
