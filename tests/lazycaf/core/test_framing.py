"""Tests for lazycaf.core.framing: blobs as independent zstd frames of at most 128 KiB of data."""

from __future__ import annotations

import os
import random
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import pytest
import zstandard

from lazycaf.core import framing
from lazycaf.core.errors import IntegrityError
from lazycaf.core.framing import FRAME_DATA, IDENTITY, ZSTD, decode, encode

WINDOW_MAX = 128 << 10


class Frame(NamedTuple):
    start: int  # offset of the frame in the payload
    length: int  # compressed length
    content_size: int  # as declared in the frame header
    window_size: int  # as the decoder will need it
    data: bytes


def walk_frames(payload: bytes) -> list[Frame]:
    """Split a payload into its zstd frames, decoding each one on its own."""
    out = []
    pos = 0
    while pos < len(payload):
        rest = payload[pos:]
        params = zstandard.get_frame_parameters(rest)
        obj = zstandard.ZstdDecompressor().decompressobj()
        data = obj.decompress(rest)
        length = len(rest) - len(obj.unused_data)
        assert length > 0
        # A single-segment frame carries no window descriptor: its window is its content.
        window = params.window_size or params.content_size
        out.append(Frame(pos, length, params.content_size, window, data))
        pos += length
    return out


def compressible(size: int, seed: int = 0) -> bytes:
    """Text-like data that zstd shrinks to roughly a third (a tiled 256 KiB base)."""
    rng = random.Random(seed)
    words = [rng.randbytes(rng.randrange(3, 12)) for _ in range(64)]
    base = b"".join(rng.choices(words, k=min(size, 256 << 10) // 3 + 1))
    return (base * (size // len(base) + 1))[:size]


def big_window_payload(size: int = 8 << 20) -> tuple[bytes, bytes]:
    data = compressible(size, seed=5)
    params = zstandard.ZstdCompressionParameters.from_level(
        3, window_log=24, write_content_size=True
    )
    payload = zstandard.ZstdCompressor(compression_params=params).compress(data)
    return data, payload


# -- round trips -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("data", "encoding"),
    [
        (b"", IDENTITY),
        (b"a", IDENTITY),
        (b"tiny blob", IDENTITY),
        (os.urandom(1 << 20), IDENTITY),
        (os.urandom(3 * FRAME_DATA + 17), IDENTITY),
        (b"\0" * 4096, ZSTD),
        (compressible(FRAME_DATA), ZSTD),
        (compressible(FRAME_DATA + 1), ZSTD),
        (compressible((3 << 20) + 123), ZSTD),
    ],
    ids=[
        "empty",
        "one",
        "tiny",
        "random-1MiB",
        "random-3frames",
        "zeros",
        "frame",
        "frame+1",
        "compressible-3MiB",
    ],
)
def test_round_trip(data: bytes, encoding: str) -> None:
    got_encoding, payload = encode(data)
    assert got_encoding == encoding
    if encoding == IDENTITY:
        assert payload == data
    else:
        assert len(payload) < len(data)
    assert decode(got_encoding, payload) == data


def test_encode_accepts_memoryview_and_bytearray() -> None:
    data = compressible(300_000)
    want = encode(data)
    assert encode(memoryview(data)) == want
    assert encode(bytearray(data)) == want  # type: ignore[arg-type]
    assert decode(*encode(memoryview(b"raw"))) == b"raw"


def test_encode_is_deterministic_across_threads() -> None:
    data = compressible(2 * FRAME_DATA + 99, seed=3)
    want = encode(data)
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: encode(data), range(16)))
    assert all(r == want for r in results)
    with ThreadPoolExecutor(4) as pool:
        decoded = list(pool.map(lambda _: decode(*want), range(16)))
    assert all(r == data for r in decoded)


def test_half_random_data_still_compresses() -> None:
    data = os.urandom(FRAME_DATA) + b"\0" * FRAME_DATA
    encoding, payload = encode(data)
    assert encoding == ZSTD
    assert decode(encoding, payload) == data


# -- frame layout ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "size",
    [100, 4096, FRAME_DATA - 1, FRAME_DATA, FRAME_DATA + 1, 8 * FRAME_DATA, (5 << 20) + 3],
)
def test_frames_hold_at_most_128k_with_a_128k_window(size: int) -> None:
    data = b"\0" * size if size <= 4096 else compressible(size, seed=size)
    encoding, payload = encode(data)
    assert encoding == ZSTD
    frames = walk_frames(payload)
    assert len(frames) == -(-size // FRAME_DATA)
    for i, fr in enumerate(frames):
        # each frame is one aligned 128 KiB slice of the blob, self-describing
        assert fr.data == data[i * FRAME_DATA : (i + 1) * FRAME_DATA]
        assert fr.content_size == len(fr.data) <= FRAME_DATA
        assert 0 < fr.window_size <= WINDOW_MAX
    assert b"".join(fr.data for fr in frames) == data


def test_frames_decode_independently() -> None:
    data = compressible(4 * FRAME_DATA + 10, seed=9)
    _, payload = encode(data)
    frames = walk_frames(payload)
    # any frame alone, and any run of frames, decodes to its slice of the blob
    for fr in frames:
        alone = payload[fr.start : fr.start + fr.length]
        assert decode(ZSTD, alone) == fr.data
    mid = payload[frames[1].start : frames[3].start + frames[3].length]
    assert decode(ZSTD, mid) == data[FRAME_DATA : 4 * FRAME_DATA]


def test_frame_data_constant() -> None:
    assert FRAME_DATA == 128 << 10
    assert framing.__all__  # public surface is declared


# -- decode rejects bad payloads ---------------------------------------------------------------
def test_unknown_encoding_is_an_integrity_error_naming_the_blob() -> None:
    with pytest.raises(IntegrityError, match=r"blob 42.*'gzip'"):
        decode("gzip", b"payload", what="blob 42")


@pytest.mark.parametrize(
    "payload",
    [
        b"not zstd at all",
        b"\x28\xb5\x2f\xfd" + b"\xff" * 20,
        bytes(64),
    ],
    ids=["text", "bad-header", "zeros"],
)
def test_garbage_is_an_integrity_error(payload: bytes) -> None:
    with pytest.raises(IntegrityError, match="blob abc"):
        decode(ZSTD, payload, what="blob abc")


def test_bad_magic_and_trailing_garbage_are_integrity_errors() -> None:
    _, payload = encode(compressible(3 * FRAME_DATA))
    with pytest.raises(IntegrityError):
        decode(ZSTD, b"\0" + payload[1:])
    with pytest.raises(IntegrityError):
        decode(ZSTD, payload + b"junk")


def test_truncated_frame_is_an_integrity_error() -> None:
    """A payload cut inside a frame is corrupt: it must not decode to a shorter blob."""
    data = compressible(3 * FRAME_DATA + 500, seed=11)
    _, payload = encode(data)
    frames = walk_frames(payload)
    cuts = {len(payload) - 1, len(payload) - 7}
    for fr in frames:
        cuts |= {fr.start + 1, fr.start + fr.length // 2, fr.start + fr.length - 1}
    for cut in sorted(cuts):
        with pytest.raises(IntegrityError):
            decode(ZSTD, payload[:cut])


def test_random_corruption_never_escapes_as_another_error() -> None:
    """Without a checksum a flip may decode to other bytes (digests catch that); it must
    never raise anything but IntegrityError."""
    data = compressible(2 * FRAME_DATA + 100, seed=2)
    _, payload = encode(data)
    rng = random.Random(99)
    raised = 0
    for _ in range(300):
        mutated = bytearray(payload)
        for _ in range(rng.randrange(1, 4)):
            mutated[rng.randrange(len(mutated))] ^= rng.randrange(1, 256)
        try:
            decode(ZSTD, bytes(mutated))
        except IntegrityError:
            raised += 1
    assert raised > 0


def test_big_window_payload_is_rejected() -> None:
    data, payload = big_window_payload()
    params = zstandard.get_frame_parameters(payload)
    assert (params.window_size or params.content_size) > WINDOW_MAX
    # the payload is valid zstd: only its window is refused
    assert zstandard.ZstdDecompressor().decompress(payload) == data
    with pytest.raises(IntegrityError, match="blob big"):
        decode(ZSTD, payload, what="blob big")


def test_big_window_frame_among_good_frames_is_rejected() -> None:
    _, good = encode(compressible(2 * FRAME_DATA, seed=1))
    _, bad = big_window_payload(1 << 20)
    with pytest.raises(IntegrityError):
        decode(ZSTD, good + bad + good)
