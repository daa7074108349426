"""Sealed blob format: round trips and tamper detection (hypothesis)."""

import hashlib
import io
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from appliance.errors import IntegrityError
from appliance.store import sealed

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
    return b"".join(sealed.unseal(io.BytesIO(blob), key_for=lambda _: key, content_address=data_address,
                                  chunk_size=chunk_size))


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
    assert blob[:8] == b"\x89PVB\r\n\x1a\n" and blob[8] == 1
    assert header.key_id == KEY_ID and header.plaintext_length == 1000 and header.segment_size == SEGMENT
    assert result.compression == sealed.COMPRESSION_ZSTD


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
