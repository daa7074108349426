"""S3 backend (boto3): any S3-compatible object store (AWS, Ceph RGW, MinIO, SeaweedFS).

Objects live under `bucket/prefix<name>`. A put sends a SHA-256 checksum the server
checks before it accepts the object (multipart above the part size, each part
checked, the upload completed atomically), in the tier's storage class. Archive
classes (GLACIER, DEEP_ARCHIVE) are read restore-then-read: a read of an object
that is not restored requests the restore and fails with TierUnavailable ("retry
later"); the retry after the restore finished reads it. Network failures, timeouts,
throttling and 5xx answers are TierUnavailable; a missing object is BlobMissing.
Credentials come from the configured INI file or boto3's own chain; they never
appear in messages.
"""

from __future__ import annotations

import builtins
import configparser
import io
from typing import BinaryIO, Iterable, Iterator

import boto3
import botocore.exceptions
from boto3.s3.transfer import TransferConfig
from botocore.config import Config as BotoConfig

from appliance.config import S3Config
from appliance.errors import BlobMissing, TierUnavailable

_MISSING = {"404", "NoSuchKey", "NotFound"}
_NETWORK = (botocore.exceptions.EndpointConnectionError, botocore.exceptions.ConnectionError,
            botocore.exceptions.HTTPClientError, botocore.exceptions.ReadTimeoutError,
            botocore.exceptions.ConnectTimeoutError)
_FAILURES = (botocore.exceptions.ClientError, botocore.exceptions.NoCredentialsError, *_NETWORK)


def _credentials(settings: S3Config, resolve) -> dict:
    """Keys from the tier's INI file. A file that is missing or incomplete makes the tier one that
    cannot be reached (as boto3 finding no credentials does), not a failure of every other tier."""
    if not settings.credentials_file:
        return {}
    path = resolve(settings.credentials_file)
    parser = configparser.ConfigParser()
    try:
        found = parser.read(path)
    except configparser.Error:  # its message quotes the file's lines: the keys
        raise TierUnavailable(f"{path}: not an INI file of [profile] sections") from None
    if not found:
        raise TierUnavailable(f"{path}: S3 credentials file not found")
    if not parser.has_section(settings.profile):
        raise TierUnavailable(f"{path}: no [{settings.profile}] section")
    section = parser[settings.profile]
    try:
        return {"aws_access_key_id": section["aws_access_key_id"],
                "aws_secret_access_key": section["aws_secret_access_key"]}
    except KeyError as exc:
        raise TierUnavailable(f"{path}: [{settings.profile}] has no {exc.args[0]}") from None


