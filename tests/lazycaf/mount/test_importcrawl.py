"""Prefetch by the import graph, through a real mount: reading one .pyc brings the modules it
imports (and theirs, once they land), and nothing its code does not import at module level."""

from __future__ import annotations

import importlib.util
import os
import py_compile
import signal
import subprocess
import textwrap
from pathlib import Path

from lazycaf.core.digest import Digest
from lazycaf.mount.root import mount_pid
from tests.conftest import Host
from tests.elfmaker import make_elf
from tests.helpers import pack, wait_for

MIB = 1 << 20
SITE = "lib/python3.11/site-packages"
EXT = "_speed.cpython-311-x86_64-linux-gnu.so"
MODULES = {
    "app/__init__.py": """
        import helper.core
        from . import sub, _speed
        from .pkg import mod
        from typing import TYPE_CHECKING
        if TYPE_CHECKING:
            import heavy
        def later():
            import lazy
        class Config:
            import inclass
    """,
    "app/sub.py": "",
    "app/unused.py": "",  # beside the others, never imported
    "app/pkg/__init__.py": "",
    "app/pkg/mod.py": "",
    "helper/__init__.py": "",
    "helper/core.py": "from .. import deep\nfrom . import inner\n",  # "..": too far
    "helper/inner.py": "",
    "deep.py": "",
    "heavy/__init__.py": "",
    "lazy.py": "",
    "inclass.py": "",
    "extra/__init__.py": "",  # imported by nothing
    "extra/a.py": "",
    "extra/b.py": "",
}
IMPORTED = [
    "app/pkg/__init__.py",
    "app/pkg/mod.py",
    "app/sub.py",
    "helper/__init__.py",
    "helper/core.py",
    "helper/inner.py",  # imported by helper.core: found once that .pyc landed
    "inclass.py",
]
NOT_IMPORTED = ["app/unused.py", "heavy/__init__.py", "lazy.py", "extra/b.py", "deep.py"]


def make_site(tmp_path: Path) -> Path:
    tree = tmp_path / "tree"
    site = tree / SITE
    for rel, source in MODULES.items():
        path = site / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(source) + f"# {rel}\n")  # each file its own content
        py_compile.compile(str(path), cfile=importlib.util.cache_from_source(str(path)))
    (site / "app" / EXT).write_bytes(os.urandom(3000))
    return tree


def pyc(tree: Path, rel: str) -> Path:
    return Path(importlib.util.cache_from_source(str(tree / SITE / rel)))


def cached(host: Host, path: Path) -> bool:
    return holds(host, path.read_bytes())


def mount_and_read_app(host: Host, tree: Path, tmp_path: Path, *extra: str) -> None:
    cas = tmp_path / "cas"
    pack(tree, cas, "--tag", "app:v1")
    mnt = host.mountpoint()
    host.cli("mount", "app:v1", mnt, "--cas", cas, "--no-crowd", "--no-record", *extra)
    first = pyc(tree, "app/__init__.py").relative_to(tree)
    assert (mnt / first).read_bytes() == (tree / first).read_bytes()


def test_a_read_pyc_brings_what_it_imports(host: Host, tmp_path: Path) -> None:
    tree = make_site(tmp_path)
    mount_and_read_app(host, tree, tmp_path)
    wanted = [pyc(tree, rel) for rel in IMPORTED] + [tree / SITE / "app" / EXT]
    wait_for(lambda: all(cached(host, p) for p in wanted), "the imports to be prefetched")
    wait_for(lambda: host.stats()["prefetch_queued"] == 0, "the prefetch queue to drain")
    for rel in NOT_IMPORTED:  # nor the directory's other modules: the graph says what comes
        assert not cached(host, pyc(tree, rel)), rel
    for rel in IMPORTED:  # the compiled module, not its source
        assert not cached(host, tree / SITE / rel), rel


def test_without_the_import_graph(host: Host, tmp_path: Path) -> None:
    tree = make_site(tmp_path)
    mount_and_read_app(host, tree, tmp_path, "--no-import-graph")
    wait_for(lambda: host.stats()["prefetch_queued"] == 0, "the prefetch queue to drain")
    # directory prefetch alone: the read's directory, not the packages it imports
    assert cached(host, pyc(tree, "app/unused.py"))
    assert not cached(host, pyc(tree, "helper/core.py"))
    assert not cached(host, pyc(tree, "helper/inner.py"))


