"""Tests for lazycaf.core.chunking: chunk counts, spans and the chunks a read touches."""

from __future__ import annotations

import pytest

from lazycaf.core.chunking import (
    DEFAULT_CHUNK_SIZE,
    chunk_count,
    chunk_spans,
    chunks_touched,
    validate_chunk_size,
)

CS = DEFAULT_CHUNK_SIZE


# -- validate_chunk_size ---------------------------------------------------------------------
@pytest.mark.parametrize("size", [64 << 10, (64 << 10) + 4096, 1 << 20, 4 << 20, 64 << 20])
def test_validate_chunk_size_accepts_4k_multiples_in_range(size: int) -> None:
    assert validate_chunk_size(size) == size


@pytest.mark.parametrize(
    "size",
    [
        0,
        -(1 << 20),
        4096,
        (64 << 10) - 4096,
        (64 << 10) + 1,
        (1 << 20) + 512,
        (64 << 20) + 4096,
        128 << 20,
    ],
)
def test_validate_chunk_size_rejects(size: int) -> None:
    with pytest.raises(ValueError, match="multiple of 4 KiB"):
        validate_chunk_size(size)


def test_default_chunk_size_is_valid() -> None:
    assert validate_chunk_size(DEFAULT_CHUNK_SIZE) == 1 << 20


# -- chunk_count / chunk_spans ---------------------------------------------------------------
@pytest.mark.parametrize(
    ("size", "count", "spans"),
    [
        (0, 0, [(0, 0)]),
        (1, 0, [(0, 1)]),
        (CS - 1, 0, [(0, CS - 1)]),
        (CS, 0, [(0, CS)]),
        (CS + 1, 2, [(0, CS), (CS, 1)]),
        (2 * CS, 2, [(0, CS), (CS, CS)]),
        (2 * CS + 1, 3, [(0, CS), (CS, CS), (2 * CS, 1)]),
        (3 * CS - 1, 3, [(0, CS), (CS, CS), (2 * CS, CS - 1)]),
    ],
)
def test_count_and_spans_edges(size: int, count: int, spans: list[tuple[int, int]]) -> None:
    assert chunk_count(size, CS) == count
    assert chunk_spans(size, CS) == spans


@pytest.mark.parametrize("chunk_size", [1, 3, 4, 7])
def test_spans_tile_the_file(chunk_size: int) -> None:
    for size in range(0, 40):
        spans = chunk_spans(size, chunk_size)
        count = chunk_count(size, chunk_size)
        assert len(spans) == max(1, count)
        assert count == (0 if size <= chunk_size else -(-size // chunk_size))
        pos = 0
        for off, length in spans:
            assert off == pos
            assert 0 < length <= chunk_size or size == 0
            pos += length
        assert pos == size
        # Every chunk but the last is full: boundaries stay block-aligned.
        assert all(length == chunk_size for _, length in spans[:-1])


def test_large_file_chunk_count() -> None:
    size = 10 * (1 << 30) + 5
    assert chunk_count(size, CS) == 10 * 1024 + 1
    spans = chunk_spans(size, CS)
    assert spans[-1] == (10 * (1 << 30), 5)


# -- chunks_touched --------------------------------------------------------------------------
def _naive_touched(offset: int, length: int, size: int, chunk_size: int) -> list[int]:
    end = min(offset + length, size)
    return [
        i
        for i, (off, ln) in enumerate(chunk_spans(size, chunk_size))
        if offset < end and off < end and offset < off + ln
    ]


@pytest.mark.parametrize("chunk_size", [1, 4, 5])
def test_chunks_touched_matches_brute_force(chunk_size: int) -> None:
    for size in range(0, 18):
        for offset in range(0, 22):
            for length in range(0, 22):
                got = chunks_touched(offset, length, size, chunk_size)
                assert list(got) == _naive_touched(offset, length, size, chunk_size), (
                    offset,
                    length,
                    size,
                    chunk_size,
                )


@pytest.mark.parametrize(
    ("offset", "length", "size", "want"),
    [
        # empty file: nothing to fetch whatever is asked
        (0, 0, 0, range(0)),
        (0, 4096, 0, range(0)),
        # zero-length reads touch nothing
        (0, 0, 3 * CS, range(0)),
        (CS, 0, 3 * CS, range(0)),
        # a single-blob file, including one of exactly the chunk size
        (0, 1, 10, range(1)),
        (0, 1 << 30, CS, range(1)),
        (CS - 1, 1, CS, range(1)),
        (CS, 1, CS, range(0)),
        # chunk size + 1: the last byte lives alone in chunk 1
        (0, CS, CS + 1, range(0, 1)),
        (CS, 1, CS + 1, range(1, 2)),
        (CS - 1, 2, CS + 1, range(0, 2)),
        (0, CS + 1, CS + 1, range(0, 2)),
        # reads ending exactly on a boundary do not touch the next chunk
        (0, CS, 3 * CS, range(0, 1)),
        (CS, CS, 3 * CS, range(1, 2)),
        # reads crossing one or more boundaries
        (CS - 1, 2, 3 * CS, range(0, 2)),
        (CS // 2, 2 * CS, 3 * CS, range(0, 3)),
        # reads past EOF are clipped, and reads starting at or after EOF touch nothing
        (2 * CS, 10 * CS, 2 * CS + 1, range(2, 3)),
        (2 * CS + 1, 10, 2 * CS + 1, range(0)),
        (5 * CS, 10, 2 * CS + 1, range(0)),
    ],
)
def test_chunks_touched_edges(offset: int, length: int, size: int, want: range) -> None:
    got = chunks_touched(offset, length, size, CS)
    assert list(got) == list(want)


def test_chunks_touched_indices_are_valid_chunk_indices() -> None:
    size = 5 * CS + 123
    touched = chunks_touched(0, size * 2, size, CS)
    assert list(touched) == list(range(chunk_count(size, CS)))
