"""Build non-determinism through the CLI: the same sources built twice into fresh directories
(new mtimes, new ``.pyc`` headers). Without ``--normalize`` the second pack uploads the
``.pyc`` blobs and ``diff --explain`` names their source-mtime field as the only cause; with
it both packs give one digest and the second uploads nothing."""

from __future__ import annotations

import compileall
import importlib.util
import json
import marshal
import os
import py_compile
from pathlib import Path

from tests.conftest import run_cli

SOURCES = {
    "lib/app/__init__.py": "",
    "lib/app/core.py": "def answer():\n    return 42\n",
    "lib/app/util.py": "from app.core import answer\n\nHALF = answer() // 2\n",
    "bin/run": "#!/bin/sh\nexec python3 -m app.core\n",
}


def build(out: Path, stamp: int, *, ddir: str | None = "/opt/app/lib") -> Path:
    """The sources, byte-compiled as a build system does (``co_filename`` under the install
    path ``ddir``; None: the build dir, as pip records it), every file and directory stamped
    ``stamp``."""
    for rel, text in SOURCES.items():
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_text(text)
        os.utime(out / rel, (stamp, stamp))
    ok = compileall.compile_dir(
        str(out / "lib"),
        ddir=ddir if ddir is not None else str(out / "lib"),
        quiet=1,
        invalidation_mode=py_compile.PycInvalidationMode.TIMESTAMP,
    )
    assert ok
    for path in sorted(out.rglob("*"), reverse=True):
        os.utime(path, (stamp, stamp), follow_symlinks=False)
    return out


def pack_json(tree: Path, cas: Path, *extra: str, env: dict[str, str] | None = None) -> dict:
    out = run_cli("pack", tree, "--cas", cas, "--json", *extra, env=env).stdout
    return json.loads(out)


PYCS = 3
DIRS = 4  # bin, lib, lib/app, lib/app/__pycache__


def test_a_rebuild_uploads_its_pyc_files_and_explain_names_their_mtime(tmp_path: Path) -> None:
    cas = tmp_path / "cas"
    first = pack_json(build(tmp_path / "build-1", 1_700_000_000), cas)
    second = pack_json(build(tmp_path / "build-2", 1_700_000_100), cas)
    assert first["digest"] != second["digest"]
    assert second["blobs_uploaded"] == PYCS  # the sources are the same bytes: not sent again

    doc = json.loads(
        run_cli(
            "diff", first["digest"], second["digest"], "--cas", cas, "--explain", "--json"
        ).stdout
    )
    changed = {c["path"]: c for c in doc["changed"]}
    assert len(changed) == PYCS and all(p.endswith(".pyc") for p in changed)
    for c in changed.values():
        assert [k["kind"] for k in c["causes"]] == ["pyc-mtime"]
        assert c["causes"][0]["meaningless"] is True
    explained = doc["summary"]["explained"]
    assert explained["changed"] == explained["meaningless"] == len(SOURCES) + PYCS + DIRS
    assert explained["by_cause"] == {"mtime": len(SOURCES) + DIRS, "pyc-mtime": PYCS}

    text = run_cli("diff", first["digest"], second["digest"], "--cas", cas, "--explain")
    lines = text.stdout.decode().splitlines()
    assert lines.count("    why: only the .pyc source-mtime field") == PYCS
    assert lines[-1].startswith(f"explained: {len(SOURCES) + PYCS + DIRS} changed entries (3 in")


def test_normalized_rebuilds_pack_to_one_digest_and_upload_nothing(tmp_path: Path) -> None:
    cas = tmp_path / "cas"
    env = {"SOURCE_DATE_EPOCH": "1600000000"}
    first = pack_json(build(tmp_path / "build-1", 1_700_000_000), cas, "--normalize", env=env)
    second = pack_json(build(tmp_path / "build-2", 1_700_000_100), cas, "--normalize", env=env)
    assert second["digest"] == first["digest"]
    assert second["blobs_uploaded"] == 0 and second["pyc_rewritten"] == PYCS

    listing = [
        json.loads(line)
        for line in run_cli("ls", first["digest"], "-R", "--json", "--cas", cas).stdout.splitlines()
    ]
    assert {r["mtime_ns"] for r in listing} == {1_600_000_000 * 10**9}
    pyc = run_cli("cat", first["digest"], "lib/app/__pycache__/core.cpython-311.pyc", "--cas", cas)
    source = SOURCES["lib/app/core.py"].encode()
    data = pyc.stdout
    assert data[:4] == importlib.util.MAGIC_NUMBER
    assert int.from_bytes(data[4:8], "little") == 0b01  # hash-based, unchecked
    assert data[8:16] == importlib.util.source_hash(source)


