"""The ``lazycaf`` command line: ``main(argv) -> int``.

Only this module configures logging or decides exit codes: a ``LazyCafError`` becomes one
line on stderr (``lazycaf: error: ...``) and its ``exit_code``. Command modules are imported
only for the command that runs (``lazycaf mount`` never loads httpx or hypercorn), which
keeps start-up, and so mount-ready time, short. A background ``lazycaf mount`` first asks
the host's mount zygote (``lazycaf.cli.zygote_client``, standard library only) to run it in a
process that has its imports done; trio is imported only when a command runs here.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from pathlib import Path
from typing import Any

from lazycaf import __version__
from lazycaf.core.chunking import DEFAULT_CHUNK_SIZE
from lazycaf.core.errors import LazyCafError, first_error
from lazycaf.host.defaults import FETCH_TIMEOUT, PEER_TIMEOUT

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lazycaf",
        description="Lazy, content-addressed Python executables: pack a tree into a CAS, "
        "mount it anywhere, fetch only what is read.",
    )
    p.add_argument("--version", action="version", version=f"lazycaf {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="log debug details")
    p.add_argument(
        "--config",
        metavar="FILE",
        help="the config file (default: $LAZYCAF_CONFIG, ~/.config/lazycaf/config.toml, "
        "/etc/lazycaf/config.toml: the first found); flags and environment beat it",
    )
    p.add_argument(
        "-q", "--quiet", action="store_true", help="no progress bars (drawn only on a terminal)"
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def cas_opt(sp: argparse.ArgumentParser, *, cacert: bool = True) -> None:
        """``cacert``: the command talks to the CAS itself (not through the daemon)."""
        sp.add_argument(
            "--cas",
            metavar="URL|PATH",
            help="the CAS (default: $LAZYCAF_CAS or ~/.cache/lazycaf/cas)",
        )
        if cacert:
            sp.add_argument(
                "--cacert",
                type=Path,
                metavar="FILE",
                help="trust the CAs in FILE for an https CAS "
                "(default: $SSL_CERT_FILE, else the system's store)",
            )

    sp = sub.add_parser("pack", help="pack a tree into the CAS; prints the manifest digest")
    sp.add_argument("dir", type=Path)
    cas_opt(sp)
    sp.add_argument("--tag", metavar="NAME", help="also point the ref NAME at the manifest")
    sp.add_argument("--keep-setid", action="store_true", help="keep setuid/setgid bits")
    sp.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE, metavar="BYTES")
    sp.add_argument(
        "--jobs",
        type=int,
        default=4,
        help="upload batches in flight (default and max 4; a local CAS takes one at a time)",
    )
    sp.add_argument(
        "--rehash",
        action="store_true",
        help="hash every file again (default: trust digests of files whose stat is unchanged)",
    )
    sp.add_argument(
        "--normalize",
        action="store_true",
        help="pack a rebuild of the same sources to the same digest: every mtime set to "
        "$SOURCE_DATE_EPOCH (else 0), timestamp-based .pyc made unchecked hash-based",
    )
    sp.add_argument(
        "--json", action="store_true", help="print one JSON object (digest, counts, seconds)"
    )
    sp.set_defaults(run="store:pack_tree")

    sp = sub.add_parser("ls", help="list a packed tree like ls -l (UTC times)")
    sp.add_argument("ref")
    sp.add_argument("path", nargs="?", default="")
    sp.add_argument("-R", "--recursive", action="store_true", help="every entry below PATH")
    sp.add_argument("--json", action="store_true", help="one JSON object per entry")
    cas_opt(sp)
    sp.set_defaults(run="store:ls")

    sp = sub.add_parser("cat", help="write a packed file's bytes to stdout (verified)")
    sp.add_argument("ref")
    sp.add_argument("path")
    cas_opt(sp)
    sp.set_defaults(run="store:cat")

    sp = sub.add_parser("diff", help="what changed between two packed trees")
    sp.add_argument("ref_a")
    sp.add_argument("ref_b")
    cas_opt(sp)
    sp.add_argument("--json", action="store_true", help="print one JSON object")
    sp.add_argument(
        "--mtimes",
        action="store_true",
        help="also list entries whose only change is their mtime (default: counted)",
    )
    sp.add_argument(
        "--explain",
        action="store_true",
        help="fetch both versions of each file whose content changed and name the cause "
        "(a .pyc source mtime, an archive timestamp, an ELF build id, an embedded build "
        "path, or other bytes)",
    )
    sp.set_defaults(run="store:diff")

    def tls_opts(sp: argparse.ArgumentParser, what: str) -> None:
        sp.add_argument("--tls-cert", type=Path, metavar="FILE", help=f"serve {what} over https")
        sp.add_argument("--tls-key", type=Path, metavar="FILE", help="the --tls-cert's key")

    def cache_opts(sp: argparse.ArgumentParser) -> None:
        sp.add_argument(
            "--cache",
            type=Path,
            help="host cache (default: $LAZYCAF_CACHE or ~/.cache/lazycaf/host)",
        )
        sp.add_argument("--socket", type=Path, help="daemon socket (default: CACHE/fetcher.sock)")

    def cache_size_opt(sp: argparse.ArgumentParser, what: str) -> None:
        sp.add_argument(
            "--cache-size",
            metavar="BYTES",
            help=f"{what}, e.g. 500M or 20G; remembered by the cache "
            "(default: 10G, or half the cache's filesystem if smaller)",
        )

    def mount_opts(sp: argparse.ArgumentParser, *, profile: bool = True) -> None:
        """What ``mount`` and ``run`` (and ``profile record``) share."""
        cas_opt(sp, cacert=False)
        cache_opts(sp)
        sp.add_argument(
            "--fetch-timeout",
            type=float,
            default=FETCH_TIMEOUT,
            metavar="SECONDS",
            help="a read whose blob is not fetched by then fails with EIO "
            f"(default {FETCH_TIMEOUT:g})",
        )
        sp.add_argument(
            "--open-roundtrips",
            action="store_true",
            help="answer every open/opendir in the mount (stock pyfuse3 behaviour; for comparison)",
        )
        if profile:
            sp.add_argument(
                "--profile",
                metavar="NAME",
                help="profile to prefetch and record into "
                "(default: the ref's name without its tag)",
            )
        sp.add_argument(
            "--no-prefetch", action="store_true", help="do not prefetch the profile's hot set"
        )
        sp.add_argument(
            "--no-crowd",
            action="store_true",
            help="without a profile, do not prefetch what other executables' profiles say "
            "is hot among the files this one shares with them",
        )
        sp.add_argument(
            "--no-import-graph",
            action="store_true",
            help="without a profile, do not prefetch the modules that the Python modules "
            "a run loads import",
        )
        sp.add_argument(
            "--eager-share",
            type=float,
            default=0.3,
            metavar="FRACTION",
            help="fetch the whole tree in the background once a run has read this "
            "share of it, or the profile says it will (default 0.3; 0 disables)",
        )
        sp.add_argument(
            "--offline",
            action="store_true",
            help="use only the host cache: refuse unless every blob is cached; a ref name "
            "resolves to what this cache last resolved it to",
        )
        cache_size_opt(sp, "the byte budget of the fetcher daemon if this mount starts one")

    # no abbreviated options: the zygote client reads --cache, --socket and --foreground
    # by their full names before this parser runs
    sp = sub.add_parser(
        "mount", help="mount a packed tree; bytes are fetched on first read", allow_abbrev=False
    )
    sp.add_argument("ref")
    sp.add_argument("mountpoint", type=Path)
    mount_opts(sp)
    sp.add_argument("--foreground", action="store_true", help="serve in this process")
    sp.add_argument(
        "--no-record", action="store_true", help="do not merge the run into the profile"
    )
    sp.add_argument(
        "--owner-pid",
        type=int,
        metavar="PID",
        help="unmount once process PID exits (what `lazycaf run` passes)",
    )
    sp.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    sp.set_defaults(run="host:mount")

    run_text = (
        "mount REF in a private directory, run CMD ({mnt} in its arguments and $LAZYCAF_MNT "
        "are the mountpoint), unmount; exit with CMD's exit code"
    )
    sp = sub.add_parser(
        "run",
        help=run_text,
        description=run_text,
        usage="lazycaf run REF [--profile NAME] [--record] [mount options] -- CMD ...",
        allow_abbrev=False,
    )
    sp.add_argument("ref")
    mount_opts(sp)
    sp.add_argument("--record", action="store_true", help="merge this run's reads into the profile")
    sp.set_defaults(cmd=[], run="run:run")

    sp = sub.add_parser("materialize", help="a full ordinary copy (reflinks on Btrfs)")
    sp.add_argument("ref")
    sp.add_argument("dir", type=Path)
    sp.add_argument(
        "--copy",
        action="store_true",
        help="copy bytes even where reflinks work (a tree sharing no extents with the cache)",
    )
    sp.add_argument(
        "--keep-setid",
        action="store_true",
        help="keep the manifest's modes as they are; by default setuid/setgid (06000) are "
        "cleared on every file and directory, and others-write (0002) on every directory, "
        "the root included",
    )
    cas_opt(sp, cacert=False)
    cache_opts(sp)
    sp.add_argument("--json", action="store_true", help="print one JSON object")
    sp.set_defaults(run="host:materialize")

    sp = sub.add_parser("umount", help="unmount a lazycaf mount")
    sp.add_argument("mountpoint", type=Path)
    sp.add_argument("--lazy", action="store_true", help="detach now even if files are open")
    sp.set_defaults(run="host:umount")

    sp = sub.add_parser("profile", help="access profiles: record, show, save")
    psub = sp.add_subparsers(dest="profile_command", required=True, metavar="SUBCOMMAND")
    prec = psub.add_parser(
        "record",
        help="the same as `lazycaf run --record --profile NAME REF -- CMD ...`",
        usage="lazycaf profile record --name NAME REF [mount options] -- CMD ...",
        allow_abbrev=False,
    )
    prec.add_argument("--name", dest="profile", required=True, help="the profile to record into")
    prec.add_argument("ref")
    mount_opts(prec, profile=False)
    prec.set_defaults(cmd=[], record=True, run="run:run")
    pshow = psub.add_parser("show", help="hot set against the whole executable")
    pshow.add_argument("name")
    pshow.add_argument("--top", type=int, default=15, help="hot files to list (default 15)")
    cas_opt(pshow)
    pshow.add_argument("--json", action="store_true", help="print one JSON object")
    pshow.set_defaults(run="profile:show")
    psave = psub.add_parser("save", help="save a running mount's trace into its profile now")
    psave.add_argument("mountpoint", type=Path)
    psave.set_defaults(run="profile:save")

    sp = sub.add_parser("stats", help="the fetcher daemon's statistics")
    cache_opts(sp)
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(run="host:stats")

    sp = sub.add_parser("fetcher", help="the per-host fetcher daemon")
    fsub = sp.add_subparsers(dest="fetcher_command", required=True, metavar="SUBCOMMAND")
    fserve = fsub.add_parser("serve", help="run the daemon in the foreground")
    cas_opt(fserve)
    cache_opts(fserve)
    cache_size_opt(fserve, "keep the cache's blobs under this many bytes")
    for name, default in (("high", 0.9), ("low", 0.8)):
        fserve.add_argument(
            f"--gc-{name}",
            type=float,
            metavar="FRACTION",
            help=f"GC {'starts above' if name == 'high' else 'evicts down to'} this share "
            f"of the budget (default {default})",
        )
    metrics_opt(fserve, "the daemon's")
    fserve.add_argument(
        "--peer-listen",
        metavar="HOST:PORT",
        help="serve this cache to peer daemons on HOST:PORT (port 0 picks one)",
    )
    fserve.add_argument(
        "--peer-advertise",
        metavar="HOST:PORT",
        help="this daemon's address as the peer list writes it (default: the bound address)",
    )
    fserve.add_argument(
        "--peers",
        type=Path,
        metavar="FILE",
        help="peer list: one HOST:PORT a line; re-read when it changes",
    )
    fserve.add_argument(
        "--peer-token-file", type=Path, metavar="FILE", help="the bearer token peers share"
    )
    tls_opts(fserve, "the peer listener")
    fserve.add_argument(
        "--peer-tls",
        action="store_true",
        help="reach peers over https (verified like the CAS: --cacert, $SSL_CERT_FILE, system)",
    )
    fserve.add_argument(
        "--peer-timeout",
        type=float,
        default=PEER_TIMEOUT,
        metavar="SECONDS",
        help="give up on a peer request after this long and back the peer off "
        f"(default {PEER_TIMEOUT:g})",
    )
    fserve.add_argument(
        "--log-file",
        type=Path,
        metavar="FILE",
        help="log to FILE, rotated (4 MiB x 3 kept), unless run by systemd or --log-stderr "
        "(default: stderr; a daemon a mount starts logs to CACHE/fetcher.log)",
    )
    fserve.add_argument("--log-stderr", action="store_true", help="log to stderr, always")
    fserve.set_defaults(run="host:fetcher_serve")
    fstop = fsub.add_parser("stop", help="stop the daemon of a cache (mounts restart it)")
    cache_opts(fstop)
    fstop.set_defaults(run="host:fetcher_stop")

    sp = sub.add_parser("service", help="systemd units for the fetcher daemon and the CAS")
    ssub = sp.add_subparsers(dest="service_command", required=True, metavar="SUBCOMMAND")
    sinst = ssub.add_parser(
        "install",
        help="write lazycaf-fetcher.service and lazycaf-cas.service running this lazycaf; "
        "mark the cache as the service's (mounts then never start a daemon)",
    )
    suninst = ssub.add_parser("uninstall", help="remove the units and the cache's service marker")
    for s_parser in (sinst, suninst):
        s_parser.add_argument(
            "--prefix",
            type=Path,
            default=Path("/etc/systemd/system"),
            help="the unit directory (default /etc/systemd/system)",
        )
        s_parser.add_argument(
            "--cache",
            type=Path,
            help="the daemon's host cache (default: $LAZYCAF_CACHE or ~/.cache/lazycaf/host)",
        )
    sinst.add_argument(
        "--cas",
        metavar="URL|PATH",
        help="the daemon's CAS (default: $LAZYCAF_CAS or ~/.cache/lazycaf/cas)",
    )
    served = sinst.add_mutually_exclusive_group()
    served.add_argument(
        "--cas-root",
        type=Path,
        default=Path("/var/lib/lazycaf/cas"),
        help="the directory lazycaf-cas.service serves (default /var/lib/lazycaf/cas)",
    )
    served.add_argument(
        "--cas-store",
        metavar="s3://BUCKET[/PREFIX]",
        help="serve this bucket instead (its endpoint and keys: /etc/lazycaf/s3.env)",
    )
    sinst.add_argument(
        "--cas-listen",
        default="127.0.0.1:8470",
        metavar="HOST:PORT",
        help="where lazycaf-cas.service listens (default 127.0.0.1:8470)",
    )
    sinst.set_defaults(run="service:install")
    suninst.set_defaults(run="service:uninstall")

    sp = sub.add_parser("affinity", help="rank peer hosts by how much of an executable they hold")
    sp.add_argument("ref")
    sp.add_argument(
        "--peers", required=True, metavar="FILE|ADDR,...", help="a peer list file, or addresses"
    )
    sp.add_argument("--profile", metavar="NAME", help="hot set of this profile (default: REF's)")
    sp.add_argument("--token-file", type=Path, help="the bearer token peers share")
    sp.add_argument("--timeout", type=float, default=PEER_TIMEOUT, metavar="SECONDS")
    sp.add_argument("--json", action="store_true")
    cas_opt(sp)
    sp.set_defaults(run="peers:affinity")

    sp = sub.add_parser("cache", help="manage the host cache")
    csub = sp.add_subparsers(dest="cache_command", required=True, metavar="SUBCOMMAND")
    cinit = csub.add_parser("init", help="create a cache dir (zstd compression on Btrfs)")
    cinit.add_argument("dir", type=Path)
    cinit.set_defaults(run="host:cache_init")
    cstatus = csub.add_parser("status", help="size against budget, pins, sharing, compression")
    cache_opts(cstatus)
    cstatus.add_argument("--json", action="store_true")
    cstatus.set_defaults(run="cache:status")
    cgc = csub.add_parser("gc", help="evict down to the low watermark now")
    cache_opts(cgc)
    cgc.set_defaults(run="cache:gc")
    verify_text = (
        "rehash every cached blob and drop those that do not verify; "
        "exit 4 when some did not (they are fetched again on their next read)"
    )
    cverify = csub.add_parser("verify", help=verify_text, description=verify_text)
    cache_opts(cverify)
    cverify.add_argument(
        "--rate",
        default="100M",
        metavar="BYTES",
        help="read at most this many bytes a second, e.g. 100M (default; 0: no limit)",
    )
    cverify.add_argument("--json", action="store_true")
    cverify.set_defaults(run="cache:verify")
    cpin = csub.add_parser("pin", help="fetch an executable's blobs and keep them out of GC")
    cpin.add_argument("ref")
    cpin.add_argument("--unpin", action="store_true", help="remove one pin instead")
    cas_opt(cpin, cacert=False)
    cache_opts(cpin)
    cpin.add_argument("--json", action="store_true", help="print one JSON object")
    cpin.set_defaults(run="cache:pin")

    sp = sub.add_parser("cas", help="run the HTTP CAS server; collect the store's garbage")
    cas_sub = sp.add_subparsers(dest="cas_command", required=True, metavar="SUBCOMMAND")
    serve = cas_sub.add_parser(
        "serve", help="serve a CAS directory or an S3 bucket over HTTP (the frontend daemons use)"
    )
    # not ``required``: argparse would then ignore a ``root``/``store`` from the config
    where = serve.add_mutually_exclusive_group()
    where.add_argument("--root", type=Path, help="a CAS directory on this host")
    where.add_argument(
        "--store",
        metavar="s3://BUCKET[/PREFIX]",
        help="an S3-compatible bucket (endpoint, region, keys: AWS_* variables or the options "
        "below); any number of frontends may serve one bucket",
    )
    serve.add_argument("--s3-endpoint", metavar="URL", help="default: $AWS_ENDPOINT_URL")
    serve.add_argument("--s3-region", metavar="NAME", help="default: $AWS_REGION")
    serve.add_argument("--listen", default="127.0.0.1:8470", metavar="HOST:PORT")
    serve.add_argument("--token-file", type=Path, help="writes need this bearer token")
    serve.add_argument(
        "--read-token-file",
        type=Path,
        metavar="FILE",
        help="reads need this bearer token (or the write token) too",
    )
    tls_opts(serve, "the CAS")
    metrics_opt(serve, "the CAS server's")
    serve.set_defaults(run="store:cas_serve")
    gc_text = (
        "delete the blobs no ref, manifest, profile or --keep reaches and older than the "
        "grace (runs against the store: a directory or s3://, not an http(s) server)"
    )
    cgc = cas_sub.add_parser("gc", help=gc_text, description=gc_text)
    cas_opt(cgc)
    cgc.add_argument(
        "--grace",
        default="24h",
        metavar="DURATION",
        help="never delete a blob stored less than this long ago, so a pack in flight "
        "keeps its blobs: 24h (default), 30m, 90s, 0s",
    )
    cgc.add_argument("--dry-run", action="store_true", help="report, delete nothing")
    cgc.add_argument(
        "--keep", action="extend", nargs="+", default=[], metavar="DIGEST", help="also roots"
    )
    cgc.add_argument("--json", action="store_true", help="print one JSON object")
    cgc.set_defaults(run="storeadmin:cas_gc")

    sp = sub.add_parser("ref", help="list and remove refs (on the store: a directory or s3://)")
    ref_sub = sp.add_subparsers(dest="ref_command", required=True, metavar="SUBCOMMAND")
    rls = ref_sub.add_parser("ls", help="every ref and the digest it names")
    cas_opt(rls)
    rls.add_argument("--json", action="store_true", help="one JSON object per ref")
    rls.set_defaults(run="storeadmin:ref_ls")
    rrm = ref_sub.add_parser(
        "rm", help="remove a ref; its blobs become garbage for a GC after the grace"
    )
    rrm.add_argument("name")
    cas_opt(rrm)
    rrm.set_defaults(run="storeadmin:ref_rm")

    sp = sub.add_parser("config", help="the config file")
    config_sub = sp.add_subparsers(dest="config_command", required=True, metavar="SUBCOMMAND")
    cshow = config_sub.add_parser(
        "show",
        help="each command's effective options and where each came from "
        "(flag, env, file:line, default)",
        usage="lazycaf config show [--json] [-- COMMAND ARGS ...]",
    )
    cshow.add_argument("--json", action="store_true")
    cshow.set_defaults(cmd=[], run="config:show")
    return p


def build_parser() -> argparse.ArgumentParser:
    """The parser, without the config file's defaults (``lazycaf.cli.config`` adds them)."""
    return _parser()


