"""Compare LazyCAF side by side with what users run today, on one shaped link, in one run.

One executable (the sample: a relocatable Python 3.11 with numpy, scipy and pandas, built by
``scripts/build_sample.py``), three start-up workloads (``import numpy``, ``import pandas`` and
a short script that touches more of the tree), and per network profile of
``scripts/netsim.py`` (``1gbit``: 1 Gbit/s, ~1 ms RTT; ``100mbit``: 100 Mbit/s, ~10 ms RTT) a
client network namespace behind tbf and the delay-line proxy, with every server (nginx, the
LazyCAF CAS) in the root namespace on 127.0.0.1, reached through the proxy. Systems:

- ``native``: the tree on local disk (the floor; no network);
- ``xar``: XAR-like: the tree as one zstd squashfs image (``mksquashfs -comp zstd``), downloaded
  whole from nginx with curl, mounted with ``squashfuse``, run;
- ``tarball``: a ``tar.zst`` streamed from nginx through ``zstd -d | tar -x``, run;
- ``casync``: ``casync make`` into a chunk store served by nginx; the client downloads the
  index, ``casync mount --store=http://...`` (lazy; casync mounts keep no chunk cache), run;
- ``lazycaf``, ``lazycaf-profile``: a fresh host cache on a Btrfs loop image and a fresh
  fetcher daemon in the namespace (started before the clock, as a host's daemon would be),
  ``lazycaf mount`` of the ref then the run; without a profile (a scratch profile name no
  run recorded) and with the workload's profile (recorded once beforehand, its ref reset to
  that recording before every run);
- ``lazycaf-peers``: not measured here (one client behind one link cannot model a LAN peer
  beside a remote CAS); ``scripts/bench_peers.py`` measures peers with 8 client namespaces.

Cold: page cache dropped and nothing on the client (a fresh download dir, mount or cache);
timed from the first client action (download or mount) to the workload's exit. Warm: the
workload again, right after, with everything in place (for LazyCAF once background fetching
has settled). Bytes over the link: the veth's rx+tx counters (Ethernet frames, both
directions) during the timed window; for LazyCAF also once background fetching settled.
Bytes to client disk: allocated bytes of what the client wrote (image, extracted tree, index,
host cache). "Reads": what the workload reads from storage on a native cold start
(``read_bytes`` of ``/proc/self/io`` at its end), the yardstick for bytes over the link.

Every figure is the median of ``--runs`` runs (default 3) taken in this one invocation, the
systems interleaved in an order that rotates from run to run; a system whose start took longer
than ``--slow-after`` seconds (default 45: casync over 100 Mbit/s) runs once per workload.

Update scenario (on the ``--update-profiles``, default ``100mbit``, the profile the issue's
targets are set on; the workload ``pandas``, else the first one): version 2 edits 10
``.py`` files that the workload imports (their ``.pyc`` recompiled) and appends 4 KiB to one
extension module below 1 MiB that it loads (one blob for LazyCAF, so it is refetched whole, as
a rebuilt library would be). Publish, from a build host in the namespace (timed; bytes over
the link): ``lazycaf pack --cas http://...`` (uploads what the CAS lacks); ``mksquashfs`` then
an HTTP PUT of the image to nginx (WebDAV); ``tar | zstd`` then a PUT; ``casync make`` into
the publisher's copy of the store then one PUT of a tar of the new chunks and the index.
Update start, on a host that ran version 1 (for LazyCAF: the v1 run's host cache, profile
prefetch of v2 by path; the other systems keep nothing that helps: a new image, a new
tarball, a casync mount has no cache), page cache dropped, timed as a cold start.

Writes ``results.md``, ``results.json`` and PNG plots under ``--out`` (default
``results/compare``). Installs what it lacks (Debian: nginx-light, casync, squashfuse,
squashfs-tools, zstd, curl; PyPI: matplotlib into this venv), skipping what is present.
Everything it made -- mounts, namespaces, nginx, servers, daemons, the loop image, temp dirs --
is removed in ``finally`` blocks, also on Ctrl-C and SIGTERM; leftovers are reported.

Usage: python -m scripts.compare [--quick] [--runs N] [--profiles 1gbit,100mbit]
       [--workloads numpy,pandas,script] [--systems ...] [--parts cold,update]
       [--update-profiles 100mbit] [--slow-after S] [--out DIR] [--sample DIR]
       [--tmpdir DIR] [--no-install]
       python -m scripts.compare --render results/compare/results.json [--out DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import random
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final

from scripts import bench_prefetch as bp
from scripts import netsim
from scripts.harness import (
    REPO,
    BenchError,
    Figure,
    Lazycaf,
    Load,
    Machine,
    Made,
    Record,
    btrfs_image,
    cleanup,
    cleanup_mounts,
    drop_caches,
    du,
    fs_of,
    http_get,
    http_put,
    is_mounted,
    load_line,
    md_row,
    packages,
    progress,
    python_env,
    run,
    stop_process,
    tail,
    timed,
    unwind_on_sigterm,
    write_results,
)

DEFAULT_SAMPLE: Final = REPO / "build" / "sample-full"
DEFAULT_OUT: Final = REPO / "results" / "compare"
SAMPLE_PACKAGES: Final = ("numpy", "scipy", "pandas")
REF_V1: Final = bp.REF  # "sample:v1"
MB: Final = 1e6
CMD_TIMEOUT_S: Final = 600.0
MOUNT_WAIT_S: Final = 60.0
SLOW_AFTER_S: Final = 45.0  # casync mount over 100 Mbit/s: one run takes minutes per workload
EDITED_PY: Final = 10
SO_LIMIT: Final = 1 << 20  # the edited extension module stays one LazyCAF blob
SO_APPEND: Final = 4096

SCRIPT: Final = """\
import numpy as np, pandas as pd, scipy.linalg, scipy.optimize, scipy.sparse, scipy.stats
import json, csv, decimal, sqlite3, email.parser, xml.etree.ElementTree
a = np.random.default_rng(0).random((200, 200))
scipy.linalg.inv(a + 200 * np.eye(200))
df = pd.DataFrame(a[:, :5], columns=list("abcde"))
df.groupby((df.a * 4).astype(int)).mean().to_json()
scipy.optimize.minimize(lambda x: ((x - 1) ** 2).sum(), np.zeros(3))
scipy.stats.norm.cdf(0.5)
scipy.sparse.random(100, 100, density=0.01, random_state=0).tocsr()
"""
#: workload name -> the code given to ``python -c``
WORKLOADS: Final[dict[str, str]] = {
    "numpy": "import numpy",
    "pandas": "import pandas",
    "script": SCRIPT,
}
#: system name -> label in tables and plots, in display order
SYSTEMS: Final[dict[str, str]] = {
    "native": "native disk",
    "xar": "XAR-like (squashfs download)",
    "tarball": "tarball (tar.zst download)",
    "casync": "casync mount",
    "lazycaf": "LazyCAF, no profile",
    "lazycaf-profile": "LazyCAF, with profile",
    "lazycaf-peers": "LazyCAF, with peers",
}
#: systems with no runner yet -> what the table says instead of figures
NOT_YET: Final[dict[str, str]] = {"lazycaf-peers": "see scripts/bench_peers.py"}
UPDATE_LABELS: Final = {
    "lazycaf": "LazyCAF (pack; start with profile)",
    "lazycaf-profile": "LazyCAF (pack; start with profile)",
}
UPDATE_STARTERS: Final = ("xar", "tarball", "casync", "lazycaf-profile")
PARTS: Final = ("cold", "update")
TARGET_PROFILE: Final = "100mbit"
QUICK: Final[dict[str, Any]] = {
    "runs": 1,
    "profiles": "100mbit",
    "workloads": "numpy",
    "parts": "cold",
}
DEBIAN_TOOLS: Final[dict[str, str]] = {  # command -> Debian package
    "nginx": "nginx-light",
    "casync": "casync",
    "squashfuse": "squashfuse",
    "mksquashfs": "squashfs-tools",
    "zstd": "zstd",
    "curl": "curl",
    "mkfs.btrfs": "btrfs-progs",
    "nsenter": "util-linux",
    "fusermount3": "fuse3",
}


say = progress("compare")


# ============================================================================================
# Results: plain records, aggregation, tables, targets (pure: tested without a network)


@dataclass(frozen=True)
class Sample:
    """One measurement. ``phase``: cold (a start), publish, or update (start of v2)."""

    phase: str
    profile: str
    workload: str
    system: str
    run: int
    total_s: float
    warm_s: float | None = None
    link_bytes: int | None = None
    disk_bytes: int | None = None
    parts: dict[str, float] = field(default_factory=dict)


@dataclass
class Results:
    samples: list[Sample] = field(default_factory=list)
    reads: dict[str, int] = field(default_factory=dict)  # workload -> bytes, native cold
    facts: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    profiles: list[str] = field(default_factory=list)
    workloads: list[str] = field(default_factory=list)
    systems: list[str] = field(default_factory=list)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Results:
        """The inverse of ``to_json`` (derived fields are recomputed, not read)."""
        samples = [Sample(**s) for s in data["samples"]]
        keys = ("reads", "facts", "notes", "profiles", "workloads", "systems")
        return cls(samples, **{k: data[k] for k in keys})

    def to_json(self) -> dict[str, Any]:
        return {
            "samples": [asdict(s) for s in self.samples],
            "reads": self.reads,
            "facts": self.facts,
            "notes": self.notes,
            "profiles": self.profiles,
            "workloads": self.workloads,
            "systems": self.systems,
            "medians": [
                {"phase": k[0], "profile": k[1], "workload": k[2], "system": k[3], **asdict(c)}
                for k, c in aggregate(self.samples).items()
            ],
            "targets": [asdict(t) for t in evaluate_targets(self)],
        }


@dataclass(frozen=True)
class Cell:
    """Medians of the samples of one (phase, profile, workload, system)."""

    runs: int
    total_s: float
    warm_s: float | None
    link_bytes: float | None
    disk_bytes: float | None
    parts: dict[str, float]


Key = tuple[str, str, str, str]


def _median(xs: Sequence[float | None]) -> float | None:
    vals = [x for x in xs if x is not None]
    return statistics.median(vals) if vals else None


def aggregate(samples: Sequence[Sample]) -> dict[Key, Cell]:
    groups: dict[Key, list[Sample]] = {}
    for s in samples:
        groups.setdefault((s.phase, s.profile, s.workload, s.system), []).append(s)
    cells = {}
    for key, group in groups.items():
        names = sorted({p for s in group for p in s.parts})
        parts = {n: statistics.median([s.parts[n] for s in group if n in s.parts]) for n in names}
        cells[key] = Cell(
            runs=len(group),
            total_s=statistics.median([s.total_s for s in group]),
            warm_s=_median([s.warm_s for s in group]),
            link_bytes=_median([s.link_bytes for s in group]),
            disk_bytes=_median([s.disk_bytes for s in group]),
            parts=parts,
        )
    return cells


def fmt_s(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f} s" if x >= 0.995 else f"{x:.3f} s"


def fmt_mb(x: float | None) -> str:
    return "-" if x is None else f"{x / MB:.1f} MB"


def fmt_x(num: float | None, den: float | None) -> str:
    """``num / den`` as a speed-up factor ("4.2x"), "-" when either is missing."""
    return "-" if num is None or den is None or den <= 0 else f"{num / den:.1f}x"


def cold_table(res: Results, cells: dict[Key, Cell], profile: str) -> list[str]:
    lines = [
        md_row(
            "workload",
            "system",
            "cold: time to end",
            "warm",
            "XAR-like / this",
            "bytes over the link",
            "bytes to client disk",
            "runs",
        ),
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for wl in res.workloads:
        xar = cells.get(("cold", profile, wl, "xar"))
        for system in res.systems:
            if system in NOT_YET:
                continue
            c = cells.get(("cold", profile, wl, system))
            if c is None:
                continue
            link = fmt_mb(c.link_bytes)
            settled = c.parts.get("link_bytes_settled")
            if settled is not None and c.link_bytes is not None and settled > c.link_bytes:
                link += f" ({fmt_mb(settled)} once settled)"
            lines.append(
                md_row(
                    wl,
                    SYSTEMS[system],
                    fmt_s(c.total_s),
                    fmt_s(c.warm_s),
                    fmt_x(xar.total_s if xar else None, c.total_s),
                    link,
                    fmt_mb(c.disk_bytes),
                    str(c.runs),
                )
            )
    for system, why in NOT_YET.items():
        if system in res.systems:
            lines.append(md_row("all", SYSTEMS[system], why, *["-"] * 5))
    return lines


def update_table(res: Results, cells: dict[Key, Cell], profile: str) -> list[str]:
    lines = [
        md_row(
            "system",
            "publish v2",
            "publish: bytes over the link",
            "XAR-like / this",
            "start v2 after v1",
            "start: bytes over the link",
            "start: bytes to disk",
            "XAR-like / this",
        ),
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    pub = {s: c for (ph, p, _, s), c in cells.items() if ph == "publish" and p == profile}
    upd = {s: c for (ph, p, _, s), c in cells.items() if ph == "update" and p == profile}
    order = [s for s in SYSTEMS if s in pub or s in upd]
    for system in order:
        p, u = pub.get(system), upd.get(system)
        if system == "lazycaf" and "lazycaf-profile" in upd:
            u = upd["lazycaf-profile"]  # one LazyCAF row: pack, then start with its profile
        elif system == "lazycaf-profile" and "lazycaf" in pub:
            continue
        lines.append(
            md_row(
                UPDATE_LABELS.get(system, SYSTEMS[system]),
                fmt_s(p.total_s if p else None),
                fmt_mb(p.link_bytes if p else None),
                fmt_x(pub["xar"].total_s if "xar" in pub else None, p.total_s if p else None),
                fmt_s(u.total_s if u else None),
                fmt_mb(u.link_bytes if u else None),
                fmt_mb(u.disk_bytes if u else None),
                fmt_x(upd["xar"].total_s if "xar" in upd else None, u.total_s if u else None),
            )
        )
    return lines


@dataclass(frozen=True)
class Target:
    what: str
    measured: str
    met: bool | None  # None: not measured in this run


def _ratio(num: Cell | None, den: Cell | None) -> float | None:
    if num is None or den is None or den.total_s <= 0:
        return None
    return num.total_s / den.total_s


def evaluate_targets(res: Results, profile: str = TARGET_PROFILE) -> list[Target]:
    """The issue's targets on ``profile``: a verdict each, None where not measured."""
    cells = aggregate(res.samples)

    def get(phase: str, system: str, wl: str = "") -> Cell | None:
        if phase in ("publish", "update"):
            return next(
                (
                    c
                    for (ph, p, _, s), c in cells.items()
                    if ph == phase and p == profile and s == system
                ),
                None,
            )
        return cells.get((phase, profile, wl, system))

    out = []
    for wl in res.workloads:
        lz = get("cold", "lazycaf-profile", wl)
        r = _ratio(get("cold", "xar", wl), lz)
        out.append(
            Target(
                f"{wl}: cold start with profile >= 4x faster than XAR-like",
                "-" if r is None else f"{r:.1f}x",
                None if r is None else r >= 4,
            )
        )
        r = _ratio(get("cold", "casync", wl), lz)
        out.append(
            Target(
                f"{wl}: cold start with profile faster than casync mount",
                "-" if r is None else f"{r:.1f}x",
                None if r is None else r > 1,
            )
        )
        reads = res.reads.get(wl)
        link = lz.link_bytes if lz else None
        share = None if not reads or link is None else link / reads
        out.append(
            Target(
                f"{wl}: bytes over the link (cold, with profile) <= 1.5x the bytes read",
                "-" if share is None else f"{fmt_mb(link)} / {fmt_mb(reads)} = {share:.2f}x",
                None if share is None else share <= 1.5,
            )
        )
    for phase, system, what in (
        ("publish", "lazycaf", "update publish >= 5x faster than XAR-like"),
        ("update", "lazycaf-profile", "update start >= 5x faster than XAR-like"),
    ):
        r = _ratio(get(phase, "xar"), get(phase, system))
        out.append(Target(what, "-" if r is None else f"{r:.1f}x", None if r is None else r >= 5))
    return out


