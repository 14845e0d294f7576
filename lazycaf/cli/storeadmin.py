"""The CLI commands that administer the store itself: ``cas gc``, ``ref ls``, ``ref rm``.

They run against the store (a CAS directory or ``s3://``), never through an HTTP CAS server:
the server has no endpoint to list or delete, and ``HttpCAS`` refuses with a ``UsageError``.
"""

from __future__ import annotations

import argparse
import json

from lazycaf.cas.api import CAS
from lazycaf.cas.gc import GcReport, collect_garbage
from lazycaf.cas.refs import check_ref_name
from lazycaf.cli.store import with_cas
from lazycaf.core.digest import Digest
from lazycaf.core.errors import IntegrityError, UsageError
from lazycaf.core.sizes import format_size, parse_duration
from lazycaf.traces.profiles import profile_blobs

__all__ = ["cas_gc", "ref_ls", "ref_rm"]


async def cas_gc(args: argparse.Namespace) -> int:
    keep_args = [args.keep] if isinstance(args.keep, str) else list(args.keep or ())
    keep = [Digest.parse(k) for k in keep_args]
    grace = parse_duration(args.grace)

    async def run(cas: CAS) -> int:
        report = await collect_garbage(
            cas, grace=grace, keep=keep, dry_run=args.dry_run, profile_blobs=profile_blobs
        )
        if args.json:
            print(json.dumps({"store": cas.where, **report.to_json()}, sort_keys=True))
        else:
            print(_gc_text(cas.where, report))
        return 0

    return await with_cas(args, run)


def _gc_text(where: str, r: GcReport) -> str:
    deleted = "would delete" if r.dry_run else "deleted"
    lines = [
        f"{where}: {r.refs} refs; kept {r.kept} reachable blobs ({format_size(r.kept_bytes)})"
        f" and {r.young} unreachable younger than the grace of {r.grace:g} s "
        f"({format_size(r.young_bytes)}); {deleted} {r.deleted} blobs "
        f"({format_size(r.deleted_bytes)})"
    ]
    for p in r.problems:
        at = f" ({p.digest})" if p.digest else ""
        lines.append(f"  ref {p.ref!r}{at}: {p.reason} (its digest is kept)")
    return "\n".join(lines)


async def ref_ls(args: argparse.Namespace) -> int:
    async def run(cas: CAS) -> int:
        rows: list[tuple[str, str | None, str | None]] = []
        for name in await cas.list_refs():
            try:
                rows.append((name, (await cas.get_ref(name)).hex, None))
            except (IntegrityError, UsageError) as exc:  # a ref file that holds garbage
                rows.append((name, None, str(exc)))
        for name, digest, error in rows:
            if args.json:
                row = {"name": name, "digest": digest, **({"error": error} if error else {})}
                print(json.dumps(row, sort_keys=True))
            else:
                print(f"{digest or '?' * 64}  {name}" + (f"  ({error})" if error else ""))
        return 0

    return await with_cas(args, run)


async def ref_rm(args: argparse.Namespace) -> int:
    name = check_ref_name(args.name)

    async def run(cas: CAS) -> int:
        await cas.delete_ref(name)
        return 0

    return await with_cas(args, run)
