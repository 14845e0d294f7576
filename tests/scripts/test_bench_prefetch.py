"""scripts/bench_prefetch.py: the pure parts of the big-workload additions -- the workload
option, CPU ticks from /proc, the tarball commands, the FUSE counts read from a mount's log,
and the report tables built from made-up runs. The benchmark itself runs by hand (root)."""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

import pytest

from scripts import bench_prefetch as bp
from scripts.harness import REPO


def test_workload_option_defaults_to_numpy_and_takes_torch() -> None:
    assert bp.parse_args([]).workload == "numpy"
    args = bp.parse_args(["--workload", "torch", "--quick"])
    assert args.workload == "torch" and args.runs == 3
    torch = bp.WORKLOADS["torch"]
    assert torch.code == "import torch" and "torch==2.13.0" in torch.packages
    assert torch.sample == REPO / "build" / "sample-torch"
    assert bp.WORKLOADS["numpy"].code == bp.IMPORT_CODE == "import numpy"


def test_unknown_workload_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        bp.parse_args(["--workload", "jax"])
    assert exc.value.code == 2
    assert "--workload" in capsys.readouterr().err


def test_parse_stat_takes_ppid_and_cpu_ticks_past_an_odd_name() -> None:
    # pid (comm) state ppid ... utime(14) stime(15) cutime(16) cstime(17) ...
    rest = " ".join(str(x) for x in range(5, 14))  # fields 5..13
    line = f"4242 (a (b) c) S 17 {rest} 100 20 7 3 20 0 1 0 99"
    assert bp.parse_stat(line) == (17, 120, 10)


def test_parse_stat_of_this_process_matches_os_times() -> None:
    _, own, _ = bp.parse_stat(Path(f"/proc/{os.getpid()}/stat").read_text())
    t = os.times()
    hz = os.sysconf("SC_CLK_TCK")
    assert abs(own / hz - (t.user + t.system)) < 0.1


def test_tree_ticks_sums_descendants_and_skips_subtrees() -> None:
    table: bp.ProcTable = {
        10: (1, 5, 1),  # the root, with 1 tick of reaped children
        11: (10, 3, 0),
        12: (11, 2, 0),  # grandchild
        13: (10, 100, 50),  # skipped, and so is its child
        14: (13, 7, 0),
        20: (1, 1000, 0),  # not in the tree
    }
    assert bp.tree_ticks(table, 10) == 5 + 1 + 3 + 2 + 100 + 50 + 7
    assert bp.tree_ticks(table, 10, frozenset({13})) == 11
    assert bp.tree_ticks(table, 99) == 0  # gone


