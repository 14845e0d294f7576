"""``explain``: each cause a rebuild of unchanged sources produces is named, alone, and a
real change is reported as bytes (first offset, share)."""

from __future__ import annotations

import gzip
import io
import os
import py_compile
import shutil
import tarfile
import zipfile
from pathlib import Path

import pytest

from lazycaf.builds.explain import _blank_elf_build_id, explain


def _pyc(tmp: Path, mtime: int, source: str = "x = 1\n") -> bytes:
    src = tmp / "m.py"
    src.write_text(source)
    os.utime(src, (mtime, mtime))
    out = tmp / "m.pyc"
    py_compile.compile(
        str(src), str(out), doraise=True, invalidation_mode=py_compile.PycInvalidationMode.TIMESTAMP
    )
    return out.read_bytes()


def test_a_pyc_of_the_same_source_with_another_mtime(tmp_path: Path) -> None:
    e = explain(_pyc(tmp_path, 1_000_000), _pyc(tmp_path, 2_000_000))
    assert [c.kind for c in e.causes] == ["pyc-mtime"] and e.meaningless
    assert e.text() == "only the .pyc source-mtime field"


def test_a_pyc_of_other_code_is_not_only_its_mtime(tmp_path: Path) -> None:
    e = explain(_pyc(tmp_path, 1_000_000), _pyc(tmp_path, 2_000_000, "x = 2\n"))
    assert [c.kind for c in e.causes] == ["pyc-mtime", "bytes"] and not e.meaningless


def _zip(when: tuple[int, int, int, int, int, int]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for name in ("pkg/__init__.py", "pkg/data.txt"):
            z.writestr(zipfile.ZipInfo(name, when), f"contents of {name}\n" * 20)
    return buf.getvalue()


def test_a_wheel_whose_members_have_other_timestamps() -> None:
    e = explain(_zip((2020, 1, 1, 0, 0, 0)), _zip((2024, 6, 30, 12, 0, 0)))
    assert [c.kind for c in e.causes] == ["zip-time"] and e.meaningless


def _tar(mtime: int, *, gz: bool = False) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        data = b"hello\n" * 100
        info = tarfile.TarInfo("dir/hello.txt")
        info.size, info.mtime = len(data), mtime + 0.5  # a fractional mtime: a pax record
        t.addfile(info, io.BytesIO(data))
    raw = buf.getvalue()
    return gzip.compress(raw, mtime=mtime) if gz else raw


def test_a_tar_and_a_tar_gz_whose_members_have_other_timestamps() -> None:
    e = explain(_tar(1_000_000), _tar(2_000_000))
    assert [c.kind for c in e.causes] == ["tar-time"] and e.meaningless
    e = explain(_tar(1_000_000, gz=True), _tar(2_000_000, gz=True))
    assert sorted(c.kind for c in e.causes) == ["gzip-time", "tar-time"] and e.meaningless


def test_an_elf_file_whose_build_id_differs(tmp_path: Path) -> None:
    original = Path(shutil.which("true") or "/bin/true").read_bytes()
    blanked = _blank_elf_build_id(original)
    assert blanked != original, "the system's true has a build id to blank"
    at = next(i for i, (x, y) in enumerate(zip(original, blanked, strict=True)) if x != y)
    other = bytearray(original)
    other[at : at + 4] = bytes(b ^ 0xFF for b in other[at : at + 4])
    e = explain(original, bytes(other))
    assert [c.kind for c in e.causes] == ["elf-build-id"] and e.meaningless


def test_an_embedded_build_path_of_another_length() -> None:
    a = b"\x00co_filename /tmp/build-1/lib/m.py\x00 and /tmp/build-1/include\x00tail"
    b = b"\x00co_filename /tmp/build-22/lib/m.py\x00 and /tmp/build-22/include\x00tail"
    e = explain(a, b)
    assert [c.kind for c in e.causes] == ["build-path"] and not e.meaningless
    assert e.causes[0].detail == "/tmp/build-1 -> /tmp/build-22"


@pytest.mark.parametrize("size", [10, 10_000])
def test_other_bytes_give_the_first_offset_and_the_share(size: int) -> None:
    a = bytes(size)
    b = bytearray(a)
    b[size // 2] = 1
    e = explain(a, bytes(b))
    assert [c.kind for c in e.causes] == ["bytes"]
    assert e.causes[0].detail == f"first at byte {size // 2}, {1 / size:.1%} of bytes differ"
    assert explain(a, a).causes == ()


def test_crafted_inputs_stay_bounded() -> None:
    """A zip whose extra fields claim to run past its end, and a 'path' as long as the file,
    are looked at without growing the data (the files come from other people's builds)."""
    import struct

    from lazycaf.builds.explain import _blank_zip_time

    local = b"PK\x03\x04" + bytes(26)
    central = b"PK\x01\x02" + bytes(24) + struct.pack("<HHH", 0, 60000, 0) + bytes(16)
    entries = (central + struct.pack("<HH", 0x5455, 60000)) * 1000
    end = b"PK\x05\x06" + bytes(4) + struct.pack("<HHII", 1000, 1000, len(entries), len(local))
    crafted = local + entries + end + b"\0\0"
    assert len(_blank_zip_time(crafted)) == len(crafted)
    a = b"x/" + b"v1" * 200_000 + b"/end"
    b = b"x/" + b"v2" * 200_000 + b"/end"
    assert [c.kind for c in explain(a, b).causes] == ["bytes"]
