"""The mount zygote: `lazycaf mount` forked from a process that has its imports done.

Driven through the real CLI, a real daemon (which starts the zygote) and real FUSE mounts;
the zygote's own log lines (in the daemon's ``fetcher.log``) show which mounts it served.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

from lazycaf.cli.zygote_client import zygote_ready
from lazycaf.host.paths import zygote_socket
from tests.conftest import Host
from tests.helpers import make_tree, pack, wait_for


def _zygote_path(host: Host) -> Path:
    return zygote_socket(host.cache / "fetcher.sock")


def _zygote_pids(path: Path) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if cmdline.startswith(f"lazycaf zygote {path}"):
            pids.append(int(proc.name))
    return pids


def _served(host: Host) -> list[str]:
    """The commands the zygote forked a child for, from its log lines."""
    log = (host.cache / "fetcher.log").read_text(errors="replace")
    return re.findall(r"lazycaf zygote\[\d+\]: pid \d+: lazycaf (.*)", log)


def _started(host: Host, tmp_path: Path) -> tuple[str, Path]:
    """Pack a tree, mount it once (which starts the daemon and so the zygote), unmount."""
    cas = tmp_path / "cas"
    digest = pack(make_tree(tmp_path / "tree"), cas, "--tag", "tree:v1")
    mnt = host.mountpoint("first")
    host.cli("mount", digest, mnt, "--cas", cas)
    host.cli("umount", mnt)
    wait_for(lambda: zygote_ready(host.cache / "fetcher.sock"), "the mount zygote")
    return digest, cas


def test_mounts_go_through_the_zygote_and_behave_the_same(host: Host, tmp_path: Path) -> None:
    digest, cas = _started(host, tmp_path)
    mnt = host.mountpoint()
    # a relative mountpoint and the CAS from the environment: the child takes both from us
    proc = subprocess.run(
        [sys.executable, "-m", "lazycaf", "mount", "tree:v1", mnt.name],
        capture_output=True,
        cwd=mnt.parent,
        env={**os.environ, **host.env, "LAZYCAF_CAS": str(cas)},
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout.decode().startswith(f"mounted tree:v1 ({digest[:12]}) at {mnt};")
    assert any(cmd.endswith(f"mount tree:v1 {mnt.name}") for cmd in _served(host))
    assert (mnt / "lib/pkg/__init__.py").read_text() == "x = 1\n"
    assert "lazycaf mount tree:v1" in Path(f"/proc/{_mount_pid(mnt)}/cmdline").read_text()
    host.cli("umount", mnt)
    assert not any(mnt.iterdir())

    # several at once: the zygote forks one child each, all mounted and served
    mnts = [host.mountpoint(f"many{i}") for i in range(3)]
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        procs = list(pool.map(lambda m: host.cli("mount", digest, m, "--cas", cas), mnts))
    assert all(p.stdout.decode().startswith(f"mounted {digest}") for p in procs)
    assert len({_mount_pid(m) for m in mnts}) == 3
    for m in mnts:
        assert (m / "bin/tool").read_bytes() == b"#!/bin/sh\necho hi\n"
        host.cli("umount", m)
    assert sum(str(m) in cmd for cmd in _served(host) for m in mnts) == 3

    # errors: the same one line and exit code through the zygote as without it
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("x")
    for args in (
        ["mount", digest, str(full), "--cas", str(cas)],
        ["mount", "no-such:ref", str(mnt), "--cas", str(cas)],
        ["mount", "--bogus", digest, str(mnt)],
    ):
        via = host.cli(*args, check=False)
        direct = subprocess.run(
            [sys.executable, "-m", "lazycaf", *args],
            capture_output=True,
            env={**os.environ, **host.env, "LAZYCAF_NO_ZYGOTE": "1"},
            timeout=60,
        )
        assert via.returncode == direct.returncode != 0, args
        assert via.stderr == direct.stderr, args
        assert via.stdout == direct.stdout == b""
    served = _served(host)
    assert any("--bogus" in cmd for cmd in served) and any("no-such:ref" in cmd for cmd in served)

    # the zygote stops with its daemon
    path = _zygote_path(host)
    assert _zygote_pids(path)
    host.cli("fetcher", "stop")
    wait_for(lambda: not _zygote_pids(path) and not path.exists(), "the zygote to stop")


def test_a_zygote_mount_imports_neither_the_parsers_nor_the_config_reader(
    host: Host, tmp_path: Path
) -> None:
    """With no config file to read, the command line hands a mount to the zygote before it
    imports ``lazycaf.cli.main`` (argparse, logging) or ``lazycaf.cli.config`` (tomllib,
    dataclasses): 30-40 ms of a mount from a cold page cache. A mount it cannot hand over
    still works (the in-process path imports them then)."""
    digest, cas = _started(host, tmp_path)
    home = tmp_path / "home"  # no ~/.config/lazycaf/config.toml
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "LAZYCAF_CONFIG"}
    env |= {**host.env, "HOME": str(home)}
    mnt = host.mountpoint()
    cmd = [sys.executable, "-X", "importtime", "-m", "lazycaf", "mount", digest, str(mnt)]
    proc = subprocess.run([*cmd, "--cas", str(cas)], capture_output=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr.decode()
    imported = set(re.findall(r"\|\s*([\w.]+)\n", proc.stderr.decode()))
    assert "lazycaf.cli.zygote_client" in imported  # the -X importtime lines are there
    assert not imported & {"lazycaf.cli.main", "lazycaf.cli.config", "argparse", "tomllib"}
    assert any(cmd.endswith(f"mount {digest} {mnt} --cas {cas}") for cmd in _served(host))
    assert (mnt / "lib/pkg/__init__.py").read_text() == "x = 1\n"
    host.cli("umount", mnt)


def _mount_pid(mnt: Path) -> int:
    from lazycaf.mount.root import mount_pid

    pid = mount_pid(mnt)
    assert pid is not None
    return pid


def test_what_the_zygote_cannot_serve_mounts_in_process(host: Host, tmp_path: Path) -> None:
    digest, cas = _started(host, tmp_path)
    before = len(_served(host))
    mnt = host.mountpoint()
    lazycaf = f"{sys.executable} -m lazycaf"
    script = (
        f"{lazycaf} mount {digest} {mnt} --cas {cas} && cat {mnt}/lib/pkg/__init__.py"
        f" && {lazycaf} umount {mnt}"
    )
    cases = {
        # a mount made by the zygote would be invisible in another mount namespace
        "namespace": ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
        # no stdin to hand over (CI runs without one)
        "no stdin": ["sh", "-c", f"exec 0<&-; {script}"],
        "turned off": ["env", "LAZYCAF_NO_ZYGOTE=1", "sh", "-c", script],
        # a working directory that no longer exists: nothing to hand over
        "removed cwd": [
            "sh",
            "-c",
            f"mkdir {tmp_path}/gone && cd {tmp_path}/gone && rmdir {tmp_path}/gone && {script}",
        ],
    }
    for why, cmd in cases.items():
        proc = subprocess.run(cmd, capture_output=True, env={**os.environ, **host.env}, timeout=60)
        assert proc.returncode == 0, (why, proc.stderr.decode())
        assert b"x = 1\n" in proc.stdout, why
    assert len(_served(host)) == before  # none of them went through the zygote
    assert not any(mnt.iterdir())


def test_zygote_retires_on_changed_code_and_dies_with_the_daemon(
    host: Host, tmp_path: Path
) -> None:
    _started(host, tmp_path)
    path = _zygote_path(host)
    (old,) = _zygote_pids(path)
    # a client whose code differs (an upgrade on disk): refused, and that zygote retires
    request = {"argv": ["mount"], "cwd": "/", "env": {}, "umask": 18, "fingerprint": "other"}
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(str(path))
        socket.send_fds(s, [json.dumps(request).encode() + b"\n"], [0, 1, 2])
        answer = s.makefile("rb").readline().decode()
    assert answer.startswith("refused the code changed"), answer
    wait_for(lambda: old not in _zygote_pids(path), "the stale zygote to exit")
    wait_for(lambda: len(_zygote_pids(path)) == 1 and path.exists(), "a fresh zygote")
    (new,) = _zygote_pids(path)
    assert new != old

    # the daemon killed outright: its zygote follows it
    daemon = int((host.cache / "fetcher.lock").read_text())
    os.kill(daemon, signal.SIGKILL)
    wait_for(lambda: not _zygote_pids(path), "the zygote to exit with its daemon")


def test_the_zygote_preloads_what_a_mount_imports() -> None:
    """A child forked by the zygote must find trio, pyfuse3, lmdb and the mount code loaded
    (an empty preload makes every zygote mount import them again: 0.1 s -> 0.3 s)."""
    code = (
        "import sys; from lazycaf.cli.zygote import _preload; _preload(); "
        "need = ['trio', 'pyfuse3', 'lmdb', 'lazycaf.mount.root', 'lazycaf.mount.fuse_ops', "
        "'lazycaf.cli.host']; print(sorted(n for n in need if n not in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
