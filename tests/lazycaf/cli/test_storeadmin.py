"""``lazycaf cas gc``, ``ref ls`` and ``ref rm`` through the real CLI, on a CAS directory and
on a real S3-compatible server (SeaweedFS, the session's ``s3_server``), never a mock.

What GC must free is computed from the store's own listing and the manifests' blob lists,
never written down: every blob not reached from a ref, a profile or ``--keep`` and older than
the grace goes, everything else stays.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio

from lazycaf.cas.api import CAS, load_manifest, open_cas
from lazycaf.cas.gc import collect_garbage
from lazycaf.cas.s3 import REFRESH_AFTER_ENV, S3CAS
from lazycaf.core.digest import Digest
from lazycaf.traces.profiles import add_run, profile_blobs, refresh_bundle
from lazycaf.traces.trace import AccessRecord, Trace
from tests.conftest import run_cli
from tests.helpers import make_tree
from tests.s3server import S3Server


@dataclass
class Store:
    spec: str
    env: dict[str, str] = field(default_factory=dict)
    s3: S3Server | None = None

    def cli(
        self, *args: str | os.PathLike[str], check: bool = True
    ) -> subprocess.CompletedProcess[bytes]:
        return run_cli(*args, "--cas", self.spec, check=check, env=self.env)

    def open(self) -> CAS:
        if self.s3 is not None:
            refresh_after = float(self.env[REFRESH_AFTER_ENV])
            return S3CAS(self.spec, config=self.s3.config(), refresh_after=refresh_after)
        return open_cas(self.spec)

    def call(self, fn: object, *args: object) -> object:
        """Run ``await fn(cas, *args)`` on a fresh CAS of this store."""

        async def main() -> object:
            cas = self.open()
            try:
                return await fn(cas, *args)  # type: ignore[operator]
            finally:
                await cas.aclose()

        return trio.run(main)

    def blobs(self) -> set[Digest]:
        async def listing(cas: CAS) -> set[Digest]:
            return {b.digest for b in await cas.list_blobs()}

        out = self.call(listing)
        assert isinstance(out, set)
        return out

    def manifest_blobs(self, ref: str) -> set[Digest]:
        """The manifest's own digest and every blob it lists."""

        async def load(cas: CAS, ref: str) -> set[Digest]:
            digest, manifest = await load_manifest(cas, ref)
            return {digest, *manifest.blobs()}

        out = self.call(load, ref)
        assert isinstance(out, set)
        return out

    def pack(self, tree: Path, tag: str) -> str:
        out = self.cli("pack", tree, "--tag", tag).stdout.decode().strip()
        assert len(out) == 64, out
        return out

    def gc(self, *args: str) -> dict[str, object]:
        out: dict[str, object] = json.loads(self.cli("cas", "gc", "--json", *args).stdout)
        return out


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    if request.param == "s3":
        s3: S3Server = request.getfixturevalue("s3_server")
        # Refresh every reused blob, so these tests may run a GC with any grace (even 0 s).
        env = {**s3.env(), REFRESH_AFTER_ENV: "0"}
        return Store(f"s3://{s3.bucket}/gc-{secrets.token_hex(6)}", env, s3)
    return Store(str(tmp_path / "cas"))


def _tree(root: Path, unique: str) -> Path:
    """The helper's tree plus files of its own (so two trees share some blobs, not all)."""
    make_tree(root)
    (root / "own").mkdir()
    for i in range(3):
        (root / "own" / f"f{i}").write_bytes(f"{unique} {i}\n".encode() * 100)
    return root


def test_ref_ls_and_rm(store: Store, tmp_path: Path) -> None:
    a = store.pack(_tree(tmp_path / "a", "a"), "app:1")
    b = store.pack(_tree(tmp_path / "b", "b"), "team/tool:2")
    rows = [json.loads(line) for line in store.cli("ref", "ls", "--json").stdout.splitlines()]
    assert rows == [{"name": "app:1", "digest": a}, {"name": "team/tool:2", "digest": b}]
    assert store.cli("ref", "ls").stdout.decode().split() == [a, "app:1", b, "team/tool:2"]

    store.cli("ref", "rm", "team/tool:2")
    assert store.cli("ref", "ls").stdout.decode().split() == [a, "app:1"]
    missing = store.cli("ref", "rm", "team/tool:2", check=False)
    assert missing.returncode == 1 and b"team/tool:2" in missing.stderr
    # the ref's blobs stay (garbage for a GC only), and the name can be a directory again
    assert Digest.parse(b) in store.blobs()
    store.pack(tmp_path / "b", "team")
    assert "team" in store.cli("ref", "ls").stdout.decode().split()