def test_cpu_seconds_are_deltas_per_role() -> None:
    hz = os.sysconf("SC_CLK_TCK")
    before = {"daemon": hz, "cas": 0}
    after = {"daemon": 3 * hz, "cas": hz // 2, "relay": hz}
    assert bp.cpu_seconds(before, after) == {
        "daemon": 2.0,
        "cas": (hz // 2) / hz,
        "relay": 1.0,
    }


def test_fuse_requests_takes_the_last_logged_line() -> None:
    log = "\n".join(
        [
            "2026-01-01 lazycaf.mount.root INFO mounted ...",
            'x INFO FUSE requests by opcode: {"lookup":3,"read":5}',
            "x INFO FUSE requests by opcode: not json",
            'y INFO FUSE requests by opcode: {"getattr":1,"lookup":9}',
        ]
    )
    assert bp.fuse_requests(log) == {"getattr": 1, "lookup": 9}
    assert bp.fuse_requests("nothing here\n") is None


def test_read_fuse_requests_reads_past_the_offset(tmp_path: Path) -> None:
    log = tmp_path / "mount.log"
    log.write_text('a FUSE requests by opcode: {"read":1}\n')
    offset = bp.log_size(log)
    with log.open("a") as f:
        f.write('b FUSE requests by opcode: {"read":2}\n')
    assert bp.read_fuse_requests(log, 0) == {"read": 2}
    assert bp.read_fuse_requests(log, offset) == {"read": 2}
    assert bp.read_fuse_requests(log, bp.log_size(log), timeout=0.0) == {}
    assert bp.log_size(tmp_path / "missing") == 0


def test_mount_log_is_where_a_background_mount_writes() -> None:
    log = bp.mount_log(Path("/c"), Path("/tmp/x/mnt-lazycaf"))
    assert log == Path("/c/logs/mount_tmp_x_mnt-lazycaf.log")


def test_tar_commands_round_trip_a_tree(tmp_path: Path) -> None:
    tree = tmp_path / "tree with space"
    (tree / "bin").mkdir(parents=True)
    (tree / "bin" / "python3").write_text("#!/bin/sh\n")
    os.utime(tree / "bin" / "python3", (1_000_000, 1_000_000))
    out = tmp_path / "t.tar.zst"
    pack = bp.tar_pack_cmd(tree, out, level=1)
    assert pack[:3] == ["bash", "-o", "pipefail"]
    subprocess.run(pack, check=True)
    dst = tmp_path / "dst"
    dst.mkdir()
    fetch = bp.tar_fetch_cmd(out.as_uri(), dst)  # curl reads file:// URLs too
    assert shlex.quote(str(dst)) in fetch[-1] and "zstd -d" in fetch[-1]
    subprocess.run(fetch, check=True)
    assert (dst / "bin" / "python3").read_text() == "#!/bin/sh\n"
    assert (dst / "bin" / "python3").stat().st_mtime == 1_000_000  # .pyc stays valid


def test_tar_fetch_fails_when_the_download_does(tmp_path: Path) -> None:
    fetch = bp.tar_fetch_cmd((tmp_path / "missing.tar.zst").as_uri(), tmp_path)
    assert subprocess.run(fetch, capture_output=True).returncode != 0


def lazy_run(total: float, blobs: int, daemon: float, cas: float) -> bp.LazyRun:
    return bp.LazyRun(
        mount=total / 2,
        run=total / 2,
        wire=1000,
        stats={"fetches": float(blobs)},
        settled={},
        warm=[1.0, 1.0],
        warm_wire=0,
        trace="",
        cached=(0.5, 1.5, 0.1),
        cpu={"daemon": daemon, "cas": cas, "mount_process": 0.2, "zygote": 0.1, "mount_cli": 0.1},
        fuse={"lookup": 10, "read": 20},
        cached_fuse={"lookup": 10, "read": 18},
    )


def result() -> bp.ProfileResult:
    res = bp.ProfileResult(bp.Net("1gbit", "http://x"), 1.0, workload="torch")
    res.prof = [lazy_run(2.0, 1000, 0.4, 0.2)] * 3
    res.noprof = [lazy_run(8.0, 1000, 0.6, 0.2)] * 3
    res.crowd = [lazy_run(5.0, 1000, 0.4, 0.4)] * 3
    res.native_cold, res.native_warm = [1.5] * 3, [1.0] * 6
    res.squash = [bp.SquashRun(4.0, 0.5, 1.5)] * 3  # 6 s
    res.tar = [bp.TarRun(5.0, 1.0)] * 3
    return res


def test_cpu_per_blob_and_mount_cpu() -> None:
    r = lazy_run(2.0, 1000, 0.4, 0.2)
    assert r.cpu_per_blob_ms("daemon") == pytest.approx(0.4)
    assert r.cpu_per_blob_ms("cas") == pytest.approx(0.2)
    assert r.mount_cpu == pytest.approx(0.4)
    none = lazy_run(2.0, 0, 0.4, 0.2)
    assert none.cpu_per_blob_ms("daemon") != none.cpu_per_blob_ms("daemon")  # NaN


def test_ratio_rows_against_issue_17_targets() -> None:
    rows = {what: (this, base, target) for what, this, base, target, _ in bp.ratio_rows(result())}
    assert rows["cold, with profile / squashfs image"] == (2.0, 6.0, 0.5)
    assert rows["cold, no profile / squashfs image"] == (8.0, 6.0, 1.0)
    assert rows["cold, crowd hot set / squashfs image"] == (5.0, 6.0, 0.7)
    assert rows["full host cache, page cache dropped / native cold"] == (2.0, 1.5, 1.2)
    assert rows["warm / native warm"] == (1.0, 1.0, 1.1)
    this, _, target = rows["daemon CPU per blob, cold no profile"]
    assert (this, target) == (pytest.approx(0.6), 0.5)


def test_report_tables_show_verdicts_cpu_and_fuse() -> None:
    res = result()
    ratios = "\n".join(bp.ratio_table(res))
    assert "| cold, with profile / squashfs image | 2.000 | 6.000 | 0.33x | <= 0.5x | yes |" in (
        ratios
    )
    assert "| cold, no profile / squashfs image | 8.000 | 6.000 | 1.33x | <= 1x | **NO** |" in (
        ratios
    )
    assert "daemon CPU per blob, cold no profile | 0.600 ms | - | - | <= 0.5 ms | **NO**" in ratios
    cpu = "\n".join(bp.cpu_table(res))
    assert "| with profile | 1000 | 0.400 | 0.400 | 0.200 | - | - | - | 0.400 | 0.200 |" in cpu
    fuse = bp.fuse_table(res)
    assert fuse[0] == "| mount | lookup | read | all |"
    assert "| with profile, full cache, one cold run | 10 | 18 | 28 |" in fuse
    rows = "\n".join(bp.table(res, 6_000_000, 7_000_000))
    assert "| tarball download+extract+run | 5.000 | 1.000 | 6.000 | 7.0 MB | - | - |" in rows
    assert "(issue" not in rows  # numpy's quoted figures are not the torch workload's
    names = [f.name for f in bp.figures(res)]
    assert "1gbit: tarball download+extract+run" in names
    assert "1gbit: daemon CPU per blob, cold with profile" in names
    assert "1gbit: FUSE read requests, one cold run from the full cache" in names


def test_no_ratio_table_without_the_image_baseline() -> None:
    res = result()
    res.squash = []
    assert bp.ratio_table(res) == []
