"""Sealed blob format: round trips and tamper detection (hypothesis)."""

import hashlib
import io
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from appliance.errors import IntegrityError
from appliance.format import sealed

KEY, KEY_ID = os.urandom(32), os.urandom(16)
SEGMENT = 64  # small segments so a few hundred bytes span several


def _seal(data: bytes, *, level: int = 3, segment: int = SEGMENT, try_compression: bool = True,
          shuffled: bool = False, key: bytes = KEY, key_id: bytes = KEY_ID) -> tuple[bytes, sealed.SealResult]:
    out = io.BytesIO()
    result = sealed.seal(io.BytesIO(data), len(data), out, data_key=key, key_id=key_id,
                         content_address=hashlib.sha256(data).digest(), level=level,
                         try_compression=try_compression, shuffled=shuffled, segment_size=segment)
    return out.getvalue(), result


def _unseal(blob: bytes, data_address: bytes, key: bytes = KEY, chunk_size: int = 50) -> bytes:
    """The blob read by both readers, the stream and the whole-blob one (a retrieve's): they
    must agree, byte for byte or in refusing it."""
    try:
        whole = bytes(sealed.unseal_whole(blob, key_for=lambda _: key, content_address=data_address))
    except IntegrityError as exc:
        whole = exc
    try:
        streamed = b"".join(sealed.unseal(io.BytesIO(blob), key_for=lambda _: key, content_address=data_address,
                                          chunk_size=chunk_size))
    except IntegrityError:
        assert isinstance(whole, IntegrityError), "the whole-blob reader took what the stream refused"
        raise
    assert whole == streamed
    return streamed


payloads = st.one_of(st.binary(max_size=700), st.binary(max_size=20).map(lambda b: b * 37))


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(data=payloads, segment=st.sampled_from([16, 17, 64, 1000]), level=st.sampled_from([0, 1, 3]),
       shuffled=st.booleans())
def test_round_trip_any_size_and_segmentation(data, segment, level, shuffled):
    blob, result = _seal(data, level=level, segment=segment, shuffled=shuffled)
    assert _unseal(blob, hashlib.sha256(data).digest()) == data
    assert result.sealed_size == len(blob)
    assert sealed.sealed_digest(io.BytesIO(blob)) == (len(blob), result.sealed_xxh3)


def _pixels(count: int, seed: int) -> bytes:
    """16-bit little-endian samples, 12 bits used, noisy around a slow ramp: like CT."""
    import random

    rng = random.Random(seed)
    return b"".join((min(4095, max(0, n % 3000 + rng.randint(-60, 60)))).to_bytes(2, "little")
                    for n in range(count))


@settings(max_examples=12, deadline=None)
@given(blocks=st.integers(0, 2), extra=st.integers(-3, 3), segment=st.sampled_from([1000, 1 << 20, 3 << 20]),
       odd_start=st.booleans())