def render_markdown(res: Results) -> str:
    cells = aggregate(res.samples)
    out = ["# LazyCAF side by side (scripts/compare.py)", ""]
    out += [f"- {fact}" for fact in res.facts]
    if res.reads:
        out += ["", "Bytes each workload reads from storage on a native cold start:", ""]
        out += [f"- {wl}: {fmt_mb(n)}" for wl, n in res.reads.items()]
    for profile in res.profiles:
        rate, rtt = netsim.PROFILES.get(profile, (0.0, 0.0))
        out += ["", f"## {profile}: {rate:g} Mbit/s, {rtt:g} ms RTT", ""]
        if any(k[0] == "cold" and k[1] == profile for k in cells):
            out += ["### Cold and warm starts (medians)", "", *cold_table(res, cells, profile)]
        if any(k[0] in ("publish", "update") and k[1] == profile for k in cells):
            out += ["", "### Update to v2 (medians)", "", *update_table(res, cells, profile)]
    targets = evaluate_targets(res)
    if any(t.met is not None for t in targets):
        out += ["", f"## The issue's targets ({TARGET_PROFILE})", ""]
        out += [md_row("target", "measured", "met?"), "|---|---:|---|"]
        verdict = {True: "yes", False: "**NO**", None: "not measured"}
        out += [md_row(t.what, t.measured, verdict[t.met]) for t in targets]
    if res.notes:
        out += ["", "## Notes", ""]
        out += [f"- {note}" for note in res.notes]
    return "\n".join(out) + "\n"


