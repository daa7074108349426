"""WADO-RS (PS3.18 10.4) and WADO-URI (PS3.18 9): what the archive holds, streamed, verified.

- Instances (`/studies/{study}[/series/{series}[/instances/{instance}]]`): multipart/related
  application/dicom, one Part 10 file per part, streamed from the sealed store as it is
  decrypted and verified (a copy that fails verification ends the response short: the
  client never has the whole of a wrong instance); the next instances are read ahead by
  two workers while one goes out. `transfer-syntax=*`: the stored bytes,
  byte-exact; another syntax (and none: explicit VR little endian, the PS3.18 default)
  through transcode.py when the instance can become it, else 406.
- Metadata (`.../metadata`): DICOM JSON computed from each stored instance (dicomjson.py).
- Frames (`.../instances/{instance}/frames/{list}`): application/octet-stream, decoded and
  little endian; with `transfer-syntax=*` (or the stored syntax's media type) the frames as
  stored. Bulk data (`.../bulkdata/{path}`): the value a metadata BulkDataURI names.
- Rendered (`.../instances/{instance}[/frames/{n}]/rendered`): JPEG (default) or PNG.
- WADO-URI (`/wado?requestType=WADO&studyUID=..&seriesUID=..&objectUID=..`): contentType
  application/dicom (transferSyntax, default explicit VR little endian) or image/jpeg.

A study that lives on cold tiers only is recalled first, the client waiting; when the
recall waits for a tape cartridge to be loaded the answer is 503 with Retry-After, the
cartridge named (the recall goes on: the retry finds the study once it is loaded). Every
request is audited (DICOM Instances Transferred, or Accessed for metadata, frames, bulk
data and rendered images) with the token's name as the user, and touches the study's
last access (policies migrate by it).
"""

from __future__ import annotations

import asyncio
import json
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Iterator

from pydicom.uid import ExplicitVRLittleEndian, UID
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from appliance.audit.events import EventID, event
from appliance.format import transcode
from appliance.errors import NotFound
from appliance.format import p10
from appliance.store.archive import Archive
from appliance.store.catalog import Instance
from appliance.web import dicomjson, media, pixels
from appliance.web.app import BASE, RETRY_AFTER_S, Caller, HttpError, WebFront, run
from appliance.web.multipart import closing, part_head

STORED = "*"
PREFETCH_AHEAD = 2  # instances read ahead while one goes out (two cores)
PREFETCH_MAX_BYTES = 32 << 20
# Media types of compressed frames (PS3.18 table 8.7.3-4), by transfer syntax.
FRAME_TYPES = {
    "1.2.840.10008.1.2.4.50": "image/jpeg", "1.2.840.10008.1.2.4.51": "image/jpeg",
    "1.2.840.10008.1.2.4.57": "image/jpeg", "1.2.840.10008.1.2.4.70": "image/jpeg",
    "1.2.840.10008.1.2.4.80": "image/jls", "1.2.840.10008.1.2.4.81": "image/jls",
    "1.2.840.10008.1.2.4.90": "image/jp2", "1.2.840.10008.1.2.4.91": "image/jp2",
    "1.2.840.10008.1.2.5": "image/dicom-rle",
}


# -- which instances ---------------------------------------------------------------------------

def selected(archive: Archive, study: str, series: str | None = None, instance: str | None = None
             ) -> list[Instance]:
    """The index records of the instances a URL names (404 when there are none)."""
    records = [record for record in archive.instances_of_study(study)
               if (series is None or record.series == series)
               and (instance is None or record.sop_uid == instance)]
    if not records:
        raise NotFound("no such series or instance")
    return records


def blob_sizes(archive: Archive, records: list[Instance]) -> list[int]:
    """The P10 sizes of the records' current versions, in one read (not a fresh one: the
    records came from one)."""
    with archive.catalog.read(fresh=False) as view:
        return [blob.size if (blob := view.blob(record.current)) else 0 for record in records]


def blob_size(archive: Archive, record: Instance) -> int:
    return blob_sizes(archive, [record])[0]


async def ready(front: WebFront, caller: Caller, uids: dict, event_id: EventID, op: str) -> list[Instance]:
    """The records `uids` name (study, series, instance), their study on the hot tier, the
    access audited."""
    records = await run(selected, front.archive, uids["study"], uids.get("series"), uids.get("instance"))
    await recalled(front, uids["study"])
    await run(_accessed, front, uids["study"], len(records), event_id, op, caller)
    return records


def _accessed(front: WebFront, study: str, count: int, event_id: EventID, op: str, caller: Caller) -> None:
    archive = front.archive
    front.audit(event(event_id, op=op, action="R", study=study, patient=archive.patient_id_of(study),
                      instances=count, **caller.who()))
    archive.touch_study(study)


