"""The CLI commands over the CAS: pack, ls, cat, diff, and the HTTP CAS server."""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from itertools import islice

import trio

from lazycaf.cas.api import CAS, load_manifest, open_cas, resolve
from lazycaf.cli.columns import Columns, ls_lines
from lazycaf.cli.explained import explain_diff
from lazycaf.cli.progress import Bar, bar_for
from lazycaf.cli.readouts import diff_manifests
from lazycaf.cli.tokens import read_token
from lazycaf.core.chunking import chunk_spans, validate_chunk_size
from lazycaf.core.digest import Digest, Hasher
from lazycaf.core.errors import DigestMismatch, IntegrityError, PathNotFound, UsageError
from lazycaf.core.manifest import DIR, decode_columns
from lazycaf.core.sizes import format_size
from lazycaf.host.service import notify
from lazycaf.trees.pack import Normalize, PackProgress, pack
from lazycaf.trees.statcache import default_stat_cache_dir

__all__ = ["cas_serve", "cat", "diff", "ls", "pack_tree"]

log = logging.getLogger("lazycaf")


async def with_cas(args: argparse.Namespace, fn: Callable[[CAS], Awaitable[int]]) -> int:
    """Run ``fn`` with the CAS the command names (``--cas``, ``--cacert``), closed after."""
    cas = open_cas(args.cas, cacert=args.cacert)
    try:
        return await fn(cas)
    finally:
        with trio.CancelScope(shield=True):
            await cas.aclose()


# -- pack ----------------------------------------------------------------------------------
async def pack_tree(args: argparse.Namespace) -> int:
    try:
        validate_chunk_size(args.chunk_size)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    progress = PackProgress()
    started = time.monotonic()

    async def run(cas: CAS) -> int:
        with bar_for(args, "pack: scanning") as bar:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_show_progress, progress, bar)
                result = await pack(
                    args.dir,
                    cas,
                    tag=args.tag,
                    chunk_size=args.chunk_size,
                    keep_setid=args.keep_setid,
                    concurrency=args.jobs,
                    progress=progress,
                    stat_cache_dir=None if args.rehash else default_stat_cache_dir(),
                    normalize=_normalize(args),
                )
                nursery.cancel_scope.cancel()
        seconds = time.monotonic() - started
        log.info("packed %s: %s", args.dir, _progress_line(progress))
        if args.normalize:
            log.info(
                "normalized: %d .pyc made unchecked hash-based, %d left as they were",
                progress.pyc_rewritten,
                progress.pyc_kept,
            )
        if args.json:
            print(json.dumps(_pack_json(result.digest.hex, progress, seconds), sort_keys=True))
        else:
            print(result.digest.hex)
        return 0

    return await with_cas(args, run)


def _normalize(args: argparse.Namespace) -> Normalize | None:
    """``--normalize``: mtimes set to ``$SOURCE_DATE_EPOCH`` (seconds), else to 0."""
    if not args.normalize:
        return None
    text = os.environ.get("SOURCE_DATE_EPOCH", "0").strip()
    if not text.isdigit():
        raise UsageError(f"SOURCE_DATE_EPOCH must be whole seconds since 1970, not {text!r}")
    return Normalize(int(text))


def _pack_json(digest: str, p: PackProgress, seconds: float) -> dict[str, object]:
    return {
        "pyc_rewritten": p.pyc_rewritten,
        "pyc_kept": p.pyc_kept,
        "digest": digest,
        "files": p.files,
        "bytes": p.bytes_total,
        "files_hashed": p.files_hashed,
        "blobs": p.blobs,
        "blobs_uploaded": p.blobs_uploaded,
        "blobs_skipped": p.blobs_skipped,
        "bytes_uploaded": p.bytes_uploaded,
        "seconds": round(seconds, 3),
    }


def _progress_line(p: PackProgress) -> str:
    mb = 1e6
    return (
        f"{p.phase}: {p.files_hashed}/{p.files} files, {p.bytes_hashed / mb:.1f}/"
        f"{p.bytes_total / mb:.1f} MB hashed, {p.blobs_uploaded}/{p.blobs_missing} blobs "
        f"uploaded ({p.bytes_uploaded / mb:.1f} MB), {p.blobs_skipped} already stored"
    )


async def _show_progress(p: PackProgress, bar: Bar) -> None:
    """Feed ``bar`` from ``pack``'s counters: bytes while hashing, then blobs uploaded."""
    while True:
        if p.phase == "uploading":
            bar.update(
                p.blobs_uploaded,
                total=p.blobs_missing,
                label="pack: uploading",
                unit="blobs",
                note=f"{format_size(p.bytes_uploaded)} sent, {p.blobs_skipped} already stored",
            )
        elif p.phase in ("hashing", "checking"):
            bar.update(
                p.bytes_hashed,
                total=p.bytes_total,
                label=f"pack: {p.phase}",
                unit="bytes",
                note=f"{p.files_hashed}/{p.files} files",
            )
        await trio.sleep(0.1)


