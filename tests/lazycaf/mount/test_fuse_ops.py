"""lazycaf.mount.fuse_ops: the per-opcode request counts the mount logs on its way out."""

from __future__ import annotations

import errno
from typing import Any, cast

import pytest

pyfuse3 = pytest.importorskip("pyfuse3")

from lazycaf.core.digest import Digest  # noqa: E402
from lazycaf.core.manifest import DIR, FILE, Entry, Manifest  # noqa: E402
from lazycaf.mount.fuse_ops import LazyOperations  # noqa: E402
from lazycaf.mount.inodes import ROOT_INODE, InodeTable  # noqa: E402

MANIFEST = Manifest(
    [Entry("a", DIR, 0o755, 1, 0), Entry("a/f", FILE, 0o644, 2, 3, Digest.of(b"abc"))],
    chunk_size=64 << 10,
)


async def test_each_handler_counts_its_requests() -> None:
    ops = LazyOperations(InodeTable(MANIFEST), cast(Any, None), skip_open=True)
    a = (await ops.lookup(ROOT_INODE, b"a")).st_ino
    await ops.lookup(a, b"f")
    assert (await ops.lookup(a, b"missing")).st_ino == 0  # a negative entry, counted too
    await ops.getattr(a)
    assert await ops.access(a, 4, None)
    with pytest.raises(pyfuse3.FUSEError) as exc:
        await ops.opendir(a, None)  # ENOSYS: the kernel stops asking
    assert exc.value.errno == errno.ENOSYS
    await ops.forget([(a, 1)])
    assert dict(ops.requests) == {
        "lookup": 3,
        "getattr": 1,
        "access": 1,
        "opendir": 1,
        "forget": 1,
    }