async def recalled(front: WebFront, study: str) -> None:
    """Bring a study back from cold tiers, or 503 naming the cartridge the recall waits for."""
    if not await run(front.archive.needs_recall, study):
        return
    waiting_for: list[str] = []
    recall = asyncio.wrap_future(front.archive.recall_in_background(study, on_wait=waiting_for.append))
    while not (await asyncio.wait({recall}, timeout=1.0))[0]:
        if waiting_for:
            raise HttpError(503, f"the study is being recalled and waits for you to {waiting_for[0]}",
                            {"Retry-After": str(RETRY_AFTER_S)})
    recall.result()


# -- instances -----------------------------------------------------------------------------------

def instance_syntaxes(accept: str) -> list[str]:
    """The transfer syntaxes an Accept header takes for instances, best first (STORED: as stored)."""
    syntaxes = []
    for wanted in media.accepted(accept):
        inner = wanted.params.get("type", media.DICOM)
        if wanted.kind in ("*/*", "multipart/*") or (wanted.kind == media.MULTIPART and inner in (media.DICOM, "*/*")):
            syntaxes.append(wanted.params.get("transfer-syntax", ExplicitVRLittleEndian))
    if not syntaxes:
        raise HttpError(406, 'instances come as multipart/related; type="application/dicom"')
    return syntaxes


def syntax_for(record: Instance, syntaxes: list[str]) -> str:
    stored = record.transfer_syntax
    for syntax in syntaxes:
        if syntax in (STORED, stored):
            return stored
        if transcode.can_transcode(stored, syntax):
            return syntax
    raise HttpError(406, f"an instance stored as {UID(stored).name} cannot be sent in "
                         f"{', '.join(UID(s).name if s != STORED else s for s in syntaxes)}")


def part10(archive: Archive, record: Instance, syntax: str) -> Iterator[bytes]:
    """The instance as a Part 10 file in `syntax`: the stored bytes when it is the stored one."""
    stored = record.transfer_syntax
    chunks = archive.open_blob(record.current)
    if syntax == stored:
        first = next(chunks, b"")
        if framing := _framing(record, first):
            yield framing
        yield first
        yield from chunks
        return
    yield p10.file_meta(record.sop_class, record.sop_uid, syntax)
    yield from transcode.transcode(chunks, stored, syntax)


def _whole(archive: Archive, record: Instance, syntax: str) -> bytes:
    if syntax != record.transfer_syntax:
        return b"".join(part10(archive, record, syntax))
    stored = archive.read_blob(record.current)  # one pass: half the CPU of the stream
    return _framing(record, stored) + bytes(stored)


def _framing(record: Instance, head: bytes | memoryview) -> bytes:
    """What goes before the stored bytes to make them a Part 10 file: the file meta when they
    are a bare data set (imported so), else nothing."""
    if head[128:132] == b"DICM":
        return b""
    return p10.file_meta(record.sop_class, record.sop_uid, record.transfer_syntax)


def _multipart(archive: Archive, records: list[Instance], syntaxes: list[str], boundary: str) -> Iterator[bytes]:
    """The parts, the next PREFETCH_AHEAD instances of at most PREFETCH_MAX_BYTES read (decrypted,
    verified) by workers while the current one goes out; larger ones stream."""
    sizes = blob_sizes(archive, records)
    with ThreadPoolExecutor(max_workers=PREFETCH_AHEAD, thread_name_prefix="wado-prefetch") as workers:
        ahead: dict[int, Future] = {}
        for number, (record, syntax) in enumerate(zip(records, syntaxes)):
            for following in range(number, min(number + PREFETCH_AHEAD + 1, len(records))):
                if following not in ahead and sizes[following] <= PREFETCH_MAX_BYTES:
                    ahead[following] = workers.submit(_whole, archive, records[following], syntaxes[following])
            yield part_head(boundary, {"Content-Type": f"{media.DICOM}; transfer-syntax={syntax}"}, number == 0)
            prefetched = ahead.pop(number, None)
            if prefetched is not None:
                yield prefetched.result()
            else:
                yield from part10(archive, record, syntax)
        for future in ahead.values():
            future.cancel()
    yield closing(boundary)


def multipart_response(pieces: Iterator[bytes], boundary: str, inner: str, headers: dict | None = None) -> Response:
    return StreamingResponse(pieces, headers=headers,
                             media_type=f'{media.MULTIPART}; type="{inner}"; boundary={boundary}')


