"""``.pyc`` headers: which files are rewritten hash-based, and that Python accepts them."""

from __future__ import annotations

import importlib.util
import os
import py_compile
import subprocess
import sys
from pathlib import Path

import pytest

from lazycaf.builds.pyc import hash_based, parse_header, source_path


def _compiled(tmp: Path) -> tuple[Path, Path]:
    pkg = tmp / "pkg"
    pkg.mkdir()
    src = pkg / "mod.py"
    src.write_text("VALUE = 'from the pyc'\n")
    os.utime(src, (1_600_000_000, 1_600_000_000))
    pyc = Path(importlib.util.cache_from_source(str(src)))
    py_compile.compile(
        str(src), str(pyc), invalidation_mode=py_compile.PycInvalidationMode.TIMESTAMP
    )
    return src, pyc


@pytest.mark.parametrize(("checked", "flags"), [(False, 0b01), (True, 0b11)])
def test_a_valid_timestamp_pyc_is_rewritten_and_python_uses_it(
    tmp_path: Path, checked: bool, flags: int
) -> None:
    src, pyc = _compiled(tmp_path)
    new = hash_based(pyc.read_bytes(), src.read_bytes(), src.stat().st_mtime_ns, checked=checked)
    assert new is not None and new[16:] == pyc.read_bytes()[16:]
    header = parse_header(new)
    assert header is not None and header.flags == flags
    assert header.source_hash == importlib.util.source_hash(src.read_bytes())
    pyc.write_bytes(new)
    src.write_text("VALUE = 'from the source'\n")  # same size: only a check would notice
    os.utime(src, (1_700_000_000, 1_700_000_000))
    out = subprocess.run(
        [sys.executable, "-B", "-c", "import pkg.mod; print(pkg.mod.VALUE)"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    # unchecked: the immutable tree's .pyc is used as it is; checked: the source is hashed
    assert out == ("from the source" if checked else "from the pyc")


def test_what_is_left_as_it_is(tmp_path: Path) -> None:
    src, pyc = _compiled(tmp_path)
    data, source, mtime = pyc.read_bytes(), src.read_bytes(), src.stat().st_mtime_ns
    assert hash_based(data, source, mtime + 10**9) is None  # stale: another source mtime
    assert hash_based(data, source + b"\n", mtime) is None  # stale: another source size
    assert hash_based(b"\x00\x00\r\n" + data[4:], source, mtime) is None  # not a .pyc
    other = (int.from_bytes(data[:2], "little") - 1).to_bytes(2, "little") + data[2:]
    assert hash_based(other, source, mtime) is None  # another Python's
    already = hash_based(data, source, mtime)
    assert already is not None and hash_based(already, source, mtime) is None


def test_source_paths_follow_pep_3147() -> None:
    assert source_path("a/b/__pycache__/m.cpython-311.pyc") == "a/b/m.py"
    assert source_path("__pycache__/m.cpython-311.opt-2.pyc") == "m.py"
    assert source_path("a/m.pyc") is None
    assert source_path("a/__pycache__/sub/m.cpython-311.pyc") is None


def test_the_source_mtime_is_compared_as_the_importer_does(tmp_path: Path) -> None:
    """``int(st.st_mtime)`` of a float that rounds up: 1,700,000,000 s and 999,999,999 ns
    is 1,700,000,001.0 as a float; a floor would call the importer's valid .pyc stale."""
    from lazycaf.builds.pyc import importer_mtime

    src = tmp_path / "m.py"
    src.write_text("x = 1\n")
    ns = 1_700_000_000 * 10**9 + 999_999_999
    os.utime(src, ns=(ns, ns))
    assert importer_mtime(src.stat().st_mtime_ns) == int(src.stat().st_mtime) == 1_700_000_001
    assert importer_mtime(1_500 * 10**9 + 5) == 1_500