def test_gc_keeps_every_root_and_frees_exactly_the_rest(store: Store, tmp_path: Path) -> None:
    store.pack(_tree(tmp_path / "a", "a"), "app:1")
    store.pack(_tree(tmp_path / "b", "b"), "app:2")
    store.pack(_tree(tmp_path / "c", "c"), "app:3")
    only_b = store.manifest_blobs("app:2") - store.manifest_blobs("app:1")
    only_c = store.manifest_blobs("app:3") - store.manifest_blobs("app:1")
    recorded = min(only_b, key=lambda d: d.hex)
    kept_by_flag = min(only_c, key=lambda d: d.hex)
    # A profile whose trace recorded one of app:2's blobs; a ref naming a non-manifest blob.
    trace = Trace("app", records=[AccessRecord("own/f0", 0.1, 10, digest=recorded.hex)])
    profile, _ = store.call(add_run, "app", trace)  # type: ignore[misc]
    raw = Digest.of(b"not a manifest")

    async def odd_ref(cas: CAS) -> None:
        await cas.put(raw, b"not a manifest")
        await cas.set_ref("odd", raw)

    store.call(odd_ref)
    store.cli("ref", "rm", "app:2")
    store.cli("ref", "rm", "app:3")
    before = store.blobs()
    live = store.manifest_blobs("app:1") | {profile, recorded, raw, kept_by_flag}
    garbage = before - live
    assert garbage and garbage <= only_b | only_c

    young = store.gc("--grace", "1h", "--keep", kept_by_flag.hex)
    assert (young["deleted"], young["young"], young["kept"]) == (0, len(garbage), len(live))
    dry = store.gc("--grace", "0s", "--dry-run", "--keep", kept_by_flag.hex)
    assert dry["deleted"] == len(garbage) and dry["dry_run"] is True
    assert store.blobs() == before
    assert dry["problems"] == [
        {"ref": "odd", "digest": raw.hex, "reason": dry["problems"][0]["reason"]}  # type: ignore[index]
    ]

    done = store.gc("--grace", "0s", "--keep", kept_by_flag.hex)
    assert store.blobs() == live
    assert done["deleted"] == len(garbage) and done["refs"] == 3  # app:1, odd, profiles/app
    assert done["deleted_bytes"] == dry["deleted_bytes"] and done["kept"] == len(live)
    store.cli("cat", "app:1", "own/f1")  # what stays still reads back, verified
    assert store.gc("--grace", "0s", "--keep", kept_by_flag.hex)["deleted"] == 0
    # without the --keep, that blob goes too, and nothing else
    assert store.gc("--grace", "0s")["deleted"] == 1
    assert store.blobs() == live - {kept_by_flag}


def test_gc_keeps_a_profiles_bundle_and_frees_the_one_it_replaced(
    store: Store, tmp_path: Path
) -> None:
    store.pack(_tree(tmp_path / "a", "a"), "app:1")
    store.call(add_run, "app", Trace("app", records=[AccessRecord("own/f0", 0.1, 10)]))
    plan = sorted(store.manifest_blobs("app:1"), key=lambda d: d.hex)[:3]
    old, _ = store.call(refresh_bundle, "app", Digest.of(b"exe 1"), plan)  # type: ignore[misc]
    new, _ = store.call(refresh_bundle, "app", Digest.of(b"exe 2"), plan[:2])  # type: ignore[misc]
    assert old.digest != new.digest
    done = store.gc("--grace", "0s")
    assert done["deleted"] >= 1
    after = store.blobs()
    new_parts, old_parts = {p.digest for p in new.parts}, {p.digest for p in old.parts}
    assert new_parts <= after and not (old_parts - new_parts) & after
    assert store.manifest_blobs("app:1") <= after


def test_gc_spares_a_garbage_blob_a_pack_reuses(store: Store, tmp_path: Path) -> None:
    """A version removed and packed again long after: its blobs are garbage older than the
    grace, the pack finds them stored and uploads nothing, and must refresh them, or a GC
    that reads the refs before the pack's ref lands deletes them. Here the pack sets no ref
    at all, as if that GC ran at that moment."""
    tree = _tree(tmp_path / "t", "t")
    if store.s3 is None:
        grace = "1h"
    else:  # LastModified cannot be set back: let the blobs age past a short refresh age
        store.env[REFRESH_AFTER_ENV] = "2"
        grace = "4s"
    store.pack(tree, "old:1")
    store.cli("ref", "rm", "old:1")
    old = store.blobs()
    if store.s3 is None:
        past = time.time() - 7200
        for path in Path(store.spec, "blobs").rglob("*"):
            if path.is_file():
                os.utime(path, (past, past))
    else:
        time.sleep(8)
    again = store.cli("pack", tree).stdout.decode().strip()  # no ref
    assert Digest.parse(again) in old  # the same manifest: nothing new was uploaded
    assert store.blobs() == old
    report = store.gc("--grace", grace)
    assert report["deleted"] == 0 and report["young"] == len(old)
    assert store.blobs() == old
    assert store.cli("cat", again, "own/f1").stdout == (tree / "own/f1").read_bytes()
    if store.s3 is not None:  # a grace below twice the refresh age is refused, one line
        refused = store.cli("cas", "gc", "--grace", "3s", check=False)
        assert refused.returncode == 2 and len(refused.stderr.splitlines()) == 1
        assert b"at least 4 s" in refused.stderr


