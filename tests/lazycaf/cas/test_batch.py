"""Batch bodies: ``BatchReader`` parses a body fed in any pieces exactly as ``unpack_batch``
parses it whole, and refuses what is malformed."""

from __future__ import annotations

import pytest

from lazycaf.cas.batch import BatchReader, pack_batch, unpack_batch
from lazycaf.core import framing
from lazycaf.core.digest import Digest
from lazycaf.core.errors import UsageError

RECORDS = [
    (Digest.of(bytes([i]) * n), framing.IDENTITY if i % 2 else framing.ZSTD, bytes([i]) * n)
    for i, n in enumerate([0, 1, 40, 1000, 3])
]
BODY = pack_batch(RECORDS)


@pytest.mark.parametrize("piece", [1, 2, 7, 37, 41, len(BODY)])
def test_a_body_fed_in_pieces_gives_every_record_once_in_order(piece: int) -> None:
    reader = BatchReader(max_record=1 << 20)
    got = []
    for at in range(0, len(BODY), piece):
        got += reader.feed(BODY[at : at + piece])
    reader.finish()
    assert got == RECORDS == unpack_batch(BODY)


def test_a_body_cut_inside_a_record_is_refused_at_the_end() -> None:
    reader = BatchReader(max_record=1 << 20)
    assert reader.feed(BODY[:-1]) == RECORDS[:-1]
    with pytest.raises(UsageError, match="truncated"):
        reader.finish()


def test_a_record_announcing_more_than_the_limit_is_refused_before_it_is_buffered() -> None:
    reader = BatchReader(max_record=999)
    with pytest.raises(UsageError, match="malformed"):
        reader.feed(BODY)  # the 1,000-byte record