async def instances(front: WebFront, request: Request, caller: Caller) -> Response:
    syntaxes = instance_syntaxes(request.headers.get("accept", ""))
    records = await ready(front, caller, request.path_params, EventID.INSTANCES_TRANSFERRED, "wado-rs")
    chosen = [syntax_for(record, syntaxes) for record in records]
    boundary = uuid.uuid4().hex
    return multipart_response(_multipart(front.archive, records, chosen, boundary), boundary, media.DICOM)


# -- metadata ------------------------------------------------------------------------------------

def instance_url(base: str, record: Instance) -> str:
    return f"{base}/studies/{record.study}/series/{record.series}/instances/{record.sop_uid}"


def instance_metadata(archive: Archive, record: Instance, size: int, base: str) -> dict:
    with pixels.instance_file(archive, record, size) as fp:
        if UID(record.transfer_syntax).is_deflated:  # no offsets into a deflated data set: read whole
            ds, found = pixels.header(fp, whole=True), None
        else:
            ds = pixels.header(fp)
            found = pixels.pixel_data(fp, ds)
            if found is not None:
                ds.update(pixels.trailing(fp, found, record.transfer_syntax))
    return dicomjson.metadata(ds, instance_url(base, record), found.vr if found else None)


def study_metadata(front: WebFront, records: list[Instance], base: str) -> list[bytes]:
    """Every instance's metadata as DICOM JSON: from the cache, or computed by two workers
    (decrypting and parsing overlap) and kept."""
    archive, cache = front.archive, front.metadata

    def one(record: Instance, size: int) -> bytes:
        found = cache.get(record.current, base)
        if found is None:
            found = json.dumps(instance_metadata(archive, record, size, base), ensure_ascii=False,
                               separators=(",", ":")).encode("utf-8")
            cache.put(record.current, base, found)
        return found

    with ThreadPoolExecutor(max_workers=PREFETCH_AHEAD, thread_name_prefix="wado-metadata") as workers:
        return list(workers.map(one, records, blob_sizes(archive, records)))


async def metadata(front: WebFront, request: Request, caller: Caller) -> Response:
    records = await ready(front, caller, request.path_params, EventID.INSTANCES_ACCESSED, "wado-rs metadata")
    items = await run(study_metadata, front, records, media.base_url(request, BASE))
    return Response(b"[" + b",".join(items) + b"]", media_type=media.DICOM_JSON)


# -- frames, bulk data, rendered -----------------------------------------------------------------

def frame_numbers(text: str) -> list[int]:
    try:
        numbers = [int(n) for n in text.split(",") if n.strip()]
    except ValueError:
        raise HttpError(400, "frames are numbers separated by commas") from None
    if not numbers:
        raise HttpError(400, "no frame number")
    return numbers


def frame_form(accept: str, stored: str) -> tuple[bool, str]:
    """(whether the frames go as stored, their media type) for an Accept header."""
    compressed = FRAME_TYPES.get(stored)
    native = stored in transcode.UNCOMPRESSED  # its frames are uncompressed octets already
    for wanted in media.accepted(accept):
        if wanted.kind not in ("*/*", "multipart/*", media.MULTIPART):
            continue
        inner = wanted.params.get("type", media.OCTET_STREAM)
        syntax = wanted.params.get("transfer-syntax", "")
        if syntax in (STORED, stored) or (compressed is not None and inner == compressed):
            return True, compressed or media.OCTET_STREAM
        if inner in (media.OCTET_STREAM, "*/*") and syntax in ("", ExplicitVRLittleEndian):
            return native, media.OCTET_STREAM
    raise HttpError(406, 'frames come as multipart/related; type="application/octet-stream" (or as stored)')


def frames_of(archive: Archive, record: Instance, numbers: list[int], as_stored: bool) -> list[bytes]:
    with pixels.instance_file(archive, record, blob_size(archive, record)) as fp:
        ds = pixels.header(fp)
        found = pixels.check_frames(ds, pixels.pixel_data(fp, ds), numbers)
        stored = record.transfer_syntax
        if as_stored:
            return [pixels.stored_frame(fp, ds, found, stored, n) for n in numbers]
        return [pixels.uncompressed(pixels.decoded_frame(fp, stored, n)) for n in numbers]


async def frames(front: WebFront, request: Request, caller: Caller) -> Response:
    numbers = frame_numbers(request.path_params["frames"])
    [record] = await ready(front, caller, request.path_params, EventID.INSTANCES_ACCESSED, "wado-rs frames")
    stored = record.transfer_syntax
    as_stored, kind = frame_form(request.headers.get("accept", ""), stored)
    found = await run(frames_of, front.archive, record, numbers, as_stored)
    syntax = stored if as_stored else ExplicitVRLittleEndian
    return _parts(found, kind, syntax)