# ============================================================================================
# Plots (matplotlib, Agg; imported when used: it is installed by this script)


def write_plots(res: Results, out: Path) -> list[Path]:
    """cold_start.png, link_bytes.png and (with the update part) update.png in ``out``."""
    matplotlib: Any = importlib.import_module("matplotlib")
    matplotlib.use("Agg")
    plt: Any = importlib.import_module("matplotlib.pyplot")
    cells = aggregate(res.samples)

    def profiles(*phases: str) -> list[str]:
        return [p for p in res.profiles if any(k[0] in phases and k[1] == p for k in cells)]

    written = []
    if cold := profiles("cold"):
        written.append(_plot_cold(plt, res, cells, cold, "cold", out / "cold_start.png"))
        written.append(_plot_cold(plt, res, cells, cold, "link", out / "link_bytes.png"))
    if update := profiles("publish", "update"):
        written.append(_plot_update(plt, cells, update, out / "update.png"))
    return written


def _plot_cold(
    plt: Any, res: Results, cells: dict[Key, Cell], profiles: list[str], kind: str, path: Path
) -> Path:
    """Grouped bars per workload, one bar per system: seconds (kind "cold") or link MB."""
    fig, axes = plt.subplots(1, len(profiles), figsize=(6.5 * len(profiles), 4.5), squeeze=False)
    systems = [s for s in res.systems if s not in NOT_YET and (kind == "cold" or s != "native")]
    width = 0.8 / max(1, len(systems))
    for ax, profile in zip(axes[0], profiles, strict=True):
        for i, system in enumerate(systems):
            xs, ys, warm = [], [], []
            for j, wl in enumerate(res.workloads):
                c = cells.get(("cold", profile, wl, system))
                if c is None or (kind == "link" and c.link_bytes is None):
                    continue
                xs.append(j + (i - (len(systems) - 1) / 2) * width)
                ys.append(c.total_s if kind == "cold" else (c.link_bytes or 0) / MB)
                if kind == "cold" and c.warm_s is not None:
                    warm.append((xs[-1], c.warm_s))
            ax.bar(xs, ys, width, label=SYSTEMS[system], color=f"C{list(SYSTEMS).index(system)}")
            if warm:
                ax.plot(*zip(*warm, strict=True), "k_", ms=10, label="warm" if i == 0 else None)
        if kind == "link":
            for j, wl in enumerate(res.workloads):
                if wl in res.reads:
                    label = "bytes the workload reads" if j == 0 else None
                    ax.hlines(
                        res.reads[wl] / MB,
                        j - 0.45,
                        j + 0.45,
                        colors="black",
                        linestyles="dashed",
                        label=label,
                    )
        ax.set_xticks(range(len(res.workloads)), res.workloads)
        ax.set_yscale("log")
        ax.set_ylabel("time to workload end (s)" if kind == "cold" else "bytes over the link (MB)")
        rate, rtt = netsim.PROFILES.get(profile, (0.0, 0.0))
        what = "cold start" if kind == "cold" else "bytes over the link, cold start"
        ax.set_title(f"{what}: {rate:g} Mbit/s, {rtt:g} ms RTT")
        ax.grid(axis="y", alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_update(plt: Any, cells: dict[Key, Cell], profiles: list[str], path: Path) -> Path:
    """Publish v2 and start v2 after v1: bars per system, per profile."""
    fig, axes = plt.subplots(1, len(profiles), figsize=(6.5 * len(profiles), 4.5), squeeze=False)
    for ax, profile in zip(axes[0], profiles, strict=True):
        seen: set[str] = set()
        for i, phase in enumerate(("publish", "update")):
            found = sorted(
                ((s, c) for (ph, p, _, s), c in cells.items() if ph == phase and p == profile),
                key=lambda sc: list(SYSTEMS).index(sc[0]),
            )
            for k, (system, c) in enumerate(found):
                if system.startswith("lazycaf"):  # pack, then a start with the profile
                    system = "lazycaf-profile"
                n = list(SYSTEMS).index(system)
                label = None if system in seen else UPDATE_LABELS.get(system, SYSTEMS[system])
                seen.add(system)
                x = i + (k - (len(found) - 1) / 2) * 0.2
                ax.bar(x, c.total_s, 0.2, color=f"C{n}", label=label)
                ax.annotate(
                    f"{c.total_s:.1f}", (x, c.total_s), ha="center", va="bottom", fontsize=7
                )
        ax.set_xticks([0, 1], ["publish v2", "start v2 on a host that ran v1"])
        ax.set_ylabel("seconds")
        rate, rtt = netsim.PROFILES.get(profile, (0.0, 0.0))
        ax.set_title(f"update (10 .py + 1 .so changed): {rate:g} Mbit/s, {rtt:g} ms RTT")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ============================================================================================
# Arguments


def _csv(value: str, allowed: Sequence[str], what: str, ap: argparse.ArgumentParser) -> list[str]:
    items = [v for v in value.split(",") if v]
    bad = [v for v in items if v not in allowed]
    if bad or not items:
        ap.error(f"--{what}: choose from {','.join(allowed)} (got {value!r})")
    return items


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m scripts.compare", description=(__doc__ or "").splitlines()[0]
    )
    ap.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 1 run, 100mbit, numpy, cold starts only (explicit options still win)",
    )
    ap.add_argument("--runs", type=int, help="runs per measurement (default 3)")
    ap.add_argument("--profiles", help="netsim profiles (default 1gbit,100mbit)")
    ap.add_argument("--workloads", help=f"default {','.join(WORKLOADS)}")
    ap.add_argument("--systems", help=f"default {','.join(SYSTEMS)}")
    ap.add_argument("--parts", help="cold,update (default both)")
    ap.add_argument(
        "--update-profiles",
        default=TARGET_PROFILE,
        help=f"profiles that run the update part (default {TARGET_PROFILE}, the targets' one)",
    )
    ap.add_argument(
        "--slow-after",
        type=float,
        default=SLOW_AFTER_S,
        metavar="SECONDS",
        help=f"a system whose start took longer runs once per workload (default {SLOW_AFTER_S:g})",
    )
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results folder")
    ap.add_argument(
        "--sample",
        type=Path,
        default=DEFAULT_SAMPLE,
        help="the sample tree; built (numpy, scipy, pandas) if missing",
    )
    ap.add_argument("--tmpdir", type=Path, help="parent of the temp dir (default: system temp)")
    ap.add_argument("--lazycaf", type=Path, default=REPO / ".venv" / "bin" / "lazycaf")
    ap.add_argument("--no-install", action="store_true", help="fail instead of installing")
    ap.add_argument(
        "--render",
        type=Path,
        metavar="RESULTS_JSON",
        help="measure nothing: write the table and plots of a results.json again into --out",
    )
    args = ap.parse_args(argv)
    defaults = {
        "runs": 3,
        "profiles": "1gbit,100mbit",
        "workloads": ",".join(WORKLOADS),
        "systems": ",".join(SYSTEMS),
        "parts": ",".join(PARTS),
    }
    for name, value in {**defaults, **(QUICK if args.quick else {})}.items():
        if getattr(args, name) is None:  # options given explicitly win
            setattr(args, name, value)
    if args.runs < 1:
        ap.error("--runs must be at least 1")
    args.profile_names = _csv(args.profiles, list(netsim.PROFILES), "profiles", ap)
    args.workload_names = _csv(args.workloads, list(WORKLOADS), "workloads", ap)
    args.system_names = _csv(args.systems, list(SYSTEMS), "systems", ap)
    args.part_names = _csv(args.parts, PARTS, "parts", ap)
    args.update_profile_names = _csv(args.update_profiles, list(netsim.PROFILES), "profiles", ap)
    return args


