"""scripts/compare.py: the pure parts (arguments, aggregation, tables, targets) on fake results.

No network, no mounts: the comparison itself runs for minutes and is run by hand.
"""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

import pytest

from scripts import compare

Sample = compare.Sample


def fake_results() -> Any:
    """100mbit: every system on numpy (3 runs), an update; reads of 20 MB."""
    res = compare.Results(profiles=["100mbit"], workloads=["numpy"], systems=list(compare.SYSTEMS))
    res.reads = {"numpy": 20_000_000}
    res.facts = ["machine: fake"]
    cold = {  # system -> (seconds of 3 runs, link bytes)
        "native": ([0.3, 0.5, 0.4], 0),
        "xar": ([9.0, 10.0, 11.0], 104_000_000),
        "tarball": ([9.5, 9.6, 9.7], 108_000_000),
        "casync": ([30.0, 31.0, 32.0], 57_000_000),
        "lazycaf": ([4.0, 5.0, 4.5], 16_000_000),
        "lazycaf-profile": ([2.0, 2.5, 1.5], 11_000_000),
    }
    for system, (secs, link) in cold.items():
        for i, s in enumerate(secs):
            parts = {"link_bytes_settled": float(link + 1_000_000)} if "lazycaf" in system else {}
            res.samples.append(
                Sample("cold", "100mbit", "numpy", system, i, s, s / 10, link + i, 1000, parts)
            )
    for system, secs, link in (
        ("lazycaf", 2.0, 1_000_000),
        ("xar", 50.0, 105_000_000),
        ("tarball", 5.0, 108_000_000),
        ("casync", 10.0, 2_000_000),
    ):
        res.samples.append(Sample("publish", "100mbit", "numpy", system, 0, secs, None, link))
    for system, secs in (("lazycaf-profile", 1.0), ("xar", 10.0), ("casync", 20.0)):
        res.samples.append(Sample("update", "100mbit", "numpy", system, 0, secs, None, 5))
    return res


def test_quick_defaults_and_explicit_options_win() -> None:
    args = compare.parse_args(["--quick"])
    assert (args.runs, args.profile_names, args.workload_names) == (1, ["100mbit"], ["numpy"])
    assert args.part_names == ["cold"]
    assert args.system_names == list(compare.SYSTEMS)
    args = compare.parse_args(["--quick", "--runs", "2", "--parts", "cold,update"])
    assert (args.runs, args.part_names) == (2, ["cold", "update"])
    full = compare.parse_args([])
    assert full.runs == 3 and full.profile_names == ["1gbit", "100mbit"]
    assert full.workload_names == ["numpy", "pandas", "script"]
    assert str(full.out).endswith("results/compare")


@pytest.mark.parametrize(
    "argv",
    [["--profiles", "10gbit"], ["--workloads", ""], ["--systems", "xar,foo"], ["--runs", "0"]],
)
def test_bad_arguments_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        compare.parse_args(argv)
    assert exc.value.code == 2
    assert "error" in capsys.readouterr().err


def test_aggregate_takes_medians_per_key() -> None:
    cells = compare.aggregate(fake_results().samples)
    xar = cells[("cold", "100mbit", "numpy", "xar")]
    assert (xar.runs, xar.total_s, xar.warm_s, xar.link_bytes) == (3, 10.0, 1.0, 104_000_001)
    lz = cells[("cold", "100mbit", "numpy", "lazycaf-profile")]
    assert lz.total_s == 2.0 and lz.parts["link_bytes_settled"] == 12_000_000.0


def test_markdown_tables_rows_and_peers_hook() -> None:
    md = compare.render_markdown(fake_results())
    assert "## 100mbit: 100 Mbit/s, 10 ms RTT" in md
    assert "| numpy | XAR-like (squashfs download) | 10.00 s | 1.00 s | 1.0x |" in md
    assert "| numpy | LazyCAF, with profile | 2.00 s | 0.200 s | 5.0x | 11.0 MB (12.0 MB" in md
    assert "| all | LazyCAF, with peers | see scripts/bench_peers.py |" in md
    # one LazyCAF row in the update table: pack, then start with the profile
    assert "| LazyCAF (pack; start with profile) | 2.00 s | 1.0 MB | 25.0x | 1.00 s |" in md
    assert "| tarball (tar.zst download) | 5.00 s | 108.0 MB | 10.0x | - |" in md
    assert "20.0 MB" in md  # the workload's reads