def test_shuffled_compression_round_trips_across_shuffle_blocks(blocks, extra, segment, odd_start):
    """Block edges, odd lengths, an odd offset of the pixels: every byte comes back."""
    header = b"DICM-ish header" + (b"x" if odd_start else b"")
    data = header + _pixels(max(0, (blocks * sealed.SHUFFLE_BLOCK + extra) // 2), blocks * 7 + extra)
    data = data[:max(0, blocks * sealed.SHUFFLE_BLOCK + extra)] if blocks else data
    blob, result = _seal(data, segment=segment, shuffled=True)
    assert _unseal(blob, hashlib.sha256(data).digest(), chunk_size=4096) == data
    if len(data) > 1000:
        assert result.compression == sealed.COMPRESSION_ZSTD_SHUFFLED


def test_shuffling_16_bit_pixels_compresses_better_than_plain_zstd():
    data = _pixels(300_000, 1)
    plain, _ = _seal(data, segment=1 << 20)
    shuffled, result = _seal(data, segment=1 << 20, shuffled=True)
    assert result.compression == sealed.COMPRESSION_ZSTD_SHUFFLED and len(shuffled) < len(plain)
    assert sealed.shuffle(b"abcdefg") == b"acegbdf" and sealed.unshuffle(b"acegbdf") == b"abcdefg"


def test_round_trip_exact_segment_multiples():
    for n in (0, 1, SEGMENT - 32, SEGMENT, 2 * SEGMENT, 2 * SEGMENT + 1, 10 * SEGMENT):
        data = os.urandom(n)
        blob, _ = _seal(data, level=0)
        assert _unseal(blob, hashlib.sha256(data).digest()) == data


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(data=payloads, position=st.floats(min_value=0, max_value=1, exclude_max=True),
       bit=st.integers(min_value=0, max_value=7))
def test_any_flipped_bit_is_detected(data, position, bit):
    blob, _ = _seal(data, shuffled=bit % 2 == 0)
    tampered = bytearray(blob)
    tampered[int(position * len(blob))] ^= 1 << bit
    with pytest.raises(IntegrityError):
        _unseal(bytes(tampered), hashlib.sha256(data).digest())


@settings(max_examples=100)
@given(data=st.binary(min_size=1, max_size=500), cut=st.floats(min_value=0, max_value=1, exclude_max=True))
def test_truncation_is_detected(data, cut):
    blob, _ = _seal(data, level=0)
    with pytest.raises(IntegrityError):
        _unseal(blob[:int(cut * len(blob))], hashlib.sha256(data).digest())


@pytest.mark.parametrize("extra", [b"\x00", b"\x00" * (SEGMENT + sealed.TAG_SIZE), os.urandom(5)])
def test_appended_bytes_are_detected(extra):
    data = os.urandom(300)
    blob, _ = _seal(data)
    with pytest.raises(IntegrityError):
        _unseal(blob + extra, hashlib.sha256(data).digest())


def test_dropped_or_reordered_segment_is_detected():
    data = os.urandom(64 * 5)
    blob, _ = _seal(data, level=0)
    header, body = blob[:sealed.HEADER_SIZE], blob[sealed.HEADER_SIZE:]
    size = SEGMENT + sealed.TAG_SIZE
    segments = [body[i:i + size] for i in range(0, len(body), size)]
    reordered = header + b"".join([segments[1], segments[0]] + segments[2:])
    dropped = header + b"".join(segments[:2] + segments[3:])
    for bad in (reordered, dropped):
        with pytest.raises(IntegrityError):
            _unseal(bad, hashlib.sha256(data).digest())


def test_wrong_key_and_swapped_blob_are_detected():
    a, b = os.urandom(200), os.urandom(200)
    blob_a, _ = _seal(a)
    blob_b, _ = _seal(b)
    with pytest.raises(IntegrityError):
        _unseal(blob_a, hashlib.sha256(a).digest(), key=os.urandom(32))
    with pytest.raises(IntegrityError, match="another instance"):
        _unseal(blob_b, hashlib.sha256(a).digest())


def test_no_byte_is_released_before_a_single_chunk_blob_verifies():
    data = os.urandom(100)
    blob, _ = _seal(data, segment=1000)
    tampered = bytearray(blob)
    tampered[-1] ^= 1
    released = []
    with pytest.raises(IntegrityError):
        for chunk in sealed.unseal(io.BytesIO(bytes(tampered)), key_for=lambda _: KEY,
                                   content_address=hashlib.sha256(data).digest(), chunk_size=1 << 20):
            released.append(chunk)
    assert released == []


def test_header_layout_is_documented_size_and_magic():
    blob, result = _seal(b"x" * 1000)
    header = sealed.Header.unpack(blob[:sealed.HEADER_SIZE])
    assert blob[:8] == b"\x89PVB\r\n\x1a\n" and blob[8] == 2
    assert header.key_id == KEY_ID and header.plaintext_length == 0 and header.segment_size == SEGMENT
    assert result.compression == sealed.COMPRESSION_ZSTD
    assert (result.content_address, result.plaintext_length) == (hashlib.sha256(b"x" * 1000).digest(), 1000)
    # the footer: the last 56 bytes, content address and length, under the last-segment nonce
    footer = sealed._footer_first(io.BytesIO(blob[sealed.HEADER_SIZE:]), sealed._subkey(KEY, header), header,
                                  blob[:sealed.HEADER_SIZE])
    assert footer == (hashlib.sha256(b"x" * 1000).digest(), 1000)


def test_compression_skipped_when_it_does_not_pay():
    random = os.urandom(5000)
    _, result = _seal(random, segment=1024)
    assert result.compression == sealed.COMPRESSION_NONE
    _, result = _seal(b"a" * 5000, segment=1024, try_compression=False)
    assert result.compression == sealed.COMPRESSION_NONE


def test_content_address_is_not_visible_in_the_sealed_bytes():
    data = b"PATIENT^CANARY" * 100
    blob, _ = _seal(data, level=0)
    assert hashlib.sha256(data).digest() not in blob
    assert b"PATIENT^CANARY" not in blob


def test_input_shorter_than_announced_is_refused():
    from appliance.errors import InvalidInstance
    with pytest.raises(InvalidInstance):
        sealed.seal(io.BytesIO(b"abc"), 10, io.BytesIO(), data_key=KEY, key_id=KEY_ID,
                    content_address=hashlib.sha256(b"abc").digest())


class _Unseekable(io.RawIOBase):
    """A stream read in order only (a pipe, an object store's body)."""

    def __init__(self, data: bytes):
        self._source = io.BytesIO(data)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        chunk = self._source.read(min(len(buffer), 37))  # short reads too
        buffer[:len(chunk)] = chunk
        return len(chunk)


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(data=payloads, cuts=st.lists(st.integers(0, 700), max_size=6), start_at=st.integers(0, 700),
       segment=st.sampled_from([16, 17, 64, 1000]), level=st.sampled_from([0, 3]), shuffled=st.booleans())
def test_sealing_as_bytes_arrive_any_chunking_any_start(data, cuts, start_at, segment, level, shuffled):
    """Written in any pieces, started (key known) at any moment: the same bytes come back,
    read from a seekable file or in order from a stream."""
    out = io.BytesIO()
    sealer = sealed.Sealer(out, level=level, segment_size=segment)
    bounds = sorted({0, len(data), *(c for c in cuts if c < len(data))})
    for low, high in zip(bounds, bounds[1:]):
        if not sealer.started and low >= start_at:
            sealer.start(data_key=KEY, key_id=KEY_ID, shuffled=shuffled)
        sealer.write(data[low:high])
    if not sealer.started:
        sealer.start(data_key=KEY, key_id=KEY_ID, shuffled=shuffled)
    result = sealer.finish()
    blob = out.getvalue()
    address = hashlib.sha256(data).digest()
    assert result.content_address == address and result.plaintext_length == len(data)
    assert result.sealed_size == len(blob)
    assert _unseal(blob, address) == data
    assert b"".join(sealed.unseal(io.BufferedReader(_Unseekable(blob)), key_for=lambda _: KEY,
                                  content_address=address)) == data


def test_a_swapped_blob_read_in_order_is_caught_before_its_last_chunk():
    a, b = os.urandom(5000), os.urandom(5000)
    blob_b, _ = _seal(b, level=0, segment=1000)
    released = []
    with pytest.raises(IntegrityError, match="another instance"):
        for chunk in sealed.unseal(io.BufferedReader(_Unseekable(blob_b)), key_for=lambda _: KEY,
                                   content_address=hashlib.sha256(a).digest(), chunk_size=1000):
            released.append(chunk)
    assert b"".join(released) == b[:4000]  # never the whole of another instance


def test_a_swapped_blob_in_a_file_releases_nothing():
    a, b = os.urandom(5000), os.urandom(5000)
    blob_b, _ = _seal(b, level=0, segment=1000)
    with pytest.raises(IntegrityError, match="another instance"):
        next(sealed.unseal(io.BytesIO(blob_b), key_for=lambda _: KEY, content_address=hashlib.sha256(a).digest(),
                           chunk_size=1000))


@pytest.mark.parametrize("name", ["shuffled", "plain"])
def test_format_version_1_blobs_still_read(name):
    """Blobs sealed before format version 2 (kept in tests/data, sealed by the version 1 writer)."""
    data_dir = Path(__file__).resolve().parents[1] / "data"
    plaintext = (data_dir / "sealed-v1-plaintext.bin").read_bytes()
    blob = (data_dir / f"sealed-v1-{name}.bin").read_bytes()
    assert blob[8] == 1
    key = bytes(range(32))
    assert _unseal(blob, hashlib.sha256(plaintext).digest(), key=key) == plaintext
    tampered = bytearray(blob)
    tampered[len(blob) // 2] ^= 4
    with pytest.raises(IntegrityError):
        _unseal(bytes(tampered), hashlib.sha256(plaintext).digest(), key=key)
