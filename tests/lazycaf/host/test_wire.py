"""Tests for lazycaf.host.wire: reply encoding and parsing, and line framing over a trio stream."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from lazycaf.core.digest import Digest
from lazycaf.core.errors import (
    AccessDenied,
    BlobNotFound,
    CasUnavailable,
    DigestMismatch,
    IntegrityError,
    LazyCafError,
    ManifestError,
    NotFound,
    PackError,
    PathNotFound,
    RefNotFound,
    Unavailable,
    UsageError,
)
from lazycaf.host import wire
from lazycaf.host.wire import LineReader, error_reply, ok_reply, parse_reply


# -- replies ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "value",
    [None, 0, 12345, "text with spaces", "ü\nnewline", [1, "a", None], {"size": 3, "x": [1]}],
)
def test_ok_reply_round_trips_as_one_line(value: object) -> None:
    line = ok_reply(value)
    assert line.startswith(b"ok ")
    assert line.endswith(b"\n")
    assert line.count(b"\n") == 1
    assert parse_reply(line) == value


@pytest.mark.parametrize(
    ("exc", "family"),
    [
        (NotFound("gone"), NotFound),
        (RefNotFound("trainer:v1"), NotFound),
        (BlobNotFound(Digest.of(b"x")), NotFound),
        (PathNotFound("a/b"), NotFound),
        (IntegrityError("bad bytes"), IntegrityError),
        (DigestMismatch(Digest.of(b"a"), Digest.of(b"b")), IntegrityError),
        (ManifestError("corrupt"), IntegrityError),
        (Unavailable("disk"), Unavailable),
        (CasUnavailable("http://cas", "timeout"), Unavailable),
        (UsageError("bad option"), UsageError),
        (AccessDenied("no token"), LazyCafError),
        (PackError("cannot pack"), LazyCafError),
        (LazyCafError("other"), LazyCafError),
    ],
)
def test_error_reply_maps_back_to_the_same_family(
    exc: LazyCafError, family: type[LazyCafError]
) -> None:
    line = error_reply(exc)
    assert line.startswith(b"err ")
    assert line.count(b"\n") == 1
    with pytest.raises(LazyCafError) as info:
        parse_reply(line)
    assert type(info.value) is family
    assert str(info.value) == str(exc)


def test_multi_line_error_message_becomes_one_line() -> None:
    exc = Unavailable("first line\nsecond  line\r\n\tthird\u2028fourth\n")
    line = error_reply(exc)
    assert line.count(b"\n") == 1
    with pytest.raises(Unavailable, match=r"^first line second line third fourth$"):
        parse_reply(line)


def test_empty_error_message() -> None:
    with pytest.raises(NotFound, match=r"^$"):
        parse_reply(error_reply(NotFound("")))


@pytest.mark.parametrize("line", [b"err mystery something broke\n", b"err\n"])
def test_unknown_error_kind_is_a_plain_lazycaf_error(line: bytes) -> None:
    with pytest.raises(LazyCafError) as info:
        parse_reply(line)
    assert type(info.value) is LazyCafError


@pytest.mark.parametrize(
    "line", [b"", b"\n", b"hello world\n", b"OK 1\n", b"okay 1\n", b"\xff\xfe\n", b" ok 1\n"]
)
def test_malformed_reply_is_unavailable(line: bytes) -> None:
    with pytest.raises(Unavailable, match="malformed"):
        parse_reply(line)


@pytest.mark.parametrize("line", [b"ok {broken\n", b"ok\n"])
def test_ok_reply_without_valid_json_is_unavailable(line: bytes) -> None:
    # A garbled ``ok`` reply is as malformed as an unknown status: the client must see
    # Unavailable, not a bare json.JSONDecodeError escaping the error tree.
    with pytest.raises(Unavailable):
        parse_reply(line)


# -- line framing ----------------------------------------------------------------------------
class ChunkLog(trio.abc.ReceiveStream):
    """Passes a stream through, remembering each non-empty chunk it returned."""

    def __init__(self, inner: trio.abc.ReceiveStream) -> None:
        self.inner = inner
        self.chunks: list[bytes] = []

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        data = bytes(await self.inner.receive_some(max_bytes))
        if data:
            self.chunks.append(data)
        return data

    async def aclose(self) -> None:
        await self.inner.aclose()


async def read_in_pieces(pieces: list[bytes]) -> tuple[list[bytes | None], list[bytes]]:
    """Send ``pieces`` one received chunk at a time, then EOF; read lines until None."""
    left, right = trio.testing.memory_stream_pair()
    log = ChunkLog(right)
    reader = LineReader(log)
    lines: list[bytes | None] = []

    async def read_all() -> None:
        while True:
            line = await reader.readline()
            lines.append(line)
            if line is None:
                return

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read_all)
        for piece in pieces:
            await left.send_all(piece)
            await trio.testing.wait_all_tasks_blocked()
        await left.send_eof()
    return lines, log.chunks


async def test_lines_split_across_chunk_boundaries() -> None:
    pieces = [b"he", b"llo\nwor", b"ld", b"\n\n", b"ok {}\nlast", b"\n"]
    lines, chunks = await read_in_pieces(pieces)
    assert chunks == pieces  # the boundaries really fell where the pieces end
    assert lines == [b"hello\n", b"world\n", b"\n", b"ok {}\n", b"last\n", None]


async def test_several_lines_in_one_chunk() -> None:
    lines, chunks = await read_in_pieces([b"a\nbb\nccc\n"])
    assert len(chunks) == 1
    assert lines == [b"a\n", b"bb\n", b"ccc\n", None]


async def test_eof_returns_none_and_keeps_returning_none() -> None:
    left, right = trio.testing.memory_stream_pair()
    reader = LineReader(right)
    await left.send_eof()
    assert await reader.readline() is None
    assert await reader.readline() is None


async def test_partial_line_at_eof_is_not_returned_as_a_line() -> None:
    lines, _ = await read_in_pieces([b"whole\n", b"trunc"])
    assert lines == [b"whole\n", None]


async def test_a_line_at_the_limit_is_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(wire, "MAX_LINE", 16)
    lines, _ = await read_in_pieces([b"x" * 10, b"y" * 5 + b"\n"])
    assert lines == [b"x" * 10 + b"y" * 5 + b"\n", None]


async def test_a_long_line_arriving_in_pieces_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(wire, "MAX_LINE", 16)
    with pytest.raises(ExceptionGroup) as info:
        await read_in_pieces([b"x" * 10] * 4 + [b"\n"])
    assert info.group_contains(UsageError, match="longer than 16")


async def test_a_long_line_arriving_in_one_chunk_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The limit is only checked while no newline is buffered, so a long line whose newline
    # arrives in the same chunk slips through.
    monkeypatch.setattr(wire, "MAX_LINE", 16)
    left, right = trio.testing.memory_stream_pair()
    reader = LineReader(right)
    await left.send_all(b"x" * 40 + b"\n")
    with pytest.raises(UsageError, match="longer than 16"):
        await reader.readline()
