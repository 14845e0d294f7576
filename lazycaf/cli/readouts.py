"""Ops read-outs over manifests (pure): ``ls -l`` lines and diffs between two builds."""

from __future__ import annotations

import json
import stat
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

from lazycaf.cli.columns import Columns, changed_pairs, new_blob_bytes
from lazycaf.core.chunking import chunk_spans
from lazycaf.core.manifest import DIR, FILE, HARDLINK, SYMLINK, Entry, Manifest, decode_columns
from lazycaf.core.nogc import paused_gc

__all__ = ["Diff", "diff_manifests", "entry_json", "format_ls", "link_counts"]


_KIND_NAMES = {DIR: "dir", FILE: "file", SYMLINK: "symlink", HARDLINK: "hardlink"}


def link_counts(manifest: Manifest) -> dict[str, int]:
    """``st_nlink`` of every path: hard-link group sizes, and 2 + subdirectories for dirs."""
    groups = Counter(e.target or e.path for e in manifest.entries if e.kind in (FILE, HARDLINK))
    subdirs = Counter(e.path.rpartition("/")[0] for e in manifest.entries if e.kind == DIR)
    out: dict[str, int] = {"": 2 + subdirs[""]}
    for e in manifest.entries:
        if e.kind == DIR:
            out[e.path] = 2 + subdirs[e.path]
        elif e.kind in (FILE, HARDLINK):
            out[e.path] = groups[e.target or e.path]
        else:
            out[e.path] = 1
    return out


def _mtime_text(ns: int) -> str:
    secs, frac = divmod(ns, 1_000_000_000)
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(secs)) + f".{frac:09d}"


def format_ls(entry: Entry, nlink: int, name: str | None = None) -> str:
    """One ``ls -l --full-time`` style line (UTC)."""
    line = (
        f"{stat.filemode(entry.st_mode)} {nlink:3d} {entry.size:>12d} "
        f"{_mtime_text(entry.mtime_ns)} {name if name is not None else entry.path}"
    )
    if entry.kind == SYMLINK:
        line += f" -> {entry.target}"
    return line


def entry_json(entry: Entry, nlink: int) -> str:
    record: dict[str, object] = {
        "path": entry.path,
        "kind": _KIND_NAMES[entry.kind],
        "mode": entry.mode,
        "mtime_ns": entry.mtime_ns,
        "size": entry.size,
        "nlink": nlink,
    }
    if entry.digest is not None:
        record["digest"] = entry.digest.hex
        record["chunks"] = len(entry.chunks)
    if entry.target is not None:
        record["target"] = entry.target
    return json.dumps(record, sort_keys=True)


@dataclass(frozen=True)
class Change:
    """One path present in both manifests whose entry differs.

    ``content_of`` names the file whose bytes this entry shows in the second manifest: the
    path itself, or for a hard link the first path of its inode group. Totals count the
    changed bytes of each such file once, however many links show them.
    """

    path: str
    what: tuple[str, ...]
    bytes_differ: int
    content_of: str = ""
    # the two entries (for ``diff --explain``; not part of what a change is)
    old: Entry | None = field(default=None, compare=False, repr=False)
    new: Entry | None = field(default=None, compare=False, repr=False)

    @property
    def content_changed(self) -> bool:
        return (
            self.old is not None
            and self.new is not None
            and self.old.digest is not None
            and self.new.digest is not None
            and self.old.digest != self.new.digest
        )