class S3Backend:
    def __init__(self, name: str, settings: S3Config, resolve=lambda p: p):
        self.name, self.settings = name, settings
        self._client = boto3.session.Session().client(
            "s3", endpoint_url=settings.endpoint_url or None, region_name=settings.region,
            config=BotoConfig(connect_timeout=settings.timeout_s, read_timeout=settings.timeout_s,
                              retries={"max_attempts": 1},  # RetryingBackend does the retrying
                              request_checksum_calculation="when_required",
                              response_checksum_validation="when_required",
                              s3={"addressing_style": "path"}),
            **_credentials(settings, resolve))
        self._transfer = TransferConfig(multipart_threshold=settings.part_size_mb << 20,
                                        multipart_chunksize=settings.part_size_mb << 20, max_concurrency=4)

    def _key(self, name: str) -> str:
        if not name or not all(c in "0123456789abcdef" for c in name):
            raise ValueError(f"invalid object name {name!r}")
        return self.settings.prefix + name

    def _fail(self, exc: Exception, what: str):
        where = f"s3 tier {self.name} (bucket {self.settings.bucket})"
        if isinstance(exc, botocore.exceptions.NoCredentialsError):
            return TierUnavailable(f"{where} has no credentials: set credentials_file in the tier")
        if isinstance(exc, botocore.exceptions.ClientError):
            code = exc.response.get("Error", {}).get("Code", "")
            if code in _MISSING:
                return BlobMissing(f"{what} is missing from {where}")
            return TierUnavailable(f"{where} refused {what}: {code or 'error'}")
        return TierUnavailable(f"{where} is unreachable ({type(exc).__name__}) during {what}")

    def put(self, name: str, src: BinaryIO) -> None:
        try:
            self._client.upload_fileobj(_KeepOpen(src), self.settings.bucket, self._key(name), Config=self._transfer,
                                        ExtraArgs={"StorageClass": self.settings.storage_class,
                                                   "ChecksumAlgorithm": "SHA256"})
        except (boto3.exceptions.S3UploadFailedError, *_FAILURES) as exc:
            raise self._fail(exc, f"upload of {name}") from None

    def open(self, name: str) -> BinaryIO:
        return io.BufferedReader(_S3Reader(self, name, self.size(name)), 1 << 20)

    def _get(self, name: str, start: int):
        try:
            return self._client.get_object(Bucket=self.settings.bucket, Key=self._key(name),
                                           Range=f"bytes={start}-")["Body"]
        except botocore.exceptions.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") == "InvalidObjectState":
                self._request_restore(name)
                raise TierUnavailable(f"pack {name} is in {self.settings.storage_class} on s3 tier {self.name}: "
                                      "a restore was requested; retry once it is done") from None
            raise self._fail(exc, f"read of {name}") from None
        except _FAILURES as exc:
            raise self._fail(exc, f"read of {name}") from None

    def _request_restore(self, name: str) -> None:
        try:
            self._client.restore_object(Bucket=self.settings.bucket, Key=self._key(name),
                                        RestoreRequest={"Days": self.settings.restore_days})
        except botocore.exceptions.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") != "RestoreAlreadyInProgress":
                raise self._fail(exc, f"restore of {name}") from None

    def size(self, name: str) -> int:
        try:
            return self._client.head_object(Bucket=self.settings.bucket, Key=self._key(name))["ContentLength"]
        except _FAILURES as exc:
            raise self._fail(exc, f"object {name}") from None

    def delete(self, name: str) -> None:
        try:
            self._client.delete_object(Bucket=self.settings.bucket, Key=self._key(name))
        except _FAILURES as exc:
            error = self._fail(exc, f"delete of {name}")
            if not isinstance(error, BlobMissing):
                raise error from None

    def list(self) -> Iterator[str]:
        try:
            pages = self._client.get_paginator("list_objects_v2").paginate(Bucket=self.settings.bucket,
                                                                           Prefix=self.settings.prefix)
            for page in pages:
                for item in page.get("Contents", []):
                    name = item["Key"][len(self.settings.prefix):]
                    if name and "/" not in name:
                        yield name
        except _FAILURES as exc:
            raise self._fail(exc, "listing") from None

    def read_order(self, names: Iterable[str]) -> builtins.list[str]:
        return list(names)

    def locate(self, name: str) -> str:
        return ""

    def check(self) -> None:
        try:
            self._client.head_bucket(Bucket=self.settings.bucket)
        except _FAILURES as exc:
            error = self._fail(exc, "a check of the bucket")
            if isinstance(error, BlobMissing):  # head_bucket's 404: the bucket itself is not there
                error = TierUnavailable(f"s3 tier {self.name}: bucket {self.settings.bucket} does not exist")
            raise error from None


class _KeepOpen:
    """boto3 closes the file it uploaded from when an upload fails; a retry needs it open."""

    def __init__(self, fp: BinaryIO):
        self._fp = fp

    def read(self, size: int = -1) -> bytes:
        return self._fp.read(size)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self._fp.seek(offset, whence)

    def tell(self) -> int:
        return self._fp.tell()

    def close(self) -> None:
        pass


class _S3Reader(io.RawIOBase):
    """A seekable view of one object: one streaming GET from the position on, reopened after a seek."""

    def __init__(self, backend: S3Backend, name: str, size: int):
        self._backend, self._name, self._size = backend, name, size
        self._pos, self._body = 0, None

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        target = {io.SEEK_SET: offset, io.SEEK_CUR: self._pos + offset, io.SEEK_END: self._size + offset}[whence]
        if target != self._pos and self._body is not None:
            self._body.close()
            self._body = None
        self._pos = max(0, target)
        return self._pos

    def readinto(self, buffer) -> int:
        if self._pos >= self._size:
            return 0
        body = self._body
        if body is None:
            body = self._body = self._backend._get(self._name, self._pos)
        try:
            data = body.read(len(buffer))
        except _NETWORK as exc:
            raise self._backend._fail(exc, f"read of {self._name}") from None
        buffer[:len(data)] = data
        self._pos += len(data)
        return len(data)

    def close(self) -> None:
        if self._body is not None:
            self._body.close()
            self._body = None
        super().close()
