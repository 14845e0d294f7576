"""Tests for lazycaf.core.digest: the Digest value and the hashing helpers."""

from __future__ import annotations

import copy
import pickle

import blake3
import pytest

from lazycaf.core.digest import DIGEST_SIZE, Digest, Hasher
from lazycaf.core.errors import DigestMismatch, IntegrityError, UsageError

# blake3 of the empty input, from the BLAKE3 reference test vectors.
EMPTY_HEX = "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"
GOOD_HEX = "0123456789abcdef" * 4


# -- parse -----------------------------------------------------------------------------------
def test_parse_round_trips_lowercase_hex() -> None:
    d = Digest.parse(GOOD_HEX)
    assert d.hex == GOOD_HEX
    assert str(d) == GOOD_HEX
    assert d.raw == bytes.fromhex(GOOD_HEX)
    assert len(d.raw) == DIGEST_SIZE


@pytest.mark.parametrize(
    "text",
    [
        "",
        GOOD_HEX.upper(),
        GOOD_HEX[:-1] + "A",
        GOOD_HEX[:-1],
        GOOD_HEX + "0",
        GOOD_HEX[:-2],
        GOOD_HEX[:-1] + "g",
        GOOD_HEX[:-1] + " ",
        GOOD_HEX + "\n",
        " " + GOOD_HEX,
        "0x" + GOOD_HEX[:-2],
        GOOD_HEX[:32],
        "\u0660" * 64,  # Arabic-Indic digit zero: a Unicode digit, not hex
    ],
    ids=repr,
)
def test_parse_rejects_anything_but_64_lowercase_hex(text: str) -> None:
    with pytest.raises(UsageError, match="not a blake3 digest"):
        Digest.parse(text)


@pytest.mark.parametrize("value", [GOOD_HEX.encode(), None, 123, bytes.fromhex(GOOD_HEX)])
def test_parse_rejects_non_strings_with_usage_error(value: object) -> None:
    with pytest.raises(UsageError):
        Digest.parse(value)  # type: ignore[arg-type]


def test_is_hex() -> None:
    assert Digest.is_hex(GOOD_HEX)
    assert not Digest.is_hex(GOOD_HEX.upper())
    assert not Digest.is_hex(GOOD_HEX[:-1])
    assert not Digest.is_hex(GOOD_HEX + "\n")


# -- construction ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "raw", [b"", b"\0" * 31, b"\0" * 33, bytearray(32), memoryview(b"\0" * 32)]
)
def test_constructor_requires_exactly_32_bytes(raw: object) -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        Digest(raw)  # type: ignore[arg-type]


def test_from_bytes_copies_buffers() -> None:
    buf = bytearray(range(32))
    d = Digest.from_bytes(buf)  # type: ignore[arg-type]
    buf[0] = 99
    assert d.raw == bytes(range(32))
    assert type(d.raw) is bytes
    with pytest.raises(ValueError):
        Digest.from_bytes(bytearray(31))  # type: ignore[arg-type]


def test_trusted_wraps_without_copying_and_equals_validated() -> None:
    raw = bytes(range(32))
    t = Digest.trusted(raw)
    assert isinstance(t, Digest)
    assert t.raw is raw
    assert t == Digest(raw)
    assert hash(t) == hash(Digest(raw))
    assert {t: 1}[Digest(raw)] == 1
    with pytest.raises(AttributeError):
        t.raw = b"\0" * 32


# -- hashing ---------------------------------------------------------------------------------
def test_of_matches_blake3_reference_vector() -> None:
    assert Digest.of(b"").hex == EMPTY_HEX


@pytest.mark.parametrize("size", [0, 1, 1023, 1024, 1025, 100_000])
def test_of_matches_blake3_and_accepts_buffers(size: int) -> None:
    data = bytes(i % 251 for i in range(size))
    want = blake3.blake3(data).digest()
    assert Digest.of(data).raw == want
    assert Digest.of(bytearray(data)).raw == want
    assert Digest.of(memoryview(data)).raw == want


