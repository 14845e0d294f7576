"""scripts/bench_smallfiles.py: its arguments, the tree it writes, and one tiny run through
the real CLI (the 200,000-file figure itself is run by hand, never asserted here)."""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

from scripts import bench_smallfiles


def test_defaults_are_the_issue_tree_and_results_json() -> None:
    args = bench_smallfiles.parse_args([])
    assert (args.packages, args.files, args.runs, args.baseline) == (2000, 100, 3, None)
    repo = Path(__file__).resolve().parents[2]
    assert args.json == repo / "results" / "bench_smallfiles" / "results.json"


def test_bad_counts_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        bench_smallfiles.parse_args(["--files", "0"])
    assert exc.value.code == 2
    assert "--files" in capsys.readouterr().err


def test_tree_is_deterministic_unique_and_reused(tmp_path: Path) -> None:
    files, nbytes = bench_smallfiles.write_tree(tmp_path / "t", 3, 4)
    paths = sorted(p for p in (tmp_path / "t").rglob("*.py"))
    assert files == len(paths) == 12
    contents = [p.read_bytes() for p in paths]
    assert len(set(contents)) == 12 and sum(map(len, contents)) == nbytes
    assert all(40 <= len(c) <= 60 for c in contents)
    mtime = paths[0].stat().st_mtime_ns
    assert bench_smallfiles.write_tree(tmp_path / "t", 3, 4) == (files, nbytes)
    assert paths[0].stat().st_mtime_ns == mtime  # complete: kept as it was
    assert bench_smallfiles.write_tree(tmp_path / "t", 2, 4)[0] == 8  # other counts: rewritten
    assert len(list((tmp_path / "t").rglob("*.py"))) == 8


@pytest.mark.slow
def test_a_tiny_run_with_a_baseline_writes_both_figures(tmp_path: Path) -> None:
    lazycaf = Path(sys.executable).parent / "lazycaf"
    out = tmp_path / "r.json"
    argv = ["--packages", "3", "--files", "5", "--runs", "2", "--tmpdir", str(tmp_path)]
    argv += ["--baseline", str(lazycaf), "--json", str(out)]
    assert bench_smallfiles.main(argv) == 0
    (fig,) = json.loads(out.read_text())["figures"]
    assert len(fig["samples"]) == 2 and len(fig["baseline"]["samples"]) == 2
    assert fig["ratio"] > 0
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # the temp dir is gone


@pytest.mark.slow
def test_a_tiny_run_with_materialize_times_it_and_cleans_up() -> None:
    """Root: a Btrfs loop image and a fetcher daemon; all gone after the run. A short temp
    dir: the daemon's socket path must fit AF_UNIX."""
    lazycaf = Path(sys.executable).parent / "lazycaf"
    tmp = Path(tempfile.mkdtemp(prefix="lzsf-"))
    try:
        out = tmp / "r.json"
        argv = ["--packages", "2", "--files", "3", "--runs", "1", "--tmpdir", str(tmp)]
        argv += ["--materialize", "--lazycaf", str(lazycaf), "--json", str(out)]
        assert bench_smallfiles.main(argv) == 0
        _, mat = json.loads(out.read_text())["figures"]
        assert mat["name"].startswith("materialize") and len(mat["samples"]) == 1
        assert mat["samples"][0] > 0
        assert [p.name for p in tmp.iterdir()] == ["r.json"]
    finally:
        shutil.rmtree(tmp)


def test_the_edits_of_a_repack_run_are_spread_and_distinct() -> None:
    picks = bench_smallfiles.edited(3000, 100)
    assert len(picks) == bench_smallfiles.EDITS == len(set(picks))
    assert picks[0] == (0, 0) and picks[-1][0] >= 2500
    assert len(bench_smallfiles.edited(2, 3)) == 6  # a tiny tree: every module at most once


@pytest.mark.slow
def test_a_tiny_repack_run_with_a_baseline_times_both_and_restores_the_tree(
    tmp_path: Path,
) -> None:
    lazycaf = Path(sys.executable).parent / "lazycaf"
    out, tree = tmp_path / "r.json", tmp_path / "tree"
    argv = ["--packages", "3", "--files", "5", "--runs", "2", "--tmpdir", str(tmp_path)]
    argv += ["--repack", "--tree", str(tree), "--baseline", str(lazycaf), "--json", str(out)]
    assert bench_smallfiles.main(argv) == 0
    (fig,) = json.loads(out.read_text())["figures"]
    assert fig["name"] == "re-pack in place after 10 edits"
    assert len(fig["samples"]) == 2 and len(fig["baseline"]["samples"]) == 2
    for p in range(3):
        for m in range(5):
            data = (tree / f"pkg{p:04d}" / f"mod{m:03d}.py").read_bytes()
            assert data == bench_smallfiles.file_bytes(p, m)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json", "tree"]
