"""What a mount with a profile asks the daemon for (``MountProfile``), against a client that
records the requests: the hot set's plan goes once, and what the profile's own bundle asked
for already is not asked for again (the daemon would read the cached ones into the page
cache a second time)."""

from __future__ import annotations

from pathlib import Path

from lazycaf.cas.bundle import Bundle, Part
from lazycaf.core.digest import Digest
from lazycaf.core.manifest import DIR, FILE, Entry, Manifest
from lazycaf.core.manifestindex import ManifestIndex
from lazycaf.host.paths import CacheLayout
from lazycaf.mount.recording import MountProfile
from lazycaf.traces.trace import AccessRecord, Profile, Trace

FILES = {f"pkg/m{i}.py": f"module {i}\n".encode() for i in range(4)}
DIGESTS = {p: Digest.of(b) for p, b in FILES.items()}


class _Client:
    """The requests a mount makes of its daemon, recorded."""

    def __init__(self) -> None:
        self.prefetched: list[list[Digest]] = []
        self.bundles: list[list[tuple[Digest, list[Digest]]]] = []

    async def prefetch(self, digests: list[Digest]) -> int:
        self.prefetched.append(list(digests))
        return len(digests)

    async def prefetch_bundle(self, parts: list[tuple[Digest, list[Digest]]]) -> int:
        self.bundles.append(parts)
        return sum(len(blobs) for _, blobs in parts)


def _mounted(tmp_path: Path, bundle_queued: int | None) -> tuple[MountProfile, _Client]:
    entries = [Entry("pkg", DIR, 0o755, 0, 0)]
    entries += [Entry(p, FILE, 0o644, 0, len(FILES[p]), DIGESTS[p]) for p in FILES]
    data = Manifest(entries).encode()
    executable = Digest.of(data)
    run = Trace(executable.hex, 0.0, [AccessRecord(p, 0.1 * i) for i, p in enumerate(FILES)])
    profile = Profile("app", [run])
    in_bundle = tuple(DIGESTS[p] for p in list(FILES)[:3])  # the last file came later
    profile.bundle = Bundle((Part(Digest.of(b"part"), in_bundle, 100),))
    profile.bundle_for = executable.hex
    client = _Client()
    mount = MountProfile(
        client,  # type: ignore[arg-type]  # the requests are all it needs
        ManifestIndex.build(data),
        executable,
        CacheLayout(tmp_path / "cache"),
        name="app",
        profile=profile,
        bundle_queued=bundle_queued,
    )
    return mount, client


async def test_the_plan_after_its_own_bundle_asks_only_for_what_the_bundle_lacks(
    tmp_path: Path,
) -> None:
    mount, client = _mounted(tmp_path, bundle_queued=3)
    await mount.queue_hot_set()  # the bundle went before the manifest index: nothing yet
    assert client.prefetched == [] and client.bundles == []
    assert set(DIGESTS.values()) - mount.prefetched == {DIGESTS["pkg/m3.py"]}
    await mount._queue_plan()  # what run() does once the mount is up
    assert client.prefetched == [[DIGESTS["pkg/m3.py"]]]
    assert mount.prefetched == set(DIGESTS.values())


async def test_without_its_bundle_asked_the_plan_goes_through_it_once(tmp_path: Path) -> None:
    mount, client = _mounted(tmp_path, bundle_queued=None)
    await mount.queue_hot_set()  # before the mount is ready: bundle, then the rest
    ((part, blobs),) = client.bundles[0]
    assert part == Digest.of(b"part") and blobs == [DIGESTS[p] for p in list(FILES)[:3]]
    assert client.prefetched == [[DIGESTS["pkg/m3.py"]]]


def test_the_lookups_ahead_stay_below_the_mountpoint(tmp_path: Path) -> None:
    """A profile is data from the store: a hot path that is absolute or climbs out with
    ``..`` is never looked up (the mount runs as root)."""
    import threading

    from lazycaf.mount.lookupwarm import warm_lookups

    mnt = tmp_path / "mnt"
    (mnt / "pkg").mkdir(parents=True)
    (mnt / "pkg/a.py").write_text("x")
    (tmp_path / "outside").write_text("x")
    paths = ["pkg/a.py", "pkg/missing.py", str(tmp_path / "outside"), "../outside", "pkg/../.."]
    assert warm_lookups(str(mnt), paths, threading.Event()) == 1
    stop = threading.Event()
    stop.set()
    assert warm_lookups(str(mnt), paths, stop) == 0