def test_hasher_incremental_equals_one_shot() -> None:
    data = bytes(i % 253 for i in range(300_000))
    h = Hasher()
    for off in range(0, len(data), 7777):
        h.update(memoryview(data)[off : off + 7777])
    assert h.digest() == Digest.of(data)
    assert Hasher().digest().hex == EMPTY_HEX


def test_verify_accepts_matching_content() -> None:
    data = b"hello world"
    Digest.of(data).verify(data)
    Digest.of(data).verify(bytearray(data))
    Digest.of(data).verify(memoryview(data))


def test_verify_mismatch_carries_expected_and_actual() -> None:
    expected = Digest.of(b"right")
    with pytest.raises(DigestMismatch) as info:
        expected.verify(b"wrong", what="chunk 3 of lib.so")
    exc = info.value
    assert isinstance(exc, IntegrityError)
    assert exc.expected == expected
    assert exc.actual == Digest.of(b"wrong")
    message = str(exc)
    assert expected.hex in message
    assert Digest.of(b"wrong").hex in message
    assert "chunk 3 of lib.so" in message


def test_verify_detects_a_single_flipped_bit() -> None:
    data = bytearray(b"x" * 4096)
    d = Digest.of(data)
    data[2048] ^= 1
    with pytest.raises(DigestMismatch):
        d.verify(data)


# -- value semantics -------------------------------------------------------------------------
def test_equality_and_hash() -> None:
    a, b = Digest.of(b"a"), Digest.of(b"a")
    c = Digest.of(b"c")
    assert a == b
    assert a is not b
    assert hash(a) == hash(b)
    assert a != c
    assert len({a, b, c}) == 2
    assert a != a.hex
    assert a != a.raw
    assert a != None  # noqa: E711


def test_sorting_orders_by_raw_bytes() -> None:
    ds = [Digest.of(bytes([i])) for i in range(50)]
    assert [d.raw for d in sorted(ds)] == sorted(d.raw for d in ds)
    lo, hi = Digest(b"\0" * 32), Digest(b"\xff" * 32)
    assert lo < hi
    assert not hi < lo
    assert not lo < Digest(b"\0" * 32)


def test_full_ordering_operators() -> None:
    """ "Ordered by its bytes": every comparison operator works, not only ``<``."""
    lo, hi = Digest(b"\0" * 32), Digest(b"\xff" * 32)
    assert hi > lo
    assert lo <= hi
    assert lo <= Digest(b"\0" * 32)
    assert hi >= lo
    assert max(lo, hi) == hi


def test_ordering_against_other_types_is_a_type_error() -> None:
    d = Digest.of(b"x")
    with pytest.raises(TypeError):
        _ = d < 5  # type: ignore[operator]
    with pytest.raises(TypeError):
        _ = d < d.hex  # type: ignore[operator]


def test_attributes_cannot_be_set() -> None:
    d = Digest.of(b"x")
    with pytest.raises(AttributeError):
        d.raw = b"\0" * 32
    with pytest.raises(AttributeError):
        d.other = 1
    assert d == Digest.of(b"x")


def test_attributes_cannot_be_deleted() -> None:
    d = Digest.of(b"x")
    with pytest.raises(AttributeError):
        del d.raw
    assert d.raw == Digest.of(b"x").raw


def test_text_forms() -> None:
    d = Digest.parse(GOOD_HEX)
    assert repr(d) == f"Digest({GOOD_HEX})"
    assert d.short == GOOD_HEX[:12]
    assert f"{d}" == GOOD_HEX


def test_pickle_and_copy_round_trip() -> None:
    d = Digest.of(b"pickle me")
    for clone in (pickle.loads(pickle.dumps(d)), copy.copy(d), copy.deepcopy(d)):
        assert clone == d
        assert type(clone) is Digest
        assert hash(clone) == hash(d)
