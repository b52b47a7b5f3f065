"""The benchmark's own plumbing: its CPU accounting, and one small end-to-end run against nbdkit.

Nothing here asserts a speed: only that the bench runs, measures both sides and reports figures
that are the right kind of number.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.__main__ import Cpu, Server

ROOT = Path(__file__).resolve().parent.parent


def test_cpu_counts_the_time_a_process_spends_working() -> None:
    # Pure Python, no system calls: the time goes to user space.
    spin = "import time\nt = time.monotonic()\nwhile time.monotonic() - t < 1.5: pass\n"
    proc = subprocess.Popen(
        [sys.executable, "-c", spin + "import sys; sys.stdin.read()"], stdin=subprocess.PIPE
    )
    try:
        before = Cpu.of([proc.pid])
        deadline = time.monotonic() + 10
        while (Cpu.of([proc.pid]) - before).user < 0.3 and time.monotonic() < deadline:
            time.sleep(0.05)
        used = Cpu.of([proc.pid]) - before
        assert 0.3 <= used.user < 5  # a Python loop spends its time in user space
        per = used.per(2)
        assert per["user"] == used.user / 2 and per["system"] == used.system / 2
        assert per["total"] == per["user"] + per["system"]
    finally:
        proc.communicate(b"")


def test_cpu_counts_every_thread_of_a_process() -> None:
    """nbdkit serves from threads, some of which end with their connection: counted all the same."""
    spin = (
        "import sys, threading, time\n"
        "sys.stdin.readline()\n"
        "def work():\n"
        "    for _ in range(40_000_000): pass\n"
        "threads = [threading.Thread(target=work) for _ in range(2)]\n"
        "[t.start() for t in threads]; [t.join() for t in threads]\n"
        "print('done', flush=True)\n"
        "sys.stdin.read()\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", spin], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        before = Cpu.of([proc.pid])
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(b"go\n")
        proc.stdin.flush()
        assert proc.stdout.readline() == b"done\n"
        used = Cpu.of([proc.pid]) - before  # both threads have ended by now
        # The main thread only waited: all of this is the two ended threads' work.
        assert used.user + used.system >= 0.3
    finally:
        proc.communicate(b"")


def test_a_server_counts_the_processes_it_stands_on() -> None:
    memory = Server("nbd+unix:///?socket=/m", [10])
    proxy = Server("nbd+unix:///?socket=/p", [20]).over(memory)
    assert proxy.uri.endswith("/p") and proxy.pids == [20, 10]


def run_bench(tmp_path: Path, suite: str, size: str, seconds: str, *more: str) -> Any:
    """`python -m bench --suite SUITE --runs 1` with a small disk and short fio runs: its
    --json report."""
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "bench", "--suite", suite, "--runs", "1", "--size", size,
           "--seconds", seconds, *more, "--json", str(out)]  # fmt: skip
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, timeout=300)
    return json.loads(out.read_text())


def test_bench_core_suite_runs_against_nbdkit(tmp_path: Path) -> None:
    report = run_bench(tmp_path, "core", "16M", "0.5", "--poll-max-us", "100", "--workers", "2")
    assert 10 < report["idle_rss_mib"] < 200
    assert (report["poll_max_us"], report["workers"]) == (100, 2)
    rows = report["rows"]
    assert {(r["setup"], r["workload"]) for r in rows} == {
        (setup, workload)
        for setup in ("memory/unix", "memory/tcp")
        for workload in (
            "nbdcopy write 1M", "nbdcopy read 1M", "nbdcopy write 256K", "nbdcopy read 256K",
            "fio 4K randread QD1", "fio 4K randread QD16",
            "fio 4K randwrite QD1", "fio 4K randwrite QD16",
        )
    }  # fmt: skip
    for row in rows:
        assert row["ours"] > 0 and row["theirs"] > 0
        assert abs(row["ratio"] - row["ours"] / row["theirs"]) < 0.01  # from unrounded figures
        assert row["cpu_unit"] == ("us/req" if row["unit"] == "IOPS" else "CPU-s/GiB")
        for side in ("ours_cpu", "theirs_cpu"):
            # Both sides' servers did the work, so both used CPU for it; a 16M nbdcopy may
            # take less than the 10 ms a tick of /proc/PID/stat counts.
            assert row[side]["total"] > 0 or row["unit"] != "IOPS", (row, side)
            assert abs(row[side]["total"] - row[side]["user"] - row[side]["system"]) < 0.002


def test_bench_source_suite_reads_through_http_against_nbdkit_curl(tmp_path: Path) -> None:
    rows = run_bench(tmp_path, "source", "16M", "0.5")["rows"]
    assert {(r["setup"], r["workload"]) for r in rows} == {
        ("http source", w)
        for w in ("nbdcopy read 1M", "nbdcopy read 256K", "fio 4K randread QD1",
                  "fio 4K randread QD16")
    }  # fmt: skip
    assert all(r["ours"] > 0 and r["theirs"] > 0 for r in rows)


def test_bench_luks_suite_runs_against_nbdkit_luks(tmp_path: Path) -> None:
    rows = run_bench(tmp_path, "luks", "4M", "0.3")["rows"]
    assert {r["setup"] for r in rows} == {"file -> luks"}
    assert len(rows) == 8 and all(r["ours"] > 0 and r["theirs"] > 0 for r in rows)


def test_bench_file_suite_runs_against_nbdkit_file(tmp_path: Path) -> None:
    rows = run_bench(tmp_path, "file", "4M", "0.3")["rows"]
    assert {r["setup"] for r in rows} == {"file"}
    assert len(rows) == 8 and all(r["ours"] > 0 and r["theirs"] > 0 for r in rows)


def test_bench_parity_suite_compares_the_consistency_policies(tmp_path: Path) -> None:
    rows = run_bench(tmp_path, "parity", "4M", "0.3")["rows"]
    assert {r["setup"] for r in rows} == {"parity x3 vs 1 node", "parity x3: ppl vs bitmap"}
    assert len(rows) == 16 and all(r["ours"] > 0 and r["theirs"] > 0 for r in rows)


def test_wakeup_ping_pong_runs_every_way_of_waiting() -> None:
    """bench.wakeup: each way of waiting serves its client to the end and reports a time."""
    cmd = [sys.executable, "-m", "bench.wakeup", "--rounds", "200", "--repeat", "1"]
    out = subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True, timeout=120)
    lines = out.stdout.splitlines()
    assert [line.split()[0] for line in lines] == [
        "recv", "peek", "select", "poll", "epoll", "uvloop"
    ]  # fmt: skip
    assert all(float(line.split()[1]) > 0 and line.endswith("µs per round trip") for line in lines)
    bad = subprocess.run([*cmd, "nope"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "unknown: nope" in bad.stderr


def test_offload_bench_compares_both_ways_at_each_depth() -> None:
    cmd = [sys.executable, "-m", "bench.offload", "--calls", "200", "--depth", "1,4"]
    out = subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True, timeout=120)
    rows = [line.split() for line in out.stdout.splitlines()]
    assert [(r[1], r[2]) for r in rows] == [
        ("1", "asyncio.to_thread"), ("1", "run_blocking"),
        ("4", "asyncio.to_thread"), ("4", "run_blocking"),
    ]  # fmt: skip
    assert all(float(r[3]) > 0 and float(r[6]) > 0 for r in rows)


def test_stalls_bench_measures_a_reader_beside_each_disturbance(tmp_path: Path) -> None:
    out = tmp_path / "stalls.json"
    cmd = [sys.executable, "-m", "bench.stalls", "--size", "132M", "--seconds", "0.5",
           "--disturb", "none,trim,partial", "--json", str(out)]  # fmt: skip
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, timeout=300)
    rows = json.loads(out.read_text())
    assert [(r["disturb"], r["side"]) for r in rows] == [
        (how, side) for how in ("none", "trim", "partial") for side in ("ours", "nbdkit")
    ]
    for row in rows:
        assert row["iops"] > 0 and 0 < row["p50_us"] <= row["p99_us"] <= row["p999_us"]
        assert (row["other_ops"] > 0) == (row["disturb"] != "none"), row
