"""Hostile manifests and hostile trees through the doors a user uses (issue 13).

Faults injected (tests/faults/hostile.py builds the manifests):
- 28 manifests the decoder must refuse: traversal (``..``, twice), an absolute path,
  escapes through a symlinked parent (absolute, relative), hard links outside the tree
  (absolute, relative), to a directory, to a symlink, to a later file, duplicates (twice),
  unsorted entries, device bits in a mode, device/fifo kinds (3), a root mode with type
  bits, names over 255 bytes (ASCII, UTF-8), a path over 4,095 bytes, sizes that disagree
  with chunk lists (3), a huge entry count, a huge column length, a symlink whose size
  lies, an empty path component. Each through ``lazycaf ls``, ``cat``, ``materialize``
  and ``mount``: exit 4, one line naming the entry, nothing created.
- 7 manifests that decode but lie: a declared size larger and smaller than the blob, a
  last chunk shorter than its blob, symlinks that leave the tree or loop, a symlink target
  of 5,000 bytes, setuid/setgid files and a world-writable directory, a file of 100,000
  chunks none of which is stored. Each through ``ls``, ``cat`` and ``materialize``, and
  all of them through one real mount: integrity errors exit 4 (EIO in the mount, one log
  line naming path and blob), honest files read byte for byte, nothing written outside.
- A read across two missing chunks of a 2 MiB file in a real mount (defect 1): EIO, the
  mount alive, other files readable.
- ``lazycaf pack`` of a 10,000-deep tree (defect 6): one line, exit 2.

Every door's answer is an exit code and at most one line on stderr, never a traceback;
every CLI run is bounded by a timeout.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from lazycaf.cas.casdir import CasDir
from lazycaf.core.digest import Digest
from lazycaf.core.errors import ManifestError
from lazycaf.core.manifest import Manifest
from tests.conftest import Host, run_cli
from tests.faults.hostile import (
    Hostile,
    accepted_cases,
    cases,
    combined,
    rejected_cases,
    store,
)
from tests.helpers import pack, walk

MiB = 1 << 20
OUTSIDE = Path("/nonexistent-lazycaf-outside")  # names only: cases are built at import
CASES = cases(OUTSIDE)
REJECTED = [c for c in CASES if c.rejected is not None]
ACCEPTED = [c for c in CASES if c.rejected is None]


def one_line(proc: object, *, code: int | None) -> str:
    """The single stderr line of a finished CLI run, checking its exit code (None: any
    failure)."""
    returncode: int = proc.returncode  # type: ignore[attr-defined]
    err: str = proc.stderr.decode(errors="replace")  # type: ignore[attr-defined]
    assert "Traceback" not in err, err[-3000:]
    if code is None:
        assert returncode != 0, err
    else:
        assert returncode == code, err
    lines = err.splitlines()
    assert len(lines) == 1, err[-3000:]
    assert len(lines[0]) < 1000, lines[0][:300]  # a line a person reads
    return lines[0]


@dataclass
class Store:
    """One CAS directory holding every case, a host cache for ``materialize`` (its daemon
    starts with the first one), and ``outside``, where the attacks aim: it stays empty."""

    base: Path
    cas: Path
    outside: Path
    env: dict[str, str]
    cases: dict[str, Hostile]

    def cli(self, *args: str | Path, timeout: float = 60) -> subprocess.CompletedProcess[bytes]:
        return run_cli(*args, "--cas", self.cas, env=self.env, check=False, timeout=timeout)

    def top(self) -> set[str]:
        """What the base holds beside the CAS and the cache."""
        return {p.name for p in self.base.iterdir()} - {"cas", "cache"}


@pytest.fixture(scope="module")
def stored(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Store]:
    base = tmp_path_factory.mktemp("hostile")
    outside = base / "outside"
    outside.mkdir()
    named = {c.name: c for c in cases(outside)}
    for case in named.values():
        store(base / "cas", case)
    env = {"LAZYCAF_CACHE": str(base / "cache")}
    try:
        yield Store(base, base / "cas", outside, env, named)
    finally:
        run_cli("fetcher", "stop", env=env, check=False, timeout=30)


# -- in-process: every case is what it says (fast tier) --------------------------------------
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_the_decoder_refuses_or_accepts_each_case_as_declared(case: Hostile) -> None:
    if case.rejected is None:
        m = Manifest.decode(case.data)
        assert m.encode() == case.data
        return
    with pytest.raises(ManifestError) as info:
        Manifest.decode(case.data)
    assert case.rejected in str(info.value)
    if case.entry is not None:
        assert f"entry {case.entry!r}" in str(info.value)
    assert len(str(info.value)) < 1000


# -- the CLI doors: ls, cat, materialize --------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("name", [c.name for c in REJECTED])
def test_rejected_manifests_fail_every_door_in_one_line(stored: Store, name: str) -> None:
    case = stored.cases[name]
    assert case.rejected is not None
    before = stored.top()
    for args in (["ls", case.ref, "-R"], ["cat", case.ref, "ok"]):
        line = one_line(stored.cli(*args), code=4)
        assert case.rejected in line, line
        if case.entry is not None and len(case.entry) < 300:
            assert f"entry {case.entry!r}" in line, line
    target = stored.base / f"target-{name}"
    line = one_line(stored.cli("materialize", case.ref, target), code=4)
    assert case.rejected in line, line
    assert stored.top() == before  # no target, nothing beside it
    assert not any(stored.outside.iterdir())


@pytest.mark.slow
@pytest.mark.parametrize("name", [c.name for c in ACCEPTED])
def test_lying_manifests_fail_where_they_lie_and_nowhere_else(stored: Store, name: str) -> None:
    case = stored.cases[name]
    proc = stored.cli("ls", case.ref, "-R")
    assert proc.returncode == 0 and proc.stderr == b"", proc.stderr
    for path, content in case.readable.items():  # honest files: byte for byte
        proc = stored.cli("cat", case.ref, path)
        assert proc.returncode == 0 and proc.stdout == content, proc.stderr
    if case.cat is not None:
        path, expect = case.cat
        proc = stored.cli("cat", case.ref, path)
        if expect.code == 0:
            assert proc.returncode == 0 and proc.stderr == b"", proc.stderr
        else:
            assert expect.says in one_line(proc, code=expect.code)
        # no wrong byte: what was written (a stream stops at the lie) is the blobs' content
        assert case.truth.get(path, b"").startswith(proc.stdout)
    before = stored.top()
    target = stored.base / f"target-{name}"
    proc = stored.cli("materialize", case.ref, target, timeout=120)
    assert b"Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert not any(stored.outside.iterdir())
    if case.materialize.code != 0:
        assert case.materialize.says in one_line(proc, code=case.materialize.code)
        assert stored.top() == before  # nothing half-written where the tree was asked for
        return
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stderr.splitlines()) <= 1  # at most a note (copied, not reflinked)
    assert stored.top() == before | {target.name}
    for path, content in case.readable.items():
        assert (target / path).read_bytes() == content
    for path, link in case.links.items():
        assert os.readlink(target / path) == link
    for path, st in walk(target).items():  # untrusted modes: no setid, no world-writable
        assert not st.st_mode & (stat.S_ISUID | stat.S_ISGID), path
        if stat.S_ISDIR(st.st_mode):
            assert not st.st_mode & stat.S_IWOTH, path


# -- the mount door ----------------------------------------------------------------------
def mounted(mnt: Path) -> bool:
    with open("/proc/mounts") as f:
        return any(line.split()[1] == str(mnt) for line in f)


def read_until_error(path: Path, step: int = 8192) -> tuple[bytes, int | None]:
    """Read ``path`` with ``pread`` in steps (the kernel returns the good part of a read
    before a failing one): the bytes read and the errno that stopped it (None: EOF)."""
    got = bytearray()
    fd = os.open(path, os.O_RDONLY)
    try:
        while True:
            try:
                data = os.pread(fd, step, len(got))
            except OSError as exc:
                return bytes(got), exc.errno
            if not data:
                return bytes(got), None
            got += data
    finally:
        os.close(fd)


def test_rejected_manifests_are_never_mounted(host: Host, tmp_path: Path) -> None:
    cas = tmp_path / "cas"
    (tmp_path / "outside").mkdir()
    named = {c.name: c for c in cases(tmp_path / "outside")}
    mnt = host.mountpoint()
    for case in (named[c.name] for c in REJECTED):
        store(cas, case)
        proc = host.cli("mount", case.ref, mnt, "--cas", cas, check=False, timeout=60)
        line = one_line(proc, code=4)
        assert case.rejected is not None and case.rejected in line, (case.name, line)
        assert not mounted(mnt), case.name
        assert not any(mnt.iterdir())
    assert not any((tmp_path / "outside").iterdir())


def test_lying_manifests_mount_and_fail_only_their_lies(host: Host, tmp_path: Path) -> None:
    """One mount holds every accepted case (``combined``): lies read as EIO, one log line
    each naming the file and its blob; honest files read exactly; the mount survives."""
    (tmp_path / "outside").mkdir()
    case = combined(accepted_cases(tmp_path / "outside"))
    cas = tmp_path / "cas"
    store(cas, case)
    mnt = host.mountpoint()
    out = host.cli("mount", case.ref, mnt, "--cas", cas, "--no-prefetch", timeout=60)
    log = Path(out.stdout.decode().rpartition("log:")[2].strip())
    assert mounted(mnt)
    for path in case.unreadable:
        got, error = read_until_error(mnt / path)
        assert error == errno.EIO, path
        # no wrong byte: what came before the error (whole good chunks) is the blobs' own
        assert case.truth.get(path, b"").startswith(got), path
        assert mounted(mnt), path
    for path, content in case.readable.items():
        assert (mnt / path).read_bytes() == content, path
    for path, link in case.links.items():
        assert os.readlink(mnt / path) == link
    with contextlib.suppress(OSError):  # more than the kernel takes: any answer but death
        os.readlink(mnt / "symlink-target-5000-bytes/long")
    assert mounted(mnt)
    assert not any((tmp_path / "outside").iterdir())
    text = log.read_text()
    assert "Traceback" not in text, text[-3000:]
    for name in ("size-larger-than-blob", "size-smaller-than-blob"):
        lines = [line for line in text.splitlines() if f"read of {name}/lies" in line]
        assert lines and all("the manifest says" in line for line in lines), text[-3000:]
    host.cli("umount", mnt, timeout=60)


def test_a_read_across_two_missing_chunks_fails_and_the_mount_lives(
    host: Host, tmp_path: Path
) -> None:
    """Defect 1 of issue 13: the read used to end the mount (ENOTCONN for every reader)."""
    tree = tmp_path / "tree"
    tree.mkdir()
    big = os.urandom(2 * MiB)
    (tree / "big.bin").write_bytes(big)
    (tree / "small.txt").write_bytes(b"still here\n")
    cas = tmp_path / "cas"
    digest = pack(tree, cas)
    entry = Manifest.decode(CasDir(cas).read(Digest.parse(digest))).get("big.bin")
    assert entry is not None and len(entry.chunks) == 2
    for chunk in entry.chunks:
        for p in (cas / "blobs" / chunk.hex[:2]).glob(chunk.hex + "*"):
            p.unlink()
    mnt = host.mountpoint()
    host.cli("mount", digest, mnt, "--cas", cas, "--no-prefetch", timeout=60)
    fd = os.open(mnt / "big.bin", os.O_RDONLY)
    try:
        with pytest.raises(OSError) as info:
            os.pread(fd, 8192, MiB - 4096)
        assert info.value.errno == errno.EIO
        assert mounted(mnt)
        with pytest.raises(OSError) as info:  # inside one chunk: EIO as well
            os.pread(fd, 4096, 4096)
        assert info.value.errno == errno.EIO
    finally:
        os.close(fd)
    assert mounted(mnt)
    assert (mnt / "small.txt").read_bytes() == b"still here\n"
    host.cli("umount", mnt, timeout=60)


# -- pack of a hostile tree --------------------------------------------------------------
def _deep_tree(root: Path, depth: int) -> None:
    """``root/d/d/.../d/f``, ``depth`` directories deep (built through directory fds: the
    path is longer than any syscall takes)."""
    root.mkdir()
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(depth):
            os.mkdir("d", dir_fd=fd)
            child = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = child
        os.close(os.open("f", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd))
    finally:
        os.close(fd)


def _remove_deep(root: Path) -> None:
    """Remove a ``_deep_tree`` without recursion: hoist ``d/d`` up one level at a time."""
    while (root / "d" / "d").is_dir():
        os.rename(root / "d" / "d", root / "up")
        shutil.rmtree(root / "d")
        os.rename(root / "up", root / "d")
    shutil.rmtree(root)


@pytest.fixture(scope="module")
def deep_tree(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    tree = tmp_path_factory.mktemp("deep") / "tree"
    _deep_tree(tree, 10_000)
    try:
        yield tree
    finally:
        _remove_deep(tree)


@pytest.mark.slow
@pytest.mark.parametrize("relative", [False, True], ids=["absolute", "relative"])
def test_pack_of_a_10000_deep_tree_ends_in_one_line(
    deep_tree: Path, tmp_path: Path, relative: bool
) -> None:
    """Defect 6 of issue 13: a 54-line traceback (ENAMETOOLONG) before. The walk opens each
    directory below the root's descriptor, so an absolute root as well as ``pack .`` from
    inside the tree meets the manifest's path limit (4,095 bytes), not the OS's PATH_MAX."""
    cas = tmp_path / "cas"
    proc = subprocess.run(
        [sys.executable, "-m", "lazycaf", "pack", "." if relative else deep_tree, "--cas", cas],
        capture_output=True,
        timeout=120,
        cwd=deep_tree,
    )
    line = one_line(proc, code=2)
    assert line.startswith("lazycaf: error: cannot ") and "d/d/d/d/" in line, line
    assert "4097 bytes long (a manifest holds at most 4095)" in line, line
    if not relative:
        assert str(deep_tree) in line, line
    assert proc.stdout == b""
    assert not (cas / "blobs").exists() or not any((cas / "blobs").iterdir())


def test_rejected_cases_name_every_attack_of_the_issue() -> None:
    """The generator covers the list of issue 13 (a case dropped would go unnoticed)."""
    names = {c.name for c in rejected_cases(OUTSIDE)} | {c.name for c in accepted_cases(OUTSIDE)}
    for needed in (
        "traversal",
        "absolute",
        "symlinked-parent-absolute",
        "hardlink-outside-absolute",
        "hardlink-to-directory",
        "duplicate",
        "unsorted",
        "char-device-bits",
        "name-over-255-bytes",
        "path-over-4095-bytes",
        "size-needs-more-chunks",
        "huge-entry-count",
        "size-larger-than-blob",
        "symlink-target-5000-bytes",
        "setuid-and-world-writable",
        "100000-missing-chunks",
    ):
        assert needed in names