def metrics_opt(parser: argparse.ArgumentParser, whose: str) -> None:
    parser.add_argument(
        "--metrics-listen",
        metavar="HOST:PORT",
        help=f"serve {whose} Prometheus metrics on GET /metrics at HOST:PORT",
    )


def _command(spec: str) -> Any:
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(f"lazycaf.cli.{module}"), name)


# -- entry points --------------------------------------------------------------------------
def main(argv: list[str] | None = None, *, zygote: bool = True) -> int:
    """``zygote``: let the host's mount zygote run a background ``mount`` (the zygote's own
    child passes False)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if zygote:
        from lazycaf.cli.zygote_client import try_zygote

        code = try_zygote(argv)
        if code is not None:
            return code
    tail: list[str] = []
    if "--" in argv:  # everything after -- is a command to run (run, profile record)
        cut = argv.index("--")
        argv, tail = argv[:cut], argv[cut + 1 :]
    try:
        parser = _configured_parser(argv)
    except LazyCafError as exc:
        print(f"lazycaf: error: {exc}", file=sys.stderr)
        return exc.exit_code
    args = parser.parse_args(argv)
    if tail:
        if not hasattr(args, "cmd"):
            parser.error("'--' is only for `lazycaf run`, `profile record` and `config show`")
        args.cmd = [*args.cmd, *tail]
    logging.basicConfig(
        level=logging.DEBUG
        if args.verbose
        else logging.INFO
        if args.command in _SERVICES
        else logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    if args.command == "mount" and not args.foreground:
        from lazycaf.cli.host import mount_background

        try:
            return mount_background(args, run_command)
        except LazyCafError as exc:
            print(f"lazycaf: error: {exc}", file=sys.stderr)
            return exc.exit_code
    return run_command(args)


_SERVICES = frozenset({"mount", "fetcher", "cas"})


def _configured_parser(argv: list[str]) -> argparse.ArgumentParser:
    """The parser with the config file's values as its defaults; a ``--config`` is passed on
    to the command's children (the daemon a mount starts) as ``$LAZYCAF_CONFIG``."""
    from lazycaf.cli.config import CONFIG_ENV, apply, explicit_config, load_config

    explicit = explicit_config(argv)
    config = load_config(explicit)
    if explicit is not None and config is not None:
        os.environ[CONFIG_ENV] = str(config.path.absolute())
    parser = _parser()
    apply(parser, config)
    return parser


def run_command(args: argparse.Namespace) -> int:
    """Run the parsed command; errors become one line on stderr and an exit code."""
    import trio  # here, not at the top: a mount through the zygote never needs it

    try:
        code: int = trio.run(_command(args.run), args)
        return code
    except LazyCafError as exc:
        print(f"lazycaf: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except BaseExceptionGroup as group:  # errors raised inside nurseries
        leaf = first_error(group)
        if not isinstance(leaf, LazyCafError):
            raise
        print(f"lazycaf: error: {leaf}", file=sys.stderr)
        return leaf.exit_code
    except KeyboardInterrupt:
        print("lazycaf: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 141
