"""The ``lazycaf`` command line: ``main(argv) -> int``.

Only this module configures logging or decides exit codes: a ``LazyCafError`` becomes one
line on stderr (``lazycaf: error: ...``) and its ``exit_code``.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio

from lazycaf import __version__
from lazycaf.cas import CAS, load_manifest, open_cas
from lazycaf.chunking import DEFAULT_CHUNK_SIZE, validate_chunk_size
from lazycaf.digest import Hasher
from lazycaf.errors import DigestMismatch, LazyCafError, PathNotFound, UsageError
from lazycaf.manifest import DIR
from lazycaf.packer import PackProgress, pack
from lazycaf.readouts import diff_manifests, entry_json, format_ls, link_counts

__all__ = ["console_main", "main"]

log = logging.getLogger("lazycaf")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lazycaf", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"lazycaf {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="log debug details")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def cas_opt(sp: argparse.ArgumentParser) -> None:
        sp.add_argument(
            "--cas",
            metavar="URL|PATH",
            help="the CAS (default: $LAZYCAF_CAS or ~/.cache/lazycaf/cas)",
        )

    sp = sub.add_parser("pack", help="pack a tree into the CAS; prints the manifest digest")
    sp.add_argument("dir", type=Path)
    cas_opt(sp)
    sp.add_argument("--tag", metavar="NAME", help="also point the ref NAME at the manifest")
    sp.add_argument("--keep-setid", action="store_true", help="keep setuid/setgid bits")
    sp.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE, metavar="BYTES")
    sp.add_argument("--jobs", type=int, default=8, help="concurrent uploads (default 8)")
    sp.set_defaults(run=_cmd_pack)

    sp = sub.add_parser("ls", help="list a packed tree like ls -l (UTC times)")
    sp.add_argument("ref")
    sp.add_argument("path", nargs="?", default="")
    sp.add_argument("-R", "--recursive", action="store_true", help="every entry below PATH")
    sp.add_argument("--json", action="store_true", help="one JSON object per entry")
    cas_opt(sp)
    sp.set_defaults(run=_cmd_ls)

    sp = sub.add_parser("cat", help="write a packed file's bytes to stdout (verified)")
    sp.add_argument("ref")
    sp.add_argument("path")
    cas_opt(sp)
    sp.set_defaults(run=_cmd_cat)

    sp = sub.add_parser("diff", help="what changed between two packed trees")
    sp.add_argument("ref_a")
    sp.add_argument("ref_b")
    cas_opt(sp)
    sp.set_defaults(run=_cmd_diff)

    sp = sub.add_parser("cas", help="run the HTTP CAS server")
    cas_sub = sp.add_subparsers(dest="cas_command", required=True, metavar="SUBCOMMAND")
    serve = cas_sub.add_parser("serve", help="serve a CAS directory over HTTP")
    serve.add_argument("--root", type=Path, required=True)
    serve.add_argument("--listen", default="127.0.0.1:8470", metavar="HOST:PORT")
    serve.add_argument("--token-file", type=Path, help="writes need this bearer token")
    serve.set_defaults(run=_cmd_cas_serve)
    return p


async def _with_cas(args: argparse.Namespace, fn: Callable[[CAS], Awaitable[int]]) -> int:
    cas = open_cas(args.cas)
    try:
        return await fn(cas)
    finally:
        with trio.CancelScope(shield=True):
            await cas.aclose()


# -- pack ----------------------------------------------------------------------------------
async def _cmd_pack(args: argparse.Namespace) -> int:
    try:
        validate_chunk_size(args.chunk_size)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    progress = PackProgress()

    async def run(cas: CAS) -> int:
        async with trio.open_nursery() as nursery:
            if sys.stderr.isatty():
                nursery.start_soon(_show_progress, progress)
            result = await pack(
                args.dir,
                cas,
                tag=args.tag,
                chunk_size=args.chunk_size,
                keep_setid=args.keep_setid,
                concurrency=args.jobs,
                progress=progress,
            )
            nursery.cancel_scope.cancel()
        if sys.stderr.isatty():
            sys.stderr.write("\r\x1b[K" + _progress_line(progress) + "\n")
        log.info("packed %s: %s", args.dir, _progress_line(progress))
        print(result.digest.hex)
        return 0

    return await _with_cas(args, run)


def _progress_line(p: PackProgress) -> str:
    mb = 1e6
    return (
        f"{p.phase}: {p.files_hashed}/{p.files} files, {p.bytes_hashed / mb:.1f}/"
        f"{p.bytes_total / mb:.1f} MB hashed, {p.blobs_uploaded}/{p.blobs_missing} blobs "
        f"uploaded ({p.bytes_uploaded / mb:.1f} MB), {p.blobs_skipped} already stored"
    )


async def _show_progress(progress: PackProgress) -> None:
    while True:
        sys.stderr.write("\r\x1b[K" + _progress_line(progress))
        sys.stderr.flush()
        await trio.sleep(0.2)


# -- read-outs -----------------------------------------------------------------------------
async def _cmd_ls(args: argparse.Namespace) -> int:
    async def run(cas: CAS) -> int:
        digest, manifest = await load_manifest(cas, args.ref)
        path = args.path.strip("/")
        nlinks = link_counts(manifest)
        entry = manifest.get(path) if path else None
        if path and entry is None:
            raise PathNotFound(path, f"manifest {digest}")
        by_name = False
        if entry is not None and entry.kind != DIR:
            shown = [entry]
        elif args.recursive:
            prefix = path + "/" if path else ""
            shown = [e for e in manifest.entries if e.path.startswith(prefix)]
        else:
            shown, by_name = manifest.children(path), True
        for e in shown:
            n = nlinks[e.path]
            name = e.path.rpartition("/")[2] if by_name else e.path
            sys.stdout.write((entry_json(e, n) if args.json else format_ls(e, n, name)) + "\n")
        return 0

    return await _with_cas(args, run)


async def _cmd_cat(args: argparse.Namespace) -> int:
    async def run(cas: CAS) -> int:
        digest, manifest = await load_manifest(cas, args.ref)
        entry = manifest.follow(args.path)
        if entry is None:
            raise PathNotFound(args.path, f"manifest {digest}")
        if entry.kind == DIR or entry.digest is None:
            raise UsageError(f"{args.path} is a directory, not a file")
        whole = Hasher()
        out = sys.stdout.buffer
        for blob in entry.blob_digests():
            data = await cas.get(blob)
            whole.update(data)
            await trio.to_thread.run_sync(out.write, data)
        await trio.to_thread.run_sync(out.flush)
        actual = whole.digest()
        if actual != entry.digest:
            raise DigestMismatch(entry.digest, actual, f"file {args.path!r}")
        return 0

    return await _with_cas(args, run)


async def _cmd_diff(args: argparse.Namespace) -> int:
    async def run(cas: CAS) -> int:
        _, a = await load_manifest(cas, args.ref_a)
        _, b = await load_manifest(cas, args.ref_b)
        for line in diff_manifests(a, b).lines():
            print(line)
        return 0

    return await _with_cas(args, run)


# -- servers -------------------------------------------------------------------------------
async def _cmd_cas_serve(args: argparse.Namespace) -> int:
    from fetcher.server import CasApp, bind_socket, serve_app  # the CLI is fetcher's only door
    from lazycaf.casdir import CasDir

    token = None
    if args.token_file is not None:
        try:
            token = args.token_file.read_text().strip()
        except OSError as exc:
            raise UsageError(f"cannot read --token-file {args.token_file}: {exc.strerror}") from exc
        if not token:
            raise UsageError(f"--token-file {args.token_file} is empty")
    store = CasDir(args.root)
    sock = bind_socket(args.listen)
    host, port = sock.getsockname()[:2]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_cancel_on_signals, nursery.cancel_scope)
        await nursery.start(serve_app, CasApp(store, token=token), sock)
        print(f"lazycaf cas: serving {store.root} on http://{host}:{port}", flush=True)
    sock.close()
    return 0


async def _cancel_on_signals(scope: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for _ in signals:
            scope.cancel()
            return


# -- entry points --------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    try:
        code: int = trio.run(args.run, args)
        return code
    except LazyCafError as exc:
        print(f"lazycaf: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except BaseExceptionGroup as group:  # errors raised inside nurseries
        leaf = _first_leaf(group)
        if not isinstance(leaf, LazyCafError):
            raise
        print(f"lazycaf: error: {leaf}", file=sys.stderr)
        return leaf.exit_code
    except KeyboardInterrupt:
        print("lazycaf: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 141


def _first_leaf(exc: BaseException) -> BaseException:
    """The first LazyCafError inside nested exception groups, else the first leaf."""
    if not isinstance(exc, BaseExceptionGroup):
        return exc
    leaves = [_first_leaf(e) for e in exc.exceptions]
    return next((e for e in leaves if isinstance(e, LazyCafError)), leaves[0])


def console_main() -> None:
    sys.exit(main())