# -- read-outs -----------------------------------------------------------------------------
async def _load_columns(cas: CAS, ref: str) -> tuple[Digest, Columns]:
    """Resolve ``ref``, fetch its manifest and decode it to columns (validated, no object
    per entry): what ``ls`` and ``diff`` read."""
    digest = await resolve(cas, ref)
    data = await cas.get(digest)
    name = f"manifest {digest}" + (f" (ref {ref!r})" if ref != digest.hex else "")
    cols = await trio.to_thread.run_sync(functools.partial(decode_columns, data, name=name))
    return digest, Columns(cols)


async def ls(args: argparse.Namespace) -> int:
    async def run(cas: CAS) -> int:
        digest, cols = await _load_columns(cas, args.ref)
        lines = ls_lines(
            cols, args.path, recursive=args.recursive, as_json=args.json, digest=str(digest)
        )
        write = sys.stdout.write
        for batch in iter(lambda: list(islice(lines, 4096)), []):
            write("\n".join(batch) + "\n")
        return 0

    return await with_cas(args, run)


async def cat(args: argparse.Namespace) -> int:
    async def run(cas: CAS) -> int:
        digest, manifest = await load_manifest(cas, args.ref)
        entry = manifest.follow(args.path)
        if entry is None:
            raise PathNotFound(args.path, f"manifest {digest}")
        if entry.kind == DIR or entry.digest is None:
            raise UsageError(f"{args.path} is a directory, not a file")
        whole = Hasher()
        out = sys.stdout.buffer
        spans = chunk_spans(entry.size, manifest.chunk_size)
        for blob, (_, length) in zip(entry.blob_digests(), spans, strict=True):
            data = await cas.get(blob)
            if len(data) != length:  # the size is part of what the manifest promises
                raise IntegrityError(
                    f"file {args.path!r}: blob {blob} has {len(data)} bytes, "
                    f"the manifest says {length}"
                )
            whole.update(data)
            await trio.to_thread.run_sync(out.write, data)
        await trio.to_thread.run_sync(out.flush)
        actual = whole.digest()
        if actual != entry.digest:
            raise DigestMismatch(entry.digest, actual, f"file {args.path!r}")
        return 0

    return await with_cas(args, run)


async def diff(args: argparse.Namespace) -> int:
    async def run(cas: CAS) -> int:
        _, a = await _load_columns(cas, args.ref_a)
        _, b = await _load_columns(cas, args.ref_b)
        diff = diff_manifests(a, b, mtimes=args.mtimes)
        if args.explain:
            explained = await explain_diff(cas, diff)
            if args.json:
                print(json.dumps(explained.to_json(), sort_keys=True))
                return 0
            print("\n".join([*diff.lines(why=explained.why()), explained.summary()]))
            return 0
        if args.json:
            print(json.dumps(diff.to_json(), sort_keys=True))
            return 0
        for line in diff.lines():
            print(line)
        return 0

    return await with_cas(args, run)


# -- servers -------------------------------------------------------------------------------
async def cas_serve(args: argparse.Namespace) -> int:
    from fetcher.casserver.app import CasApp  # the CLI is fetcher's only door
    from fetcher.casserver.served import ServedStore, serve_bucket, serve_dir
    from fetcher.web.asgi import bind_socket, serve_app, server_tls
    from fetcher.web.metrics import MetricsApp

    token = read_token(args.token_file) if args.token_file is not None else None
    read_file = args.read_token_file
    read = read_token(read_file, "--read-token-file") if read_file is not None else None
    tls = server_tls(args.tls_cert, args.tls_key)
    store: ServedStore
    if (args.root is None) == (args.store is None):
        raise UsageError(
            "cas serve needs one of --root DIR and --store s3://BUCKET[/PREFIX] "
            "(a flag or in the config's [cas-serve])"
        )
    if args.store is not None:
        s3 = {"endpoint": args.s3_endpoint, "region": args.s3_region}
        store = serve_bucket(args.store, {k: v for k, v in s3.items() if v})
    elif args.s3_endpoint or args.s3_region:
        raise UsageError("--s3-endpoint and --s3-region go with --store s3://…, not --root")
    else:
        store = serve_dir(args.root)
    app = CasApp(store, token=token, read_token=read)
    sock = bind_socket(args.listen)
    host, port = sock.getsockname()[:2]
    scheme = "https" if tls is not None else "http"
    metrics = bind_socket(args.metrics_listen) if args.metrics_listen else None
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_cancel_on_signals, nursery.cancel_scope)
            await nursery.start(functools.partial(serve_app, app, sock, tls=tls))
            print(f"lazycaf cas: serving {store.where} on {scheme}://{host}:{port}", flush=True)
            if metrics is not None:
                await nursery.start(serve_app, MetricsApp(app.metrics.registry), metrics)
                m_host, m_port = metrics.getsockname()[:2]
                print(f"lazycaf cas: metrics on http://{m_host}:{m_port}/metrics", flush=True)
            # Type=notify: ready once every port listens (hypercorn accepts on started())
            notify(f"READY=1\nSTATUS=serving {store.where} on {scheme}://{host}:{port}")
    finally:
        sock.close()
        if metrics is not None:
            metrics.close()
    return 0


async def _cancel_on_signals(scope: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for _ in signals:
            notify("STOPPING=1")
            scope.cancel()
            return
