"""``lazycaf diff A B --explain``: both versions of each file whose content changed, fetched
from the CAS (verified), and the causes ``lazycaf.builds.explain`` names for them.

Each pair of contents is explained once, however many hard links show it. Files up to
``MAX_FETCHED`` bytes are fetched whole, eight at a time (one at a time above
``_BIG``); a bigger file is explained by its chunks alone ("bytes": how many chunks differ).
The summary counts the changed entries, and how many of them changed only for causes that
carry no meaning (``MEANINGLESS``: the mtime in the manifest, a ``.pyc`` source mtime,
archive timestamps, ELF build ids).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Final

import trio

from lazycaf.builds.explain import MEANINGLESS, Cause, Explanation, explain
from lazycaf.cas.api import CAS
from lazycaf.cli.readouts import Change, Diff
from lazycaf.core.digest import Digest
from lazycaf.core.manifest import Entry

__all__ = ["MAX_FETCHED", "Explained", "explain_diff"]

MAX_FETCHED: Final = 256 << 20
_BIG: Final = 16 << 20
_SMALL_AT_ONCE: Final = 8


@dataclass(frozen=True)
class Explained:
    """The causes of a diff's content changes, by path, and the summary's figures."""

    diff: Diff
    by_path: dict[str, Explanation]

    def why(self) -> dict[str, str]:
        """The cause text under each changed path (mtime-only entries included)."""
        out = {path: e.text() for path, e in self.by_path.items()}
        for c in self.diff.changed:
            if c.path not in out and c.what == ("mtime",):
                out[c.path] = Explanation((Cause("mtime"),)).text()
        return out

    def figures(self) -> dict[str, object]:
        """Changed entries, those that changed only for causes without meaning, and the
        count of each cause over the files whose content changed."""
        listed_mtime = sum(1 for c in self.diff.changed if c.what == ("mtime",))
        mtime_only = self.diff.mtime_only + listed_mtime
        meaningless = mtime_only + sum(
            1
            for c in self.diff.changed
            if c.path in self.by_path
            and self.by_path[c.path].meaningless
            and all(w.startswith("content") or w == "mtime" for w in c.what)
        )
        by_cause = Counter(cause.kind for e in self.by_path.values() for cause in e.causes)
        by_cause["mtime"] = mtime_only
        return {
            "changed": len(self.diff.changed) + self.diff.mtime_only,
            "content_changed": len(self.by_path),
            "meaningless": meaningless,
            "by_cause": {k: n for k, n in sorted(by_cause.items()) if n},
        }

    def summary(self) -> str:
        f = self.figures()
        by_cause = f["by_cause"]
        assert isinstance(by_cause, dict)
        causes = ", ".join(f"{k} {n}" for k, n in by_cause.items())
        return (
            f"explained: {f['changed']} changed entries ({f['content_changed']} in content), "
            f"{f['meaningless']} of them only for causes that carry no meaning"
            + (f"; causes: {causes}" if causes else "")
        )

    def to_json(self) -> dict[str, object]:
        doc = self.diff.to_json()
        why = {p: e for p, e in self.by_path.items()}
        changed = doc["changed"]
        assert isinstance(changed, list)
        for item in changed:
            e = why.get(item["path"])
            if e is None and item["what"] == ["mtime"]:
                e = Explanation((Cause("mtime"),))
            if e is not None:
                item["causes"] = [
                    {"kind": c.kind, "text": c.text(), "meaningless": c.kind in MEANINGLESS}
                    for c in e.causes
                ]
        summary = doc["summary"]
        assert isinstance(summary, dict)
        summary["explained"] = self.figures()
        return doc


async def explain_diff(cas: CAS, diff: Diff) -> Explained:
    """Fetch and explain every content change of ``diff``."""
    pairs: dict[tuple[Digest, Digest], list[Change]] = {}
    for c in diff.changed:
        if c.content_changed:
            assert c.old is not None and c.new is not None
            assert c.old.digest is not None and c.new.digest is not None
            pairs.setdefault((c.old.digest, c.new.digest), []).append(c)
    done: dict[tuple[Digest, Digest], Explanation] = {}
    small, big = trio.CapacityLimiter(_SMALL_AT_ONCE), trio.CapacityLimiter(1)

    async def one(key: tuple[Digest, Digest], c: Change) -> None:
        assert c.old is not None and c.new is not None
        size = max(c.old.size, c.new.size)
        if size > MAX_FETCHED:
            done[key] = Explanation((Cause("bytes", _chunk_detail(c.old, c.new)),))
            return
        async with big if size > _BIG else small:
            a = await _content(cas, c.old)
            b = await _content(cas, c.new)
            done[key] = await trio.to_thread.run_sync(explain, a, b)

    async with trio.open_nursery() as nursery:
        for key, changes in pairs.items():
            nursery.start_soon(one, key, changes[0])
    by_path = {c.path: done[key] for key, changes in pairs.items() for c in changes}
    return Explained(diff, by_path)


async def _content(cas: CAS, entry: Entry) -> bytes:
    """A file's bytes from the CAS, each blob verified by ``get``."""
    parts = [await cas.get(d) for d in entry.blob_digests()]
    return parts[0] if len(parts) == 1 else b"".join(parts)


def _chunk_detail(a: Entry, b: Entry) -> str:
    n = max(len(a.chunks), len(b.chunks), 1)
    differ = sum(
        1
        for i in range(n)
        if i >= len(a.chunks) or i >= len(b.chunks) or a.chunks[i] != b.chunks[i]
    )
    return f"{differ} of {n} chunks differ; not fetched: over {MAX_FETCHED >> 20} MiB"