def _parts(values: list[bytes], kind: str, syntax: str | None) -> Response:
    boundary = uuid.uuid4().hex
    content_type = f"{kind}; transfer-syntax={syntax}" if syntax else kind
    body = b"".join(part_head(boundary, {"Content-Type": content_type}, number == 0) + value
                    for number, value in enumerate(values)) + closing(boundary)
    return Response(body, media_type=f'{media.MULTIPART}; type="{kind}"; boundary={boundary}')


def bulk_value(archive: Archive, record: Instance, path: str) -> list[bytes] | None:
    """The value a bulk data path names: the frames as stored for the pixel data."""
    with pixels.instance_file(archive, record, blob_size(archive, record)) as fp:
        ds = pixels.header(fp)
        if path.strip("/").upper() == dicomjson.PIXEL_DATA:
            found = pixels.pixel_data(fp, ds)
            if found is None:
                return None
            count = pixels.frame_count(ds)
            return [pixels.stored_frame(fp, ds, found, record.transfer_syntax, n) for n in range(1, count + 1)]
        element = dicomjson.element_at(ds, path)
        if element is None or not isinstance(element.value, (bytes, bytearray)):
            return None
        return [bytes(element.value)]


async def bulkdata(front: WebFront, request: Request, caller: Caller) -> Response:
    [record] = await ready(front, caller, request.path_params, EventID.INSTANCES_ACCESSED, "wado-rs bulkdata")
    values = await run(bulk_value, front.archive, record, request.path_params["path"])
    if values is None:
        raise HttpError(404, "no bulk data at that path")
    stored = record.transfer_syntax
    is_pixels = request.path_params["path"].strip("/").upper() == dicomjson.PIXEL_DATA
    kind = FRAME_TYPES.get(stored, media.OCTET_STREAM) if is_pixels else media.OCTET_STREAM
    return _parts(values, kind, stored if is_pixels else None)


def rendered_kind(accept: str) -> str:
    for wanted in media.accepted(accept):
        if wanted.kind in ("image/jpeg", "image/png"):
            return wanted.kind
        if wanted.kind in ("*/*", "image/*"):
            return "image/jpeg"
    raise HttpError(406, "rendered images come as image/jpeg or image/png")


def render(archive: Archive, record: Instance, number: int, kind: str, quality: int) -> bytes:
    with pixels.instance_file(archive, record, blob_size(archive, record)) as fp:
        ds = pixels.header(fp)
        pixels.check_frames(ds, pixels.pixel_data(fp, ds), [number])
        return pixels.rendered(pixels.decoded_frame(fp, record.transfer_syntax, number), ds, kind, quality)


async def rendered(front: WebFront, request: Request, caller: Caller) -> Response:
    kind = rendered_kind(request.headers.get("accept", ""))
    number = frame_numbers(request.path_params.get("frames", "1"))[0]
    quality = request.query_params.get("quality", "90")
    if not quality.isdigit() or not 1 <= int(quality) <= 100:
        raise HttpError(400, "quality is 1 to 100")
    [record] = await ready(front, caller, request.path_params, EventID.INSTANCES_ACCESSED, "wado-rs rendered")
    return Response(await run(render, front.archive, record, number, kind, int(quality)), media_type=kind)


# -- WADO-URI ------------------------------------------------------------------------------------

async def wado_uri(front: WebFront, request: Request, caller: Caller) -> Response:
    params = request.query_params
    if params.get("requestType") != "WADO":
        raise HttpError(400, "requestType=WADO is required")
    try:
        uids = {"study": params["studyUID"], "series": params["seriesUID"], "instance": params["objectUID"]}
    except KeyError as missing:
        raise HttpError(400, f"{missing.args[0]} is required") from None
    kind = params.get("contentType", "image/jpeg").split(",")[0].strip()
    if kind == media.DICOM:
        syntaxes = [params.get("transferSyntax", ExplicitVRLittleEndian)]
        [record] = await ready(front, caller, uids, EventID.INSTANCES_TRANSFERRED, "wado-uri")
        syntax = syntax_for(record, syntaxes)
        return StreamingResponse(part10(front.archive, record, syntax), media_type=media.DICOM)
    if kind in ("image/jpeg", "image/png"):
        number = params.get("frameNumber", "1")
        if not number.isdigit():
            raise HttpError(400, "frameNumber is a number")
        [record] = await ready(front, caller, uids, EventID.INSTANCES_ACCESSED, "wado-uri")
        quality = int(params.get("imageQuality", "90")) if params.get("imageQuality", "90").isdigit() else 90
        return Response(await run(render, front.archive, record, int(number), kind, min(max(quality, 1), 100)),
                        media_type=kind)
    raise HttpError(406, "contentType is application/dicom, image/jpeg or image/png")
