"""scripts/harness.py and scripts/render_benchmarks.py: figures, the results JSON, the page
rendered from it, the exit codes of a guarded run, and the benchmarks' argument parsing.

No root, no mounts: the benchmarks themselves run for minutes and are run by hand.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import pytest

from scripts import (
    bench_cache,
    bench_fetch,
    bench_mount,
    bench_pack,
    bench_peers,
    bench_prefetch,
    bench_rebuild,
)
from scripts.harness import (
    BenchError,
    Figure,
    Lazycaf,
    Load,
    Machine,
    Made,
    Record,
    cleanup,
    guarded_run,
    median,
    write_results,
)
from scripts.render_benchmarks import BEGIN, END, render_page, render_section
from scripts.render_benchmarks import main as render_main


def test_figure_json_has_median_baseline_and_ratio() -> None:
    fig = Figure("total", "s", (3.0, 1.0, 2.0), "squashfs", (4.0, 6.0), 2.5, "squashfs / this")
    data = fig.to_json()
    assert data["median"] == 2.0 and data["samples"] == [3.0, 1.0, 2.0]
    assert data["baseline"] == {"name": "squashfs", "samples": [4.0, 6.0], "median": 5.0}
    assert (data["ratio"], data["ratio_means"]) == (2.5, "squashfs / this")
    bare = Figure("warm", "s", (0.1,)).to_json()
    assert "baseline" not in bare and "ratio" not in bare


def test_median_of_nothing_is_nan_and_null_in_json() -> None:
    assert math.isnan(median([]))
    assert Figure("none", "s", ()).to_json()["median"] is None


def _record(tmp_path: Path) -> Record:
    args = argparse.Namespace(runs=3, sample=tmp_path / "s", quick=True, names=["a", "b"])
    record = Record.begin("bench_x", "A title", ["--quick"], args)
    record.facts = ["sample: 1 MB"]
    record.report = ["- sample: 1 MB", "", "| a | b |", "|---|---|", "| 1 | 2 |"]
    record.figures = [Figure("total", "s", (1.0, 2.0, 3.0))]
    record.data = {"rounds": [1, 2]}
    return record


def test_results_json_holds_date_machine_load_args_and_figures(tmp_path: Path) -> None:
    record = _record(tmp_path)
    path = tmp_path / "out" / "results.json"
    written = write_results(path, record)
    doc = json.loads(path.read_text())
    assert doc == written
    assert doc["bench"] == "bench_x" and doc["command"] == "python -m scripts.bench_x --quick"
    assert doc["date"].endswith("+00:00") and doc["date"] == record.start.at
    assert doc["args"] == {
        "names": ["a", "b"],
        "quick": True,
        "runs": 3,
        "sample": str(tmp_path / "s"),
    }
    assert doc["machine"]["cores"] >= 1 and doc["machine"]["lazycaf"]
    assert set(doc["load"]) == {"start", "end", "cpu_steal_pct"}
    assert doc["figures"][0]["median"] == 2.0
    assert doc["data"] == {"rounds": [1, 2]}
    assert [p.name for p in path.parent.iterdir()] == ["results.json"]  # no temp file left


def test_rendered_section_has_date_machine_load_and_tables(tmp_path: Path) -> None:
    doc = _record(tmp_path).to_json(Load.now(), Machine.now())
    text = "\n".join(render_section(doc))
    assert text.startswith("## A title (`bench_x`)")
    assert f"{doc['date']} (UTC)" in text
    assert f"lazycaf {doc['machine']['lazycaf']}" in text
    assert "load average (1 min)" in text and "CPU steal" in text
    assert "| 1 | 2 |" in text


def test_render_replaces_only_the_generated_part(tmp_path: Path) -> None:
    doc = _record(tmp_path).to_json(Load.now(), Machine.now())
    page = "# Benchmarks\n\nintro\n\n## Recorded results\n\nkept\n"
    first = render_page([doc], page)
    assert first.index("intro") > first.index(END) > first.index("| 1 | 2 |") > first.index(BEGIN)
    assert first.startswith("# Benchmarks\n") and first.endswith("kept\n")
    doc["report"] = ["| 3 | 4 |"]
    again = render_page([doc], first)
    assert "| 3 | 4 |" in again and "| 1 | 2 |" not in again
    assert again.count(BEGIN) == 1 and again.endswith("kept\n")


def test_render_main_writes_the_page_and_refuses_a_bad_file(tmp_path: Path) -> None:
    good = tmp_path / "results.json"
    write_results(good, _record(tmp_path))
    out = tmp_path / "docs" / "benchmarks.md"
    assert render_main([str(good), "--out", str(out)]) == 0
    assert "## A title" in out.read_text()
    bad = tmp_path / "bad.json"
    bad.write_text('{"bench": "x"}')
    assert render_main([str(bad), "--out", str(out)]) == 1


def test_guarded_run_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    def fails() -> None:
        raise BenchError("step broke")

    assert guarded_run("b", lambda: None, list) == 0
    assert guarded_run("b", fails, list) == 1
    assert "b: error: step broke" in capsys.readouterr().err
    assert guarded_run("b", lambda: None, lambda: ["a mount left"]) == 3
    assert "b: WARNING: a mount left" in capsys.readouterr().err


def test_cleanup_removes_the_temp_dir(tmp_path: Path) -> None:
    made = Made(tmp_path / "run")
    (made.tmp / "deep").mkdir(parents=True)
    made.log("x.log").write_text("x")
    made.mountpoint("mnt")  # made, never mounted
    assert cleanup(made, None) == []
    assert not made.tmp.exists()


def test_lazycaf_pack_takes_the_digest_and_refuses_other_output(tmp_path: Path) -> None:
    exe = tmp_path / "lazycaf"
    exe.write_text('#!/bin/sh\necho "packing $2"\necho ' + "ab" * 32 + "\n")
    exe.chmod(0o755)
    assert Lazycaf(exe, tmp_path / "cas").pack(tmp_path) == "ab" * 32
    exe.write_text("#!/bin/sh\necho done\n")
    with pytest.raises(BenchError, match="expected a manifest digest"):
        Lazycaf(exe, tmp_path / "cas").pack(tmp_path)


def test_prefetch_quick_is_three_runs_of_1gbit_without_loopback() -> None:
    args = bench_prefetch.parse_args(["--quick"])
    assert (args.runs, args.profile_names, args.no_loopback) == (3, ["1gbit"], True)
    args = bench_prefetch.parse_args(["--quick", "--runs", "5", "--profiles", "100mbit"])
    assert (args.runs, args.profile_names, args.no_loopback) == (5, ["100mbit"], True)
    full = bench_prefetch.parse_args([])
    assert (full.runs, full.profile_names, full.no_loopback) == (3, ["1gbit", "100mbit"], False)
    assert str(full.json).endswith("results/bench_prefetch/results.json")


@pytest.mark.parametrize(
    ("module", "name"),
    [
        (bench_cache, "bench_cache"),
        (bench_fetch, "bench_fetch"),
        (bench_mount, "bench_mount"),
        (bench_pack, "bench_pack"),
        (bench_peers, "bench_peers"),
        (bench_prefetch, "bench_prefetch"),
        (bench_rebuild, "bench_rebuild"),
    ],
)
def test_every_benchmark_writes_results_json_by_default(module: Any, name: str) -> None:
    args = module.parse_args([])
    assert args.json == Path(__file__).resolve().parents[2] / "results" / name / "results.json"
    given = module.parse_args(["--json", "/tmp/x.json"])
    assert given.json == Path("/tmp/x.json")