def test_a_stale_pyc_is_left_as_it_is(tmp_path: Path) -> None:
    tree = build(tmp_path / "build", 1_700_000_000)
    core = tree / "lib/app/core.py"
    core.write_text("def answer():\n    return 43\n")  # edited after the build: .pyc stale
    os.utime(core, (1_700_000_500, 1_700_000_500))
    result = pack_json(tree, tmp_path / "cas", "--normalize")
    assert (result["pyc_rewritten"], result["pyc_kept"]) == (PYCS - 1, 1)
    pyc = run_cli(
        "cat",
        result["digest"],
        "lib/app/__pycache__/core.cpython-311.pyc",
        "--cas",
        tmp_path / "cas",
    ).stdout
    assert pyc == (tree / "lib/app/__pycache__/core.cpython-311.pyc").read_bytes()


def test_a_bad_source_date_epoch_is_one_clear_line(tmp_path: Path) -> None:
    tree = build(tmp_path / "build", 1_700_000_000)
    proc = run_cli(
        "pack",
        tree,
        "--cas",
        tmp_path / "cas",
        "--normalize",
        env={"SOURCE_DATE_EPOCH": "yesterday"},
        check=False,
    )
    assert proc.returncode == 2
    assert proc.stderr.decode().strip().splitlines() == [
        "lazycaf: error: SOURCE_DATE_EPOCH must be whole seconds since 1970, not 'yesterday'"
    ]


def test_pyc_files_that_record_their_build_dir(tmp_path: Path) -> None:
    """pip compiles into the build dir: the ``.pyc`` files of two builds differ in
    ``co_filename`` too, which imports replace; ``--normalize`` makes them one."""
    one, two = (
        build(tmp_path / "b-1", 1_700_000_000, ddir=None),
        build(tmp_path / "b-22", 1_700_000_100, ddir=None),
    )
    cas = tmp_path / "cas"
    first, second = pack_json(one, cas), pack_json(two, cas)
    doc = json.loads(
        run_cli(
            "diff", first["digest"], second["digest"], "--cas", cas, "--explain", "--json"
        ).stdout
    )
    for c in doc["changed"]:
        assert [k["kind"] for k in c["causes"]] == ["pyc-mtime", "pyc-filename"], c
    norm = tmp_path / "cas-norm"
    a, b = pack_json(one, norm, "--normalize"), pack_json(two, norm, "--normalize")
    assert a["digest"] == b["digest"] and b["blobs_uploaded"] == 0
    pyc = run_cli("cat", a["digest"], "lib/app/__pycache__/core.cpython-311.pyc", "--cas", norm)
    assert marshal.loads(pyc.stdout[16:]).co_filename == "lib/app/core.py"


def test_a_pyc_rewritten_once_is_not_vouched_for_by_the_stat_cache_later(tmp_path: Path) -> None:
    """A ``.pyc`` packed as it is (its source missing), then rewritten (the source back):
    the stat cache must not carry its first record over, since the manifest of the pack that
    saved the cache lists the rewritten bytes, not those; a later pack that keeps the ``.pyc``
    as it is again (source gone, the old blob collected meanwhile) must upload it, not trust
    the store to hold it."""
    cas = tmp_path / "cas"
    env = {"SOURCE_DATE_EPOCH": "1600000000", "LAZYCAF_STATE": str(tmp_path / "state")}
    tree = build(tmp_path / "build", 1_700_000_000)
    source, away = tree / "lib/app/core.py", tmp_path / "core.py"
    pyc = "lib/app/__pycache__/core.cpython-311.pyc"
    source.rename(away)
    first = pack_json(tree, cas, "--normalize", "--tag", "app", env=env)
    assert first["pyc_rewritten"] == PYCS - 1  # the other two
    away.rename(source)
    second = pack_json(tree, cas, "--normalize", "--tag", "app", env=env)
    assert second["pyc_rewritten"] == PYCS
    run_cli("cas", "gc", "--grace", "0s", "--cas", cas)  # the first pack's .pyc blob goes
    source.rename(away)
    third = pack_json(tree, cas, "--normalize", "--tag", "app", env=env)
    assert third["digest"] == first["digest"] and third["blobs_uploaded"] >= 1
    data = run_cli("cat", third["digest"], pyc, "--cas", cas).stdout
    assert data == (tree / pyc).read_bytes()