def test_a_damaged_pyc_or_a_dead_worker_costs_the_run_nothing(host: Host, tmp_path: Path) -> None:
    tree = make_site(tmp_path)
    bad = pyc(tree, "lazy.py")  # this interpreter's magic number, then garbage
    bad.write_bytes(importlib.util.MAGIC_NUMBER + bytes(12) + b"s\xff\xff\xff\x7fgarbage")
    cas = tmp_path / "cas"
    pack(tree, cas, "--tag", "app:v1")
    mnt = host.mountpoint()
    host.cli("mount", "app:v1", mnt, "--cas", cas, "--no-crowd", "--no-record")
    assert (mnt / bad.relative_to(tree)).read_bytes() == bad.read_bytes()
    first = pyc(tree, "app/__init__.py")
    assert (mnt / first.relative_to(tree)).read_bytes() == first.read_bytes()
    wanted = [pyc(tree, rel) for rel in IMPORTED]  # the worker went on after the bad one
    wait_for(lambda: all(cached(host, p) for p in wanted), "the imports to be prefetched")

    # the worker dies: the mount reads on, and directory prefetch takes over
    mount = mount_pid(mnt)
    assert mount is not None
    workers = subprocess.run(  # this mount's worker only
        ["pgrep", "-P", str(mount), "-f", "lazycaf.mount.importscan"],
        capture_output=True,
        text=True,
    ).stdout.split()
    assert len(workers) == 1, workers
    for pid in workers:
        os.kill(int(pid), signal.SIGKILL)
    wait_for(lambda: "import-graph prefetch stopped" in mount_log(host, mnt), "the crawl to stop")
    a, b = pyc(tree, "extra/a.py"), pyc(tree, "extra/b.py")
    assert (mnt / a.relative_to(tree)).read_bytes() == a.read_bytes()
    wait_for(lambda: cached(host, b), "directory prefetch of extra/'s other modules")


def mount_log(host: Host, mnt: Path) -> str:
    logs = host.cache / "logs"
    return "".join(p.read_text(errors="replace") for p in logs.glob("mount*.log"))


def test_an_extension_module_brings_the_libraries_it_links(host: Host, tmp_path: Path) -> None:
    tree = make_site(tmp_path)
    app = tree / SITE / "app"
    ext = make_elf(32 << 10, needed=("libdep.so", "libc.so.6"), runpath="$ORIGIN/../app.libs")
    (app / EXT).write_bytes(ext)
    libs = tree / SITE / "app.libs"
    libs.mkdir()
    dep = make_elf(64 << 10, needed=("libbig.so",), runpath="$ORIGIN")
    (libs / "libdep.so.1").write_bytes(dep)
    (libs / "libdep.so").symlink_to("libdep.so.1")
    big = make_elf(17 * MIB, tables_at=5 * MIB + 10)  # too big to prefetch whole
    (libs / "libbig.so").write_bytes(big)
    unused = make_elf(64 << 10)
    (libs / "libunused.so").write_bytes(unused)
    mount_and_read_app(host, tree, tmp_path)

    def chunk(k: int) -> bytes:
        return big[k * MIB : (k + 1) * MIB]

    # the module, the library it needs (through a symlink), and what the loader reads of
    # the big one it needs: its headers, its tables, its writable segment
    wanted = [ext, dep, chunk(0), chunk(5), chunk(16)]
    wait_for(lambda: all(holds(host, b) for b in wanted), "the libraries to be prefetched")
    wait_for(lambda: host.stats()["prefetch_queued"] == 0, "the prefetch queue to drain")
    assert not holds(host, chunk(8))  # its code: left to the run's reads
    assert not holds(host, unused)


def holds(host: Host, data: bytes) -> bool:
    hexdigest = Digest.of(data).hex
    return (host.cache / "blobs" / hexdigest[:2] / hexdigest).exists()


def test_another_pythons_pyc_files_turn_it_off(host: Host, tmp_path: Path) -> None:
    tree = make_site(tmp_path)
    for path in tree.rglob("*.pyc"):  # another interpreter's magic number
        path.write_bytes(b"\x00\x00\r\n" + path.read_bytes()[4:])
    cas = tmp_path / "cas"
    pack(tree, cas, "--tag", "app:v1")
    mnt = host.mountpoint()
    host.cli("mount", "app:v1", mnt, "--cas", cas, "--no-crowd", "--no-record")
    for rel in [*IMPORTED, "app/__init__.py"][:8]:
        (mnt / pyc(tree, rel).relative_to(tree)).read_bytes()
    wait_for(lambda: "another Python's" in mount_log(host, mnt), "the crawl to give up")
    a, b = pyc(tree, "extra/a.py"), pyc(tree, "extra/b.py")
    assert (mnt / a.relative_to(tree)).read_bytes() == a.read_bytes()
    wait_for(lambda: cached(host, b), "directory prefetch of extra/'s other modules")