@dataclass(frozen=True)
class Diff:
    added: list[Entry]
    removed: list[Entry]
    changed: list[Change]
    new_blob_bytes: int
    mtime_only: int = 0  # entries whose only change is their mtime, not in ``changed``

    def totals(self) -> dict[str, int]:
        """The summary's figures: counts, file bytes added and removed, changed bytes (each
        content once however many links show it), bytes of blobs new in the second."""
        per_content: dict[str, int] = {}
        for c in self.changed:
            key = c.content_of or c.path
            per_content[key] = max(per_content.get(key, 0), c.bytes_differ)
        return {
            "added": len(self.added),
            "added_bytes": sum(e.size for e in self.added if e.kind == FILE),
            "removed": len(self.removed),
            "removed_bytes": sum(e.size for e in self.removed if e.kind == FILE),
            "changed": len(self.changed),
            "changed_bytes": sum(per_content.values()),
            "new_blob_bytes": self.new_blob_bytes,
            "mtime_only": self.mtime_only,
        }

    def lines(self, why: Mapping[str, str] | None = None) -> list[str]:
        """One line per entry, then the summary; ``why``: a cause under a changed path."""
        why = why or {}
        out = [f"+ {e.path} ({e.size} bytes)" for e in self.added]
        out += [f"- {e.path} ({e.size} bytes)" for e in self.removed]
        out += [
            f"M {c.path} ({', '.join(c.what)})"
            + (f"\n    why: {why[c.path]}" if c.path in why else "")
            for c in self.changed
        ]
        out.sort(key=lambda line: line[2:])
        t = self.totals()
        out.append(
            f"{t['added']} added ({t['added_bytes']} bytes), {t['removed']} removed "
            f"({t['removed_bytes']} bytes), {t['changed']} changed ({t['changed_bytes']} "
            f"bytes differ); {t['new_blob_bytes']} bytes of blobs new in the second"
            + (
                f"; {self.mtime_only} more changed only their mtime (--mtimes lists them)"
                if self.mtime_only
                else ""
            )
        )
        return out

    def to_json(self) -> dict[str, object]:
        """What ``diff --json`` prints: each list sorted by path, and ``summary``."""

        def entry(e: Entry) -> dict[str, object]:
            return {"path": e.path, "kind": _KIND_NAMES[e.kind], "size": e.size}

        return {
            "added": [entry(e) for e in sorted(self.added, key=lambda e: e.path)],
            "removed": [entry(e) for e in sorted(self.removed, key=lambda e: e.path)],
            "changed": [
                {"path": c.path, "what": list(c.what), "bytes_differ": c.bytes_differ}
                for c in sorted(self.changed, key=lambda c: c.path)
            ],
            "summary": self.totals(),
        }


def _changed_bytes(a: Entry, b: Entry, chunk_size: int) -> int:
    if a.digest == b.digest:
        return 0
    if a.chunks and b.chunks:
        spans = chunk_spans(b.size, chunk_size)
        differ = sum(
            length
            for i, (_, length) in enumerate(spans)
            if i >= len(a.chunks) or a.chunks[i] != b.chunks[i]
        )
        return differ + max(0, a.size - b.size)
    return max(a.size, b.size)


def _what_changed(a: Entry, b: Entry, chunk_size: int) -> tuple[str, ...]:
    what = []
    if a.kind != b.kind:
        what.append(f"kind {a.kind}->{b.kind}")
    if a.digest != b.digest:
        what.append(f"content {a.size}->{b.size} bytes, {_changed_bytes(a, b, chunk_size)} differ")
    if a.mode != b.mode:
        what.append(f"mode {a.mode:o}->{b.mode:o}")
    if a.target != b.target:
        what.append(f"target {a.target!r}->{b.target!r}")
    if a.mtime_ns != b.mtime_ns:
        what.append("mtime")
    return tuple(what)


def diff_manifests(a: Manifest | Columns, b: Manifest | Columns, *, mtimes: bool = True) -> Diff:
    """What changed from ``a`` to ``b``. Columns are compared whole (``changed_pairs``);
    entries are made only for the paths that differ. ``mtimes=False``: entries whose only
    change is their mtime (every entry of a fresh build) are counted, not listed."""
    ca = a if isinstance(a, Columns) else Columns(decode_columns(a.encode()))
    cb = b if isinstance(b, Columns) else Columns(decode_columns(b.encode()))
    with paused_gc():  # whole-column work makes many short-lived tuples; none form cycles
        return _diff(ca, cb, mtimes=mtimes)


def _diff(ca: Columns, cb: Columns, *, mtimes: bool) -> Diff:
    removed_i, added_i, pairs, mtime_only = changed_pairs(ca, cb, mtimes=mtimes)
    changed = []
    news_kept: list[Entry] = []
    if pairs:
        olds = ca.entries(i for i, _ in pairs)
        news = cb.entries(j for _, j in pairs)
        for ea, eb in zip(olds, news, strict=True):
            news_kept.append(eb)
            what = _what_changed(ea, eb, cb.c.chunk_size)
            if what:
                p = eb.path
                content_of = eb.target if eb.kind == HARDLINK and eb.target else p
                differ = _changed_bytes(ea, eb, cb.c.chunk_size)
                changed.append(Change(p, what, differ, content_of, ea, eb))
    added = list(cb.entries(added_i))
    removed = list(ca.entries(removed_i))
    touched = [*news_kept, *added]
    return Diff(added, removed, changed, new_blob_bytes(ca, cb, touched), mtime_only)