def test_targets_verdicts() -> None:
    targets = {t.what: t for t in compare.evaluate_targets(fake_results())}
    xar = targets["numpy: cold start with profile >= 4x faster than XAR-like"]
    assert (xar.measured, xar.met) == ("5.0x", True)
    assert targets["numpy: cold start with profile faster than casync mount"].met is True
    link = targets["numpy: bytes over the link (cold, with profile) <= 1.5x the bytes read"]
    assert link.met is True and link.measured.endswith("= 0.55x")
    assert targets["update publish >= 5x faster than XAR-like"].met is True
    assert targets["update start >= 5x faster than XAR-like"].measured == "10.0x"


def test_targets_not_measured_and_missed() -> None:
    res = compare.Results(profiles=["100mbit"], workloads=["numpy"], systems=["xar"])
    res.samples = [
        Sample("cold", "100mbit", "numpy", "xar", 0, 3.0),
        Sample("cold", "100mbit", "numpy", "lazycaf-profile", 0, 1.0, link_bytes=50_000_000),
    ]
    res.reads = {"numpy": 10_000_000}
    targets = {t.what: t for t in compare.evaluate_targets(res)}
    assert targets["numpy: cold start with profile >= 4x faster than XAR-like"].met is False
    assert targets["numpy: cold start with profile faster than casync mount"].met is None
    assert targets["update start >= 5x faster than XAR-like"].met is None
    link = targets["numpy: bytes over the link (cold, with profile) <= 1.5x the bytes read"]
    assert link.met is False
    md = compare.render_markdown(res)
    assert "**NO**" in md and "not measured" in md


def test_json_is_complete_and_serialisable() -> None:
    data = json.loads(json.dumps(fake_results().to_json()))
    assert len(data["samples"]) == 18 + 4 + 3
    assert data["reads"] == {"numpy": 20_000_000}
    keys = {(m["phase"], m["system"]) for m in data["medians"]}
    assert ("update", "lazycaf-profile") in keys and ("publish", "casync") in keys
    assert any(t["met"] is True for t in data["targets"])


def test_every_system_has_a_runner_or_a_not_yet_hook() -> None:
    assert set(compare.RUNNERS) == set(compare.SYSTEMS)
    assert set(compare.NOT_YET) <= set(compare.SYSTEMS)
    with pytest.raises(NotImplementedError, match="bench_peers"):
        compare.run_lazycaf_peers(None, None, compare.Job("numpy"), 0)


def test_results_survive_a_json_round_trip() -> None:
    res = fake_results()
    again = compare.Results.from_json(json.loads(json.dumps(res.to_json())))
    assert again.samples == res.samples
    assert compare.render_markdown(again) == compare.render_markdown(res)


def test_rounds_rotate_and_a_slow_system_runs_once() -> None:
    ctx = SimpleNamespace(results=compare.Results())
    cl = SimpleNamespace(profile="100mbit")
    calls: list[tuple[str, int]] = []

    def runner(system: str, secs: float) -> Any:
        def run(ctx: Any, cl: Any, job: Any, i: int) -> Any:
            calls.append((system, i))
            return Sample(job.phase, cl.profile, job.workload, system, i, secs)

        return run

    runners = {"xar": runner("xar", 10.0), "casync": runner("casync", 60.0)}
    args = compare.parse_args(["--runs", "3", "--slow-after", "45"])
    compare.run_rounds(ctx, cl, compare.Job("numpy"), ["xar", "casync"], args, runners)
    assert calls == [("xar", 0), ("casync", 0), ("xar", 1), ("xar", 2)]
    assert len(ctx.results.samples) == 4