# ============================================================================================
# Installing what is missing (idempotent)


def ensure_tools(*, install: bool) -> list[str]:
    """Install missing Debian tools and matplotlib; what was installed (for the report)."""
    done = []
    missing = sorted({pkg for cmd, pkg in DEBIAN_TOOLS.items() if shutil.which(cmd) is None})
    if missing:
        if not install:
            raise BenchError(f"missing Debian packages: {' '.join(missing)} (--no-install)")
        nginx_before = _nginx_masters()
        cmd = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing]
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        say(f"apt-get install {' '.join(missing)} ...")
        if subprocess.run(cmd, env=env, capture_output=True, stdin=subprocess.DEVNULL).returncode:
            run(["apt-get", "update", "-qq"], what="apt-get update", env=env)
            run(cmd, what="apt-get install", env=env)
        for pid in set(_nginx_masters()) - set(nginx_before):  # the package's own service
            subprocess.run(["nginx", "-s", "quit"], capture_output=True, check=False)
            say(f"stopped the nginx service (pid {pid}) the package install started")
        done.append("apt-get: " + " ".join(missing))
    probe = [sys.executable, "-c", "import matplotlib"]
    if subprocess.run(probe, capture_output=True).returncode:
        if not install:
            raise BenchError("matplotlib missing from this venv (--no-install)")
        say("pip install matplotlib ...")
        pip = [sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check"]
        run([*pip, "matplotlib"], what="pip install matplotlib")
        done.append("pip: matplotlib")
    return done


def _nginx_masters() -> list[int]:
    out = subprocess.run(["pgrep", "-f", "nginx: master"], capture_output=True, text=True)
    return [int(x) for x in out.stdout.split()]


# ============================================================================================
# Servers, client namespace, small tools


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


NGINX_CONF: Final = """\
user root;
worker_processes 2;
daemon off;
pid {tmp}/nginx.pid;
error_log {err} warn;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  sendfile on;
  tcp_nodelay on;
  keepalive_requests 1000000;
  keepalive_timeout 300s;
  client_body_temp_path {tmp}/nginx-body;
  proxy_temp_path {tmp}/nginx-body;
  server {{
    listen 127.0.0.1:{port};
    root {root};
    location / {{ dav_methods PUT; create_full_put_path on; client_max_body_size 0; }}
  }}
}}
"""


def start_nginx(made: Made, root: Path) -> int:
    """nginx (Debian's, WebDAV PUT on) serving ``root`` on 127.0.0.1; stopped by cleanup."""
    port = free_port()
    (made.tmp / "nginx-body").mkdir(exist_ok=True)
    err = made.log("nginx-error.log")
    conf = made.tmp / "nginx.conf"
    conf.write_text(NGINX_CONF.format(tmp=made.tmp, err=err, port=port, root=root))
    proc = subprocess.Popen(
        ["nginx", "-c", str(conf), "-e", str(err)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
        cwd="/",
    )
    made.servers.append(proc)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
            return port
        if proc.poll() is not None:
            raise BenchError(f"nginx exited {proc.returncode}: {tail(err)}")
        time.sleep(0.05)
    raise BenchError(f"nginx did not listen on {port} within 15 s: {tail(err)}")


def disk_bytes(path: Path) -> int:
    """Bytes the files under ``path`` occupy (allocated, capped at their size: sparse files
    such as an LMDB map count what was written)."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                st = os.lstat(os.path.join(root, name))
                total += min(st.st_size, st.st_blocks * 512)
    return total


def workload_cmd(tree: Path, workload: str) -> list[str]:
    return [str(tree / "bin" / "python3"), "-c", WORKLOADS[workload]]


def time_workload(tree: Path, workload: str) -> float:
    return timed(workload_cmd(tree, workload), what=f"{workload} from {tree}", env=python_env())


@dataclass
class Client:
    """One network profile: the client namespace, its proxies, its counters."""

    profile: str
    link: netsim.Link
    net: bp.Net
    web: str  # nginx through the delay line, "http://10.77.N.1:PORT"
    dir: Path  # where clients keep downloads, extracted trees, indexes

    def link_bytes(self) -> int:
        stats = Path("/sys/class/net") / self.link.host_dev / "statistics"
        return sum(int((stats / f"{d}_bytes").read_text()) for d in ("rx", "tx"))

    def run(self, cmd: Sequence[str], what: str) -> float:
        """``cmd`` in the namespace (mounts shared), timed; a BenchError if it fails."""
        t0 = time.perf_counter()
        res = self.link.run(
            cmd, share_mounts=True, capture_output=True, text=True, timeout=CMD_TIMEOUT_S, cwd="/"
        )
        if res.returncode != 0:
            raise BenchError(f"{what} failed (exit {res.returncode}): {res.stderr[-1500:]}")
        return time.perf_counter() - t0

    def fresh_dir(self, name: str) -> Path:
        path = self.dir / name
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        return path


@dataclass
class Ctx:
    """Everything measurements share: the tool, the servers, the artifacts of v1."""

    env: bp.Env  # lz, made, sample, cas_port, http_port (nginx), image (v1 squashfs)
    www: Path  # nginx root
    results: Results
    profiles: dict[str, str] = field(default_factory=dict)  # workload -> profile digest

    @property
    def made(self) -> Made:
        return self.env.made

    @property
    def lz(self) -> Lazycaf:
        return self.env.lz

    def put_profile(self, workload: str) -> None:
        url = f"http://127.0.0.1:{self.env.cas_port}/v1/refs/profiles/{profile_name(workload)}"
        http_put(url, self.profiles[workload].encode())


def profile_name(workload: str) -> str:
    return f"cmp-{workload}"


@contextlib.contextmanager
def fuse_mount(mnt: Path, *, proc: subprocess.Popen[Any] | None = None) -> Iterator[Path]:
    """Unmount ``mnt`` (and stop its serving process, e.g. casync) when the block exits."""
    try:
        yield mnt
    finally:
        if is_mounted(mnt):
            res = subprocess.run(["umount", str(mnt)], capture_output=True, check=False)
            if res.returncode and is_mounted(mnt):
                subprocess.run(["umount", "-l", str(mnt)], capture_output=True, check=False)
        if proc is not None:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)  # casync does not exit on unmount alone
            stop_process(proc, timeout=5)


def wait_mounted(mnt: Path, proc: subprocess.Popen[Any], log: Path, what: str) -> None:
    deadline = time.monotonic() + MOUNT_WAIT_S
    while not is_mounted(mnt):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise BenchError(f"{what} did not mount {mnt}: {tail(log)}")
        time.sleep(0.01)


# ============================================================================================
# One cold start per system; each returns a Sample (phase "cold" unless told)


@dataclass(frozen=True)
class Job:
    """What to start: a workload from a version (v1, or v2 in the update scenario)."""

    workload: str
    phase: str = "cold"
    version: str = "v1"  # file name stem of the artifacts on nginx
    ref: str = REF_V1


def run_native(ctx: Ctx, cl: Client, job: Job, i: int) -> Sample:
    drop_caches()
    b0 = cl.link_bytes()
    secs = time_workload(ctx.env.sample, job.workload)
    link = cl.link_bytes() - b0
    warm = time_workload(ctx.env.sample, job.workload)
    return Sample(job.phase, cl.profile, job.workload, "native", i, secs, warm, link, 0)


def run_xar(ctx: Ctx, cl: Client, job: Job, i: int) -> Sample:
    where = cl.fresh_dir("xar")
    image = where / f"{job.version}.sqfs"
    mnt = where / "mnt"
    mnt.mkdir()
    drop_caches()
    b0 = cl.link_bytes()
    t_get = cl.run(
        ["curl", "-sS", "--fail", "-o", str(image), f"{cl.web}/{job.version}.sqfs"],
        "download the squashfs image",
    )
    with fuse_mount(mnt):
        t_mount = timed(["squashfuse", str(image), str(mnt)], what="squashfuse")
        t_run = time_workload(mnt, job.workload)
        link = cl.link_bytes() - b0
        warm = time_workload(mnt, job.workload) if job.phase == "cold" else None
    disk = disk_bytes(where)
    shutil.rmtree(where)
    parts = {"download_s": t_get, "mount_s": t_mount, "run_s": t_run}
    total = t_get + t_mount + t_run
    return Sample(job.phase, cl.profile, job.workload, "xar", i, total, warm, link, disk, parts)


def run_tarball(ctx: Ctx, cl: Client, job: Job, i: int) -> Sample:
    where = cl.fresh_dir("tarball")
    tree = where / "tree"
    tree.mkdir()
    url = f"{cl.web}/{job.version}.tar.zst"
    pipe = f"curl -sS --fail {shlex.quote(url)} | zstd -dcq | tar -x -C {shlex.quote(str(tree))}"
    drop_caches()
    b0 = cl.link_bytes()
    t_get = cl.run(["bash", "-o", "pipefail", "-c", pipe], "download and extract the tarball")
    t_run = time_workload(tree, job.workload)
    link = cl.link_bytes() - b0
    warm = time_workload(tree, job.workload) if job.phase == "cold" else None
    disk = disk_bytes(where)
    shutil.rmtree(where)
    parts = {"download_s": t_get, "run_s": t_run}
    total = t_get + t_run
    return Sample(job.phase, cl.profile, job.workload, "tarball", i, total, warm, link, disk, parts)


def run_casync(ctx: Ctx, cl: Client, job: Job, i: int) -> Sample:
    where = cl.fresh_dir("casync")
    index = where / f"{job.version}.caidx"
    mnt = where / "mnt"
    mnt.mkdir()
    log = ctx.made.log(f"casync-{cl.profile}-{job.workload}-{job.phase}-{i}.log")
    drop_caches()
    b0 = cl.link_bytes()
    t0 = time.perf_counter()
    cl.run(
        ["curl", "-sS", "--fail", "-o", str(index), f"{cl.web}/{job.version}.caidx"],
        "download the casync index",
    )
    with open(log, "wb") as out:
        cmd = ["casync", "mount", f"--store={cl.web}/store.castr", str(index), str(mnt)]
        proc = cl.link.popen(
            cmd,
            share_mounts=True,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd="/",
        )
    with fuse_mount(mnt, proc=proc):
        wait_mounted(mnt, proc, log, "casync mount")
        t1 = time.perf_counter()
        t_run = time_workload(mnt, job.workload)
        link = cl.link_bytes() - b0
        warm = time_workload(mnt, job.workload) if job.phase == "cold" else None
    disk = disk_bytes(where)
    shutil.rmtree(where)
    parts = {"index_and_mount_s": t1 - t0, "run_s": t_run}
    total = t1 - t0 + t_run
    return Sample(job.phase, cl.profile, job.workload, "casync", i, total, warm, link, disk, parts)


def lazycaf_mount(ctx: Ctx, ref: str, mnt: Path, cache: Path, *extra: str) -> float:
    cmd = [str(ctx.lz.exe), "mount", ref, str(mnt), *extra]
    secs = timed(cmd, what=f"lazycaf mount {ref}", env=ctx.lz.env(cache))
    if not is_mounted(mnt):
        raise BenchError(f"lazycaf mount returned but {mnt} is not a mount point")
    return secs


def lazycaf_start(ctx: Ctx, cl: Client, job: Job, cache: Path, *, profile: bool, i: int) -> Sample:
    """Mount ``job.ref`` from ``cache`` (its daemon running), run, measure, unmount."""
    system = "lazycaf-profile" if profile else "lazycaf"
    mnt = ctx.made.mountpoint("mnt-lazycaf")
    if profile:
        ctx.put_profile(job.workload)
        opts = ["--profile", profile_name(job.workload)]
    else:  # a name no run recorded: on-demand fetches plus directory prefetch
        opts = ["--profile", f"cmp-none-{cl.profile}-{job.workload}-{time.monotonic_ns()}"]
    fetched0 = ctx.lz.stats(cache).get("bytes_fetched", 0.0)
    drop_caches()
    d0, b0 = disk_bytes(cache), cl.link_bytes()
    t_mount = lazycaf_mount(ctx, job.ref, mnt, cache, *opts)
    t_run = time_workload(mnt, job.workload)
    link = cl.link_bytes() - b0
    disk = disk_bytes(cache) - d0  # what this start wrote (an update keeps v1's blobs)
    stats = ctx.lz.stats(cache)
    bp.wait_settled(ctx.lz, cache)
    parts = {
        "mount_s": t_mount,
        "run_s": t_run,
        "link_bytes_settled": float(cl.link_bytes() - b0),
        "disk_bytes_settled": float(disk_bytes(cache) - d0),
        "fetched_decoded_bytes": stats.get("bytes_fetched", 0.0) - fetched0,
    }
    warm = time_workload(mnt, job.workload) if job.phase == "cold" else None
    ctx.lz.umount(mnt)
    if profile:
        ctx.put_profile(job.workload)  # the run merged itself into the profile: undo
    total = t_mount + t_run
    return Sample(job.phase, cl.profile, job.workload, system, i, total, warm, link, disk, parts)


def run_lazycaf(ctx: Ctx, cl: Client, job: Job, i: int, *, profile: bool = False) -> Sample:
    cache = ctx.env.new_cache(f"cache-{cl.profile}-{job.workload}-{int(profile)}-{i}")
    with bp.daemon_in(cl.net, ctx.env, cache):
        return lazycaf_start(ctx, cl, job, cache, profile=profile, i=i)


def run_lazycaf_profile(ctx: Ctx, cl: Client, job: Job, i: int) -> Sample:
    return run_lazycaf(ctx, cl, job, i, profile=True)


def run_lazycaf_peers(ctx: Ctx, cl: Client, job: Job, i: int) -> Sample:
    """Not measured here: a warm peer must sit on a fast LAN beside this client while the CAS
    is behind the shaped link, and this comparison has one client and one link. To add it:
    a second client namespace with a daemon that ran the workload, routed beside the first
    (as ``bench_peers.py`` builds them), this run's daemon pointed at it with ``--peers``;
    then drop "lazycaf-peers" from ``NOT_YET``."""
    raise NotImplementedError(NOT_YET["lazycaf-peers"])


Runner = Callable[[Ctx, Client, Job, int], Sample]
RUNNERS: Final[dict[str, Runner]] = {
    "native": run_native,
    "xar": run_xar,
    "tarball": run_tarball,
    "casync": run_casync,
    "lazycaf": run_lazycaf,
    "lazycaf-profile": run_lazycaf_profile,
    "lazycaf-peers": run_lazycaf_peers,
}


# ============================================================================================
# Setup: sample, v1 artifacts, servers


def ensure_sample(path: Path) -> Path:
    site = path / "lib" / "python3.11" / "site-packages"
    if all((site / pkg).is_dir() for pkg in SAMPLE_PACKAGES):
        return path.resolve()
    say(f"building the sample ({' '.join(SAMPLE_PACKAGES)}) in {path} ...")
    cmd = [sys.executable, str(REPO / "scripts" / "build_sample.py"), str(path), "--force"]
    run([*cmd, "--packages", *SAMPLE_PACKAGES], what="build_sample.py", timeout=1800)
    return path.resolve()


def make_artifacts(tree: Path, www: Path, version: str, *, store: Path) -> dict[str, float]:
    """The squashfs image, tar.zst and casync index of ``tree`` in ``www``; build seconds."""
    builds = {
        "xar": mksquashfs(tree, www / f"{version}.sqfs"),
        "tarball": tar_zst(tree, www / f"{version}.tar.zst"),
        "casync": casync_make(store, www / f"{version}.caidx", tree),
    }
    return {name: timed(cmd, what=f"build the {name} artifact") for name, cmd in builds.items()}


def casync_make(store: Path, index: Path, tree: Path) -> list[str]:
    """casync's defaults: chunks of 16/64/256 KiB (min/avg/max), zstd."""
    return ["casync", "make", f"--store={store}", str(index), str(tree)]


def mksquashfs(tree: Path, dst: Path) -> list[str]:
    """The XAR-like image: squashfs with zstd at mksquashfs's default level."""
    return ["mksquashfs", str(tree), str(dst), "-comp", "zstd", "-noappend", "-quiet"]


def tar_zst(tree: Path, dst: Path) -> list[str]:
    """The command that writes ``tree`` as a zstd (level 3, all cores) tarball to ``dst``."""
    q = shlex.quote
    pipe = f"tar -C {q(str(tree))} -cf - . | zstd -q -T0 -3 -o {q(str(dst))}"
    return ["bash", "-o", "pipefail", "-c", pipe]


def measure_reads(tree: Path, workload: str) -> int:
    """Bytes the workload reads from storage on a native cold start (/proc/self/io)."""
    code = WORKLOADS[workload] + ("\nimport sys\nsys.stderr.write(open('/proc/self/io').read())\n")
    drop_caches()
    res = subprocess.run(
        [str(tree / "bin" / "python3"), "-c", code],
        capture_output=True,
        text=True,
        env=python_env(),
        cwd="/",
        timeout=CMD_TIMEOUT_S,
    )
    m = re.search(r"^read_bytes: (\d+)$", res.stderr, re.M)
    if res.returncode or not m:
        raise BenchError(f"measuring the reads of {workload} failed: {res.stderr[-500:]}")
    return int(m.group(1))


def prepare(args: argparse.Namespace, made: Made, lz: Lazycaf, res: Results) -> Ctx:
    sample = ensure_sample(args.sample)
    files = sum(len(f) for _, _, f in os.walk(sample))
    res.facts.append(
        f"sample: {sample}, {files} files, {du(sample) / MB:.1f} MB ({', '.join(SAMPLE_PACKAGES)})"
    )
    www = made.tmp / "www"
    (www / "store.castr").mkdir(parents=True)
    say("v1 artifacts: squashfs, tar.zst, casync store (untimed) ...")
    secs = make_artifacts(sample, www, "v1", store=www / "store.castr")
    sizes = {
        k: (www / f"v1.{ext}").stat().st_size
        for k, ext in (("xar", "sqfs"), ("tarball", "tar.zst"), ("casync", "caidx"))
    }
    res.facts.append(
        f"v1 artifacts: squashfs {fmt_mb(sizes['xar'])} (mksquashfs -comp zstd, "
        f"{secs['xar']:.1f} s); tar.zst {fmt_mb(sizes['tarball'])} (zstd -3, "
        f"{secs['tarball']:.1f} s); casync store {fmt_mb(du(www / 'store.castr'))} + index "
        f"{fmt_mb(sizes['casync'])} (casync make, default chunking and zstd, "
        f"{secs['casync']:.1f} s)"
    )
    t0 = time.perf_counter()
    lz.cli("pack", str(sample), "--cas", str(lz.cas), "--tag", REF_V1, what="lazycaf pack")
    res.facts.append(
        f"LazyCAF CAS (a local directory behind `lazycaf cas serve`): "
        f"{fmt_mb(du(lz.cas))} after packing v1 in "
        f"{time.perf_counter() - t0:.1f} s (untimed)"
    )
    cas_cmd = [str(lz.exe), "cas", "serve", "--root", str(lz.cas), "--listen", "127.0.0.1:0"]
    cas_port = bp.start_server(made, cas_cmd, "cas-server")
    nginx_port = start_nginx(made, www)
    btrfs_image(made)
    env = bp.Env(lz, made, sample, cas_port, nginx_port, www / "v1.sqfs")
    for wl in args.workload_names:
        res.reads[wl] = measure_reads(sample, wl)
    return Ctx(env, www, res)


@contextlib.contextmanager
def client(ctx: Ctx, profile: str) -> Iterator[Client]:
    rate, rtt = netsim.PROFILES[profile]
    name = f"cmp{os.getpid() % 100000}"
    with netsim.shaped_link(name, rate_mbit=rate, rtt_ms=rtt) as link:
        try:
            cas_ip, cas_port = link.proxy("127.0.0.1", ctx.env.cas_port)
            web_ip, web_port = link.proxy("127.0.0.1", ctx.env.http_port)
            net = bp.Net(profile, f"http://{cas_ip}:{cas_port}", link, rate)
            cl = Client(
                profile,
                link,
                net,
                f"http://{web_ip}:{web_port}",
                ctx.made.tmp / f"client-{profile}",
            )
            cl.dir.mkdir(exist_ok=True)
            (ctx.www / "tiny").write_bytes(b"x")
            net.rtt_s = bp.measure_rtt(link, f"{cl.web}/tiny")
            ctx.results.facts.append(
                f"{profile}: tbf {rate:g} Mbit/s, delay line {rtt:g} ms RTT; a tiny GET through "
                f"the proxy takes {net.rtt_s * 1000:.2f} ms"
            )
            yield cl
        finally:
            for warning in cleanup_mounts(ctx.made, ctx.lz):
                say(f"WARNING: {warning}")
            shutil.rmtree(ctx.made.tmp / f"client-{profile}", ignore_errors=True)


def record_profiles(ctx: Ctx, cl: Client, workloads: Sequence[str]) -> None:
    """Record each workload's profile once, on its own cold cache, over ``cl``'s link."""
    for wl in workloads:
        cache = ctx.env.new_cache(f"cache-record-{wl}")
        with bp.daemon_in(cl.net, ctx.env, cache):
            drop_caches()
            t0 = time.perf_counter()
            cmd = ["profile", "record", "--name", profile_name(wl), REF_V1, "--"]
            code = WORKLOADS[wl]
            ctx.lz.cli(*cmd, "{mnt}/bin/python3", "-c", code, cache=cache, what="profile record")
            secs = time.perf_counter() - t0
        url = f"http://127.0.0.1:{ctx.env.cas_port}/v1/refs/profiles/{profile_name(wl)}"
        ctx.profiles[wl] = http_get(url).decode().strip()
        ctx.results.notes.append(
            f"profile {profile_name(wl)} recorded over the {cl.profile} link in {secs:.2f} s "
            "(one cold run, mount to umount)"
        )


# ============================================================================================
# Phases


def cold_phase(ctx: Ctx, cl: Client, args: argparse.Namespace) -> None:
    systems = [s for s in args.system_names if s not in NOT_YET]
    for wl in args.workload_names:
        run_rounds(ctx, cl, Job(wl), systems, args, RUNNERS)


def run_rounds(
    ctx: Ctx,
    cl: Client,
    job: Job,
    systems: list[str],
    args: argparse.Namespace,
    runners: dict[str, Runner],
) -> None:
    """``args.runs`` rounds of ``systems`` (the order rotates from round to round, so drift
    hits all); a system whose start took longer than ``args.slow_after`` runs no more rounds
    of this job (its figure is one run, which the tables' runs column shows)."""
    slow: set[str] = set()
    for i in range(args.runs):
        k = i % len(systems)
        for system in [s for s in systems[k:] + systems[:k] if s not in slow]:
            sample = runners[system](ctx, cl, job, i)
            ctx.results.samples.append(sample)
            say(
                f"{cl.profile} {job.phase} {job.workload} run {i}: {system} "
                f"{sample.total_s:.3f} s, {fmt_mb(sample.link_bytes)} over the link"
            )
            if sample.total_s > args.slow_after:
                slow.add(system)


def module_files(tree: Path, workload: str) -> list[Path]:
    """Files of the modules the workload has imported at its end."""
    code = WORKLOADS[workload] + (
        "\nimport sys, json\nprint(json.dumps([getattr(m, '__file__', None) or '' "
        "for m in list(sys.modules.values())]))\n"
    )
    out = run(
        [str(tree / "bin" / "python3"), "-c", code],
        what="list modules",
        env=python_env(),
        cwd="/",
    )
    return [Path(f) for f in json.loads(out.strip().splitlines()[-1]) if f]


def pick_changes(tree: Path, workload: str) -> tuple[list[Path], Path]:
    """10 imported ``.py`` files of site-packages (spread evenly, deterministic) and the
    largest imported extension module below 1 MiB; paths relative to ``tree``."""
    site = tree / "lib" / "python3.11" / "site-packages"
    files = sorted({f for f in module_files(tree, workload) if site in f.parents})
    py = [f for f in files if f.suffix == ".py" and f.stat().st_size > 0]
    so = [f for f in files if f.suffix == ".so" and f.stat().st_size < SO_LIMIT - SO_APPEND]
    if len(py) < EDITED_PY or not so:
        raise BenchError(f"{workload} imports too few modules to edit ({len(py)} .py)")
    step = len(py) / EDITED_PY
    chosen = [py[int(k * step)].relative_to(tree) for k in range(EDITED_PY)]
    return chosen, max(so, key=lambda f: f.stat().st_size).relative_to(tree)


def make_v2(v1: Path, v2: Path, py: Sequence[Path], so: Path, tag: str) -> None:
    run(["cp", "-a", str(v1), str(v2)], what="cp -a v1 v2", timeout=CMD_TIMEOUT_S)
    for rel in py:
        with (v2 / rel).open("a") as f:
            f.write(f"\n# compare.py: version 2 ({tag})\n")
    compile_code = (
        "import py_compile, sys\nfor f in sys.argv[1:]: py_compile.compile(f, doraise=True)"
    )
    run(
        [str(v2 / "bin" / "python3"), "-c", compile_code, *(str(v2 / p) for p in py)],
        what="py_compile the edited files",
        env=python_env(),
        cwd="/",
    )
    with (v2 / so).open("ab") as f:
        f.write(random.Random(tag).randbytes(SO_APPEND))


def publish(ctx: Ctx, cl: Client, v2: Path, version: str, wl: str) -> None:
    """Publish v2 from a build host in the namespace, each system its own way (timed)."""
    pub = cl.fresh_dir("publish")
    for system, fn in PUBLISHERS.items():
        b0 = cl.link_bytes()
        parts = fn(ctx, cl, v2, pub / version)
        link = cl.link_bytes() - b0
        total = sum(parts.values())
        ctx.results.samples.append(
            Sample("publish", cl.profile, wl, system, 0, total, None, link, None, parts)
        )
        say(f"{cl.profile} publish: {system} {total:.2f} s, {fmt_mb(link)} over the link")
    shutil.rmtree(pub)


def publish_lazycaf(ctx: Ctx, cl: Client, v2: Path, stem: Path) -> dict[str, float]:
    """``lazycaf pack`` into the HTTP CAS: uploads the blobs it lacks, sets the ref."""
    ref = f"sample:{stem.name}"
    cmd = [str(ctx.lz.exe), "pack", str(v2), "--cas", cl.net.cas_url, "--tag", ref]
    return {"pack_s": cl.run(cmd, "lazycaf pack v2")}


def _build_and_put(cl: Client, build: list[str], artifact: Path) -> dict[str, float]:
    secs = timed(build, what=f"build {artifact.name}")
    url = f"{cl.web}/{artifact.name}"
    return {
        "build_s": secs,
        "upload_s": cl.run(
            ["curl", "-sS", "--fail", "-T", str(artifact), url], f"upload {artifact.name}"
        ),
    }


def publish_xar(ctx: Ctx, cl: Client, v2: Path, stem: Path) -> dict[str, float]:
    image = stem.with_suffix(".sqfs")
    return _build_and_put(cl, mksquashfs(v2, image), image)


def publish_tarball(ctx: Ctx, cl: Client, v2: Path, stem: Path) -> dict[str, float]:
    tarball = stem.with_suffix(".tar.zst")
    return _build_and_put(cl, tar_zst(v2, tarball), tarball)


def publish_casync(ctx: Ctx, cl: Client, v2: Path, stem: Path) -> dict[str, float]:
    """``casync make`` into the publisher's store (hard links to every chunk published so
    far), then one PUT of a tar of the chunks it added and the index. Untimed afterwards: the
    server takes the new chunks into the store it serves."""
    store, served = ctx.made.tmp / "publisher.castr", ctx.www / "store.castr"
    if not store.exists():
        run(["cp", "-al", str(served), str(store)], what="cp -al the chunk store")
    before = set(store.rglob("*.cacnk"))
    index = stem.with_suffix(".caidx")
    build = timed(casync_make(store, index, v2), what="casync make v2")
    t0 = time.perf_counter()
    new = sorted(set(store.rglob("*.cacnk")) - before)
    listing = stem.with_suffix(".new-chunks")
    listing.write_text("".join(f"{p.relative_to(store)}\n" for p in new))
    q = shlex.quote
    pipe = (
        f"tar -C {q(str(store))} -cf - -T {q(str(listing))} -C {q(str(index.parent))} "
        f"{q(index.name)} | curl -sS --fail -T - {q(f'{cl.web}/upload/{stem.name}.tar')}"
    )
    cl.run(["bash", "-o", "pipefail", "-c", pipe], "upload the new chunks")
    upload = time.perf_counter() - t0
    for chunk in new:
        dst = served / chunk.relative_to(store)
        dst.parent.mkdir(exist_ok=True)
        if not dst.exists():
            os.link(chunk, dst)
    shutil.copy2(index, ctx.www / index.name)
    return {"build_s": build, "upload_s": upload}


Publisher = Callable[[Ctx, Client, Path, Path], dict[str, float]]
PUBLISHERS: Final[dict[str, Publisher]] = {
    "lazycaf": publish_lazycaf,
    "xar": publish_xar,
    "tarball": publish_tarball,
    "casync": publish_casync,
}


def update_phase(ctx: Ctx, cl: Client, args: argparse.Namespace) -> None:
    wl = "pandas" if "pandas" in args.workload_names else args.workload_names[0]
    version = f"v2-{cl.profile}"
    py, so = pick_changes(ctx.env.sample, wl)
    if not any("v2 changes" in n for n in ctx.results.notes):

        def short(rel: Path) -> str:  # below site-packages
            return "/".join(rel.parts[3:])

        ctx.results.notes.append(
            f"v2 changes (workload {wl}): {len(py)} .py files it imports "
            f"({', '.join(map(short, py))}), their .pyc, and {short(so)} "
            f"({(ctx.env.sample / so).stat().st_size} bytes, +{SO_APPEND} bytes appended)"
        )
    v2 = ctx.made.tmp / version
    make_v2(ctx.env.sample, v2, py, so, version)
    try:
        if wl not in ctx.profiles:
            record_profiles(ctx, cl, [wl])
        publish(ctx, cl, v2, version, wl)
        job = Job(wl, phase="update", version=version, ref=f"sample:{version}")
        systems = [s for s in UPDATE_STARTERS if s in args.system_names or s == "lazycaf-profile"]
        run_rounds(ctx, cl, job, systems, args, {**RUNNERS, "lazycaf-profile": update_lazycaf})
    finally:
        shutil.rmtree(v2, ignore_errors=True)


def update_lazycaf(ctx: Ctx, cl: Client, job: Job, i: int) -> Sample:
    """A host that ran v1 (with its profile; untimed) starts v2 with the same profile."""
    cache = ctx.env.new_cache(f"cache-update-{cl.profile}-{i}")
    with bp.daemon_in(cl.net, ctx.env, cache):
        lazycaf_start(ctx, cl, Job(job.workload), cache, profile=True, i=i)
        return lazycaf_start(ctx, cl, job, cache, profile=True, i=i)


# ============================================================================================
# Main


def machine_facts(tmp: Path) -> list[str]:
    tools = packages("nginx-light", "casync", "squashfuse", "squashfs-tools", "zstd", "curl")
    return [
        *Machine.now().lines(),
        f"tools: {tools}",
        "client side: a network namespace behind tbf + netsim's delay line; servers (nginx, "
        "`lazycaf cas serve`) on 127.0.0.1; LazyCAF host caches on a Btrfs loop image "
        "(compress=zstd), the rest on the root filesystem "
        f"({fs_of(tmp)})",
    ]


def bench(args: argparse.Namespace, made: Made, lz: Lazycaf, res: Results) -> None:
    res.facts += machine_facts(made.tmp)
    res.notes.append(
        f"{args.runs} runs per figure (medians), systems interleaved in rotating order; a "
        f"system whose start took longer than {args.slow_after:g} s ran once for that "
        "workload (see the runs column)"
    )
    ctx = prepare(args, made, lz, res)
    for k, profile in enumerate(args.profile_names):
        say(f"profile {profile} ...")
        with client(ctx, profile) as cl:
            if k == 0 and any(s.startswith("lazycaf-profile") for s in args.system_names):
                record_profiles(ctx, cl, args.workload_names)
            if "cold" in args.part_names:
                cold_phase(ctx, cl, args)
            if "update" in args.part_names and profile in args.update_profile_names:
                update_phase(ctx, cl, args)


def figures(res: Results) -> list[Figure]:
    """Every (phase, profile, workload, system) as a figure of its totals, against the
    XAR-like system's totals of the same phase, profile and workload."""
    groups: dict[Key, list[float]] = {}
    for s in res.samples:
        groups.setdefault((s.phase, s.profile, s.workload, s.system), []).append(s.total_s)
    out = []
    for (phase, profile, wl, system), secs in groups.items():
        name = f"{phase}, {profile}, {wl}: {SYSTEMS.get(system, system)}"
        xar = groups.get((phase, profile, wl, "xar"))
        if system == "xar" or not xar:
            out.append(Figure(name, "s", tuple(secs)))
            continue
        ratio = statistics.median(xar) / statistics.median(secs)
        out.append(Figure(name, "s", tuple(secs), SYSTEMS["xar"], tuple(xar), ratio, "XAR / this"))
    return out


def write_outputs(res: Results, out: Path, record: Record | dict[str, Any]) -> list[Path]:
    """results.md, results.json (``record``: this run's, or the document read back by
    ``--render``, whose date, machine and load are kept) and the plots in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    md = render_markdown(res)
    (out / "results.md").write_text(md)
    body = md.splitlines()[2:]  # without the title: the rendered page has its own
    if isinstance(record, Record):
        record.report, record.figures, record.data = body, figures(res), res.to_json()
        write_results(out / "results.json", record)
    else:
        doc = {**record, "report": body, "figures": [f.to_json() for f in figures(res)]}
        doc["data"] = res.to_json()
        (out / "results.json").write_text(json.dumps(doc, indent=1) + "\n")
    return [out / "results.md", out / "results.json", *write_plots(res, out)]


def read_back(path: Path) -> tuple[Results, dict[str, Any]]:
    """A results.json as this script writes it (or the bare ``Results.to_json`` of older
    runs, wrapped): the results and the document."""
    doc = json.loads(path.read_text())
    if "data" not in doc:
        doc = {"bench": "compare", "title": TITLE, "data": doc}
    return Results.from_json(doc["data"]), doc


TITLE: Final = "LazyCAF side by side"


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.render is not None:
        res, doc = read_back(args.render)
        for path in write_outputs(res, args.out, doc):
            print(path)
        return 0
    if os.geteuid() != 0:
        print("compare: error: needs root (netns, drop_caches, mounts)", file=sys.stderr)
        return 2
    unwind_on_sigterm()
    record = Record.begin("compare", TITLE, argv, args)
    start = time.perf_counter()
    res = Results(
        profiles=args.profile_names, workloads=args.workload_names, systems=args.system_names
    )
    made = Made(Path(tempfile.mkdtemp(prefix="compare-", dir=args.tmpdir)))
    made.netns_prefix = f"lzc-cmp{os.getpid() % 100000}"
    lz = Lazycaf(args.lazycaf.absolute(), made.tmp / "cas")
    code = 0
    try:
        installed = ensure_tools(install=not args.no_install)
        if installed:
            res.notes.append("installed: " + "; ".join(installed))
        bench(args, made, lz, res)
    except (BenchError, subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        print(f"compare: error: {exc}", file=sys.stderr)
        res.notes.append(f"INCOMPLETE: {exc}")
        code = 1
    except KeyboardInterrupt:
        print("compare: interrupted", file=sys.stderr)
        code = 130
    finally:  # also on SIGTERM (SystemExit): clean up, then write what was measured
        say(f"cleaning up {made.tmp} ...")
        for warning in cleanup(made, lz):
            print(f"compare: WARNING: left behind: {warning}", file=sys.stderr)
            code = code or 3
        res.notes.append(
            f"total runtime of `python -m scripts.compare`: {time.perf_counter() - start:.0f} s; "
            + load_line(record.start, Load.now())
        )
        if res.samples:
            for path in write_outputs(res, args.out, record):
                print(path)
    return code


if __name__ == "__main__":
    sys.exit(main())
