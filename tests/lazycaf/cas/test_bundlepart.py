"""A bundle part's bytes: records compressed together in bounded frames, read whole or in
pieces of any size; crafted frames refused; the older form (a plain batch) still read."""

from __future__ import annotations

import os
import random
import struct

import pytest
import zstandard

from lazycaf.cas import bundlepart
from lazycaf.cas.batch import Record, pack_batch
from lazycaf.cas.bundlepart import MAGIC, PartReader, pack_part, unpack_part
from lazycaf.core import framing
from lazycaf.core.digest import Digest
from lazycaf.core.errors import UsageError


def _stored(n: int, seed: int = 1) -> list[tuple[Record, bytes]]:
    """Blobs as a store keeps them (zstd frames or raw), with their bytes: small modules made
    of lines they share with one another, and a few random ones."""
    rng = random.Random(seed)
    vocabulary = [
        b"    %s = %s(%d)\n" % (rng.randbytes(6).hex().encode(), rng.randbytes(5).hex().encode(), i)
        for i in range(300)
    ]
    out = []
    for i in range(n):
        if i % 5:
            data = b"".join(rng.choices(vocabulary, k=60 + i % 50))
        else:
            data = rng.randbytes(500 + 7 * i)
        enc, payload = framing.encode(data)
        out.append(((Digest.of(data), enc, payload), data))
    return out


def _frame(data: bytes, *, content_size: bool = True) -> bytes:
    frame = zstandard.ZstdCompressor(write_content_size=content_size).compress(data)
    return struct.pack("<I", len(frame)) + frame


def test_a_part_holds_each_blob_decoded_in_order_and_smaller_than_as_stored() -> None:
    stored = _stored(300)
    body, held = pack_part([r for r, _ in stored])
    assert body.startswith(MAGIC)
    assert held == [r[0] for r, _ in stored]
    records = unpack_part(body)
    assert [(d, enc, payload) for d, enc, payload in records] == [
        (r[0], framing.IDENTITY, data) for r, data in stored
    ]
    as_stored = len(pack_batch(r for r, _ in stored))
    assert len(body) < 0.8 * as_stored  # the small modules compress together


@pytest.mark.parametrize("first", [False, True])
def test_a_part_read_in_pieces_of_any_size_gives_the_same_records(first: bool) -> None:
    stored = _stored(400, seed=2)
    body, _ = pack_part([r for r, _ in stored], first=first)
    rng = random.Random(3)
    for _ in range(5):
        reader, got, at = PartReader(), [], 0
        while at < len(body):
            step = rng.choice([1, 7, 4096, 100_000])
            reader.feed(body[at : at + step])
            at += step
            if reader.ready:
                got += reader.records()
        reader.finish()
        assert [r[0] for r in got] == [r[0] for r, _ in stored]
        assert [r[2] for r in got] == [data for _, data in stored]


def test_the_first_part_starts_with_small_frames(monkeypatch: pytest.MonkeyPatch) -> None:
    data = os.urandom(1 << 20)
    record = (Digest.of(data), framing.IDENTITY, data)
    first, _ = pack_part([record], first=True)
    other, _ = pack_part([record])
    (length,) = struct.unpack_from("<I", first, len(MAGIC))
    assert length < 200_000 < len(first)  # the first blob's bytes start to land early
    (length,) = struct.unpack_from("<I", other, len(MAGIC))
    assert length > 1 << 20
    reader = PartReader()
    reader.feed(first[: len(MAGIC) + 4 + 140_000])
    assert reader.ready and reader.records() == []  # a frame decoded, its record not whole yet


def test_a_damaged_stored_blob_is_left_out() -> None:
    (good, _), (bad, _) = _stored(3)[1:3]
    damaged = (bad[0], framing.ZSTD, b"\x28\xb5\x2f\xfd" + b"\0" * 40)
    body, held = pack_part([damaged, good])
    assert held == [good[0]] and [r[0] for r in unpack_part(body)] == [good[0]]


def test_the_older_form_a_plain_batch_of_stored_records_is_still_read() -> None:
    stored = [r for r, _ in _stored(30)]
    body = pack_batch(stored)
    assert unpack_part(body) == stored
    reader = PartReader()
    for i in range(0, len(body), 333):
        reader.feed(body[i : i + 333])
    assert not reader.compressed and reader.records() == stored
    reader.finish()


def _record(data: bytes) -> bytes:
    return pack_batch([(Digest.of(data), framing.IDENTITY, data)])


@pytest.mark.parametrize(
    "body, error",
    [
        (MAGIC + struct.pack("<I", 1 << 30), "too long"),
        (MAGIC + _frame(b"x" * (bundlepart.FRAME_DATA + 1)), "decodes to"),
        (MAGIC + _frame(_record(b"no size"), content_size=False), "decodes to"),
        (MAGIC + struct.pack("<I", 9) + b"\x28\xb5\x2f\xfd" + b"\xff" * 5, "frame at byte 8"),
        (MAGIC + _frame(_record(b"a")) + _frame(b"\0" * 10)[:-2], "truncated in the frame"),
        (MAGIC + _frame(_record(b"tail") + b"\0" * 10), "truncated in the record"),
        (MAGIC[:5], "truncated"),
    ],
)
def test_crafted_parts_are_refused(body: bytes, error: str) -> None:
    with pytest.raises(UsageError, match=error):
        unpack_part(body)


def test_a_frame_with_data_after_its_zstd_frame_is_refused() -> None:
    frame = zstandard.ZstdCompressor().compress(_record(b"x"))
    extra = frame + b"junk"
    with pytest.raises(UsageError, match="unused data"):
        unpack_part(MAGIC + struct.pack("<I", len(extra)) + extra)


def test_a_part_cannot_decode_past_its_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    """A few hundred bytes of frames can announce gigabytes (zeros compress ~1:20,000): the
    reader stops at ``MAX_PART_DECODED`` decoded bytes, and a record can announce at most
    ``MAX_RECORD`` bytes, whatever the frames hold."""
    monkeypatch.setattr(bundlepart, "MAX_PART_DECODED", 3 * bundlepart.FRAME_DATA)
    zeros = _frame(b"\0" * bundlepart.FRAME_DATA)
    head = struct.pack("<32sBI", b"\1" * 32, 0, bundlepart.FRAME_DATA * 2)
    with pytest.raises(UsageError, match="decodes to more than"):
        unpack_part(MAGIC + _frame(head) + zeros * 4)
    huge = struct.pack("<32sBI", b"\1" * 32, 0, bundlepart.MAX_RECORD + 1)
    with pytest.raises(UsageError, match="malformed"):
        unpack_part(MAGIC + _frame(huge))
