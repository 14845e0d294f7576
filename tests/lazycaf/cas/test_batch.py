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


async def test_an_answer_cut_short_hands_over_what_arrived_then_fails() -> None:
    """A ``blobs:get`` answer whose connection drops halfway: the whole records before the
    cut are handed over (and stored by the caller), the rest fails as ``CasUnavailable``."""
    import socket
    import threading

    from lazycaf.cas.http import HttpCAS
    from lazycaf.core.errors import CasUnavailable

    records = [
        (Digest.of(bytes([i]) * 5000), framing.IDENTITY, bytes([i]) * 5000) for i in range(6)
    ]
    body = pack_batch(records)
    cut = len(body) // 2
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            data = b""
            while b"\r\n\r\n" not in data:
                data += conn.recv(65536)
            head, _, rest = data.partition(b"\r\n\r\n")
            length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
            while len(rest) < length:
                rest += conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % len(body))
            conn.sendall(body[:cut])  # then the connection drops

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    client = HttpCAS(f"http://127.0.0.1:{listener.getsockname()[1]}")
    got: list[Digest] = []

    async def arrived(batch: list[tuple[Digest, str, bytes]]) -> None:
        got.extend(d for d, _, _ in batch)

    try:
        with pytest.raises(CasUnavailable):
            await client.stream_many_encoded([d for d, _, _ in records], arrived)
    finally:
        await client.aclose()
        listener.close()
        thread.join(5)
    whole = sum(1 for _ in unpack_batch_prefix(body[:cut]))
    assert got == [d for d, _, _ in records[:whole]] and 0 < whole < len(records)


def unpack_batch_prefix(data: bytes) -> list[tuple[Digest, str, bytes]]:
    reader = BatchReader(max_record=1 << 20)
    return reader.feed(data)
