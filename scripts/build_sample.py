#!/usr/bin/env python3
"""Build a self-contained, relocatable Python 3.11 tree: LazyCAF's demo/benchmark sample.

The tree is a copy of a (pyenv) interpreter prefix -- bin/python3.11, libpython, and the
stdlib with its __pycache__ and lib-dynload -- minus bulky parts a job never needs, plus
the requested packages (default: numpy) installed into its own site-packages by pip.

Two facts shape the script:

* Relocation. The pyenv binary, libpython and lib-dynload modules carry
  RUNPATH=<prefix>/lib, so a plain copy silently loads the *host* libpython. Every ELF
  RPATH/RUNPATH entry that points inside the source prefix is rewritten to the
  equivalent $ORIGIN-relative path with patchelf ($ORIGIN entries, as in numpy wheels,
  are left alone). The final check asserts that sys.prefix is OUTDIR and that the
  libpython mapped in /proc/self/maps is OUTDIR's.
* Mtimes. Python validates a timestamp-based .pyc against its source's mtime and size,
  so every file is copied with shutil.copy2 (nanosecond mtimes preserved); patched ELFs
  get their mtimes restored. The check runs with PYTHONDONTWRITEBYTECODE=1 so nothing
  is written into the tree after it.

With ``torch`` among the packages (the big-workload sample: ``--packages torch==2.13.0
numpy``), pip's plan is checked first (``pip install --dry-run --report``): the build refuses
to start if torch would come from anywhere but a local wheel, or if the plan holds a CUDA
runtime (``nvidia-*``, ``triton``), so a spec that resolves to a newer torch never downloads a
multi-GB CUDA build. The check then imports torch (and numpy) from the tree.

Usage: python scripts/build_sample.py OUTDIR [--packages numpy ...] [--python PREFIX] [--force]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, NoReturn

VER = "3.11"
# Not needed by jobs; site-packages of the source prefix holds many unrelated packages.
STDLIB_EXCLUDE = {"test", "idlelib", "tkinter", "turtledemo", "ensurepip", "lib2to3"}
STDLIB_EXCLUDE |= {"site-packages"}
# Packages the check imports when they were asked for (their __file__ must be in the tree).
CHECKED_IMPORTS = ("numpy", "torch")
# Asking for one of these (normalised name prefix) checks pip's plan for a CUDA download.
HEAVY_REMOTE = ("torch", "triton", "nvidia")
CHECK_CODE = r"""
import sys, json, sqlite3, ssl
mods = {name: __import__(name).__file__ for name in sys.argv[1:]}
maps = [line.split(None, 5) for line in open("/proc/self/maps")]
libs = sorted({m[5].strip() for m in maps if len(m) > 5 and "libpython" in m[5]})
print(json.dumps({"prefix": sys.prefix, "libpython": libs, "modules": mods}))
"""


def die(code: int, msg: str) -> NoReturn:
    print(f"build_sample: error: {msg}", file=sys.stderr)
    sys.exit(code)


def run(cmd: list[str], capture: bool = False, env: dict[str, str] | None = None) -> str:
    try:
        out = subprocess.PIPE if capture else None
        return subprocess.run(cmd, check=True, text=True, stdout=out, env=env, cwd="/").stdout or ""
    except subprocess.CalledProcessError as e:
        die(1, f"command failed (exit {e.returncode}): {' '.join(cmd)}")


def copy_prefix(src: Path, out: Path) -> None:
    (out / "bin").mkdir(parents=True)
    shutil.copy2(src / "bin" / f"python{VER}", out / "bin" / f"python{VER}")
    for name in ("python3", "python"):
        os.symlink(f"python{VER}", out / "bin" / name)
    (out / "lib").mkdir()
    for lib in sorted((src / "lib").glob(f"libpython{VER}.so*")):
        dst = out / "lib" / lib.name
        if lib.is_symlink():
            os.symlink(os.readlink(lib), dst)
        else:
            shutil.copy2(lib, dst)

    def ignore(d: str, names: list[str]) -> set[str]:
        if Path(d) == src / "lib" / f"python{VER}":
            return {n for n in names if n in STDLIB_EXCLUDE or n.startswith(f"config-{VER}-")}
        return set()

    stdlib = out / "lib" / f"python{VER}"
    shutil.copytree(src / "lib" / f"python{VER}", stdlib, symlinks=True, ignore=ignore)
    (stdlib / "site-packages").mkdir()


def package_name(spec: str) -> str:
    """The distribution name of a requirement ``spec``, normalised (``Torch==2.13.0`` ->
    ``torch``, ``typing-extensions`` -> ``typing_extensions``)."""
    return re.split(r"[<>=!~\[; ]", spec.strip(), maxsplit=1)[0].replace("-", "_").lower()


def heavy_downloads(report: dict[str, Any]) -> list[str]:
    """What of pip's ``--report`` plan would come as a multi-GB download: torch from anywhere
    but a local file, or any CUDA runtime package (``nvidia-*``, ``triton``); ``name
    version url`` of each."""
    found = []
    for item in report.get("install", []):
        meta = item.get("metadata", {})
        name = str(meta.get("name", "")).lower().replace("_", "-")
        url = str(item.get("download_info", {}).get("url", ""))
        if name == "torch" and url.startswith("file:"):
            continue
        if name == "torch" or name == "triton" or name.startswith("nvidia-"):
            found.append(f"{name} {meta.get('version', '?')} {url}")
    return found


def check_plan(pip: list[str], packages: list[str]) -> None:
    """With torch asked for: refuse before anything downloads if pip's plan holds a remote
    torch or a CUDA runtime (``heavy_downloads``)."""
    if not any(package_name(p).startswith(HEAVY_REMOTE) for p in packages):
        return
    with tempfile.TemporaryDirectory(prefix="build_sample-plan-") as tmp:
        report = Path(tmp) / "report.json"
        run([*pip, "--dry-run", "--report", str(report), *packages])
        heavy = heavy_downloads(json.loads(report.read_text()))
    if heavy:
        die(
            2,
            f"pip would download a CUDA build for {packages}: {'; '.join(heavy)} "
            "(use the version on local disk, e.g. torch==2.13.0)",
        )


def compile_errors(output: str) -> list[str]:
    """The files ``compileall -q`` could not compile (its ``*** Error compiling 'PATH'...``
    lines)."""
    found = []
    for line in output.splitlines():
        if line.startswith("*** Error compiling "):
            found.append(line.removeprefix("*** Error compiling ").rstrip(".").strip("'"))
    return found


def compile_site(py: str, site: Path) -> None:
    """Byte-compile ``site``. A file this Python cannot compile (torch ships test helpers in
    3.12 syntax) cannot be imported by it either: said and skipped, as pip does; any other
    failure ends the build."""
    cmd = [py, "-m", "compileall", "-q", "-j0", str(site)]
    res = subprocess.run(cmd, text=True, capture_output=True, cwd="/")
    if res.returncode == 0:
        return
    bad = compile_errors(res.stdout)
    if not bad:
        die(1, f"command failed (exit {res.returncode}): {' '.join(cmd)}\n{res.stderr[-2000:]}")
    shown = ", ".join(os.path.relpath(b, site) for b in bad[:5])
    more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
    print(f"build_sample: {len(bad)} file(s) not byte-compiled (syntax): {shown}{more}")


def install_packages(src: Path, out: Path, packages: list[str]) -> None:
    py = str(src / "bin" / f"python{VER}")
    pip = [py, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--ignore-installed"]
    pip += ["--no-warn-script-location", "--root-user-action=ignore", "--prefix", str(out)]
    check_plan(pip, packages)
    run([*pip, *packages])
    site = out / "lib" / f"python{VER}" / "site-packages"
    compile_site(py, site)  # no-op where pip already compiled
    installed = {p.name.lower().split("-")[0] for p in site.iterdir()}
    for pkg in packages:
        name = package_name(pkg)
        if name not in installed:
            die(1, f"package {pkg!r} did not end up under {site}")
    # pip's console scripts (f2py, ...) have a shebang pointing at the host interpreter.
    for entry in (out / "bin").iterdir():
        if not entry.name.startswith("python"):
            entry.unlink() if not entry.is_dir() or entry.is_symlink() else shutil.rmtree(entry)


def is_elf(path: Path) -> bool:
    with path.open("rb") as f:
        return f.read(4) == b"\x7fELF"


def fix_rpaths(src: Path, out: Path) -> int:
    src_real, fixed = Path(os.path.realpath(src)), 0
    for root, _dirs, files in os.walk(out):
        for fn in files:
            p = Path(root) / fn
            if p.is_symlink() or not p.is_file() or not is_elf(p):
                continue
            old = run(["patchelf", "--print-rpath", str(p)], capture=True).strip()
            entries = [e for e in old.split(":") if e]
            new = []
            for e in entries:
                real = Path(os.path.realpath(e)) if e.startswith("/") else None
                if real is not None and (real == src_real or src_real in real.parents):
                    e = "$ORIGIN/" + os.path.relpath(out / real.relative_to(src_real), p.parent)
                    e = e.removesuffix("/.")
                new.append(e)
            if new != entries:
                st = p.stat()
                run(["patchelf", "--set-rpath", ":".join(new), str(p)])
                os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
                fixed += 1
    return fixed


def clean_tree(out: Path) -> tuple[int, int]:
    files = size = 0
    for root, _dirs, names in os.walk(out):
        for fn in names:
            p = Path(root) / fn
            mode = p.lstat().st_mode
            if stat.S_ISSOCK(mode) or stat.S_ISFIFO(mode):
                p.unlink()
                continue
            files += 1
            size += p.lstat().st_size if stat.S_ISREG(mode) else 0
    return files, size


def check(out: Path, imports: list[str]) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONHOME", "PYTHONPATH")}
    env.update(PYTHONDONTWRITEBYTECODE="1", PYTHONNOUSERSITE="1")
    cmd = [str(out / "bin" / "python3"), "-c", CHECK_CODE, *imports]
    res = run(cmd, capture=True, env=env).strip()
    info = json.loads(res.splitlines()[-1])
    want_prefix = os.path.realpath(out)
    want_lib = os.path.realpath(out / "lib" / f"libpython{VER}.so.1.0")
    if os.path.realpath(info["prefix"]) != want_prefix:
        die(1, f"check failed: sys.prefix={info['prefix']!r}, expected {want_prefix!r}")
    if [os.path.realpath(x) for x in info["libpython"]] != [want_lib]:
        die(1, f"check failed: mapped libpython {info['libpython']!r}, expected [{want_lib!r}]")
    for name, file in info["modules"].items():
        if not os.path.realpath(file).startswith(want_prefix + os.sep):
            die(1, f"check failed: {name} imported from {file!r}, outside {want_prefix!r}")
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("outdir", type=Path)
    ap.add_argument("--packages", nargs="+", default=["numpy"])
    ap.add_argument("--python", type=Path, default=Path(sys.base_prefix), help="prefix to copy")
    ap.add_argument("--force", action="store_true", help="remove an existing OUTDIR first")
    args = ap.parse_args()
    t0 = time.monotonic()
    src: Path = args.python.resolve()
    out = Path(os.path.abspath(args.outdir))
    if shutil.which("patchelf") is None:
        die(2, "patchelf not found on PATH (apt-get install patchelf)")
    if not all((src / f).is_file() for f in (f"bin/python{VER}", f"lib/python{VER}/os.py")):
        die(2, f"{src} does not look like a Python {VER} prefix")
    if out.exists() or out.is_symlink():
        if args.force:
            shutil.rmtree(out) if out.is_dir() and not out.is_symlink() else out.unlink()
        elif not out.is_dir() or any(out.iterdir()):
            die(2, f"{out} exists and is not an empty directory (use --force)")
        else:
            out.rmdir()
    copy_prefix(src, out)
    install_packages(src, out, args.packages)
    fixed = fix_rpaths(src, out)
    files, size = clean_tree(out)
    asked = {package_name(p) for p in args.packages}
    print(f"check: {check(out, [m for m in CHECKED_IMPORTS if m in asked])}")
    print(
        f"built {out}: {files} files, {size} bytes ({size / 2**20:.1f} MiB), "
        f"{fixed} ELF rpaths rewritten, {time.monotonic() - t0:.1f}s"
    )


if __name__ == "__main__":
    main()