class _PackDuringGc:
    """A CAS whose ``list_refs`` first runs a pack's ``find_missing`` of ``reused``: a pack
    reusing garbage after the GC listed the blobs, its ref set after the GC read the refs."""

    def __init__(self, cas: CAS, reused: list[Digest]) -> None:
        self._cas, self._reused = cas, reused

    def __getattr__(self, name: str) -> object:
        return getattr(self._cas, name)

    async def list_refs(self) -> list[str]:
        assert await self._cas.find_missing(self._reused) == set()
        return await self._cas.list_refs()


def test_gc_keeps_a_blob_refreshed_after_its_listing(store: Store, tmp_path: Path) -> None:
    """A blob the first listing shows old and unreached, refreshed by a pack before the GC
    deletes: the second listing sees it young and it stays; the rest of the garbage goes."""
    store.pack(_tree(tmp_path / "t", "t"), "t:1")
    store.cli("ref", "rm", "t:1")
    old = store.blobs()
    if store.s3 is None:
        grace = 3600.0
        past = time.time() - 7200
        for path in Path(store.spec, "blobs").rglob("*"):
            if path.is_file():
                os.utime(path, (past, past))
    else:  # the fixture's packs refresh any blob they reuse
        grace = 1.0
        time.sleep(3)
    reused = min(old, key=lambda d: d.hex)

    async def gc(cas: CAS) -> object:
        wrapped: CAS = _PackDuringGc(cas, [reused])  # type: ignore[assignment]
        return await collect_garbage(wrapped, grace=grace, profile_blobs=profile_blobs)

    report = store.call(gc)
    assert store.blobs() == {reused}
    assert (report.deleted, report.young) == (len(old) - 1, 1)  # type: ignore[attr-defined]


def test_gc_refuses_an_http_cas() -> None:
    proc = run_cli("cas", "gc", "--cas", "http://127.0.0.1:9", check=False)
    assert proc.returncode == 2 and b"against the store itself" in proc.stderr


GRACE_DURING_PACK = 3600.0


async def _gc_once(cas: CAS, grace: float) -> None:
    await collect_garbage(cas, grace=grace, profile_blobs=profile_blobs)


@pytest.mark.slow
def test_gc_during_a_pack_loses_nothing(store: Store, tmp_path: Path) -> None:
    """GCs (grace 1 h, longer than the pack) run while a pack uploads: every blob of the new
    manifest survives and the tree reads back; once its ref is gone, a GC with grace 0 frees
    exactly the blobs only it used."""
    store.pack(_tree(tmp_path / "base", "base"), "base:1")
    tree = _tree(tmp_path / "big", "big")
    for i in range(1500):
        (tree / "own" / f"n{i}").write_bytes(os.urandom(2048 + i))
    pack = subprocess.Popen(
        [sys.executable, "-m", "lazycaf", "pack", tree, "--cas", store.spec, "--tag", "big:1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, **store.env},
    )
    during = 0
    try:
        # GCs back to back in this process (a CLI run would spend most of its time starting)
        while pack.poll() is None:
            store.call(_gc_once, GRACE_DURING_PACK)
            during += pack.poll() is None  # this GC ended before the pack did
    finally:
        out, err = pack.communicate(timeout=120)
    assert pack.returncode == 0, err.decode()
    assert during >= 1, "no GC ran while the pack did"
    store.gc("--grace", "1h")
    new = store.manifest_blobs("big:1")
    assert new <= store.blobs()
    assert store.cli("cat", "big:1", "own/n1499").stdout == (tree / "own/n1499").read_bytes()
    assert len(store.cli("ls", "-R", "big:1").stdout.splitlines()) > 1500

    only_big = new - store.manifest_blobs("base:1")
    before = store.blobs()
    store.cli("ref", "rm", "big:1")
    assert store.gc("--grace", "0s")["deleted"] == len(only_big)
    assert store.blobs() == before - only_big
    assert out.decode().strip() in {d.hex for d in only_big}
