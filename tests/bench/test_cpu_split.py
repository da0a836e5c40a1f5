"""The benchmarks' server CPU: the whole process tree (what is compared with Orthanc), split into
the serving process and its children by kind, and a child that ends during the measurement still
counted (through its parent's reaped time, cutime + cstime)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from dataclasses import asdict
from typing import Any

from bench.archive import (
    EXITED,
    QUICK,
    SERVING,
    CpuMeter,
    SideResults,
    cpu_parts,
    cpu_seconds,
    render,
    split_cells,
)
from bench.dimse import median_split, split_text, summarize_store

# A child: names itself (as parse workers and DIMSE receivers do), says it is up, waits for "go",
# burns `seconds` of CPU, says so, and then exits or (stay) waits for its stdin to close.
CHILD = textwrap.dedent(
    """
    import sys, time
    with open("/proc/self/comm", "w") as f:
        f.write(sys.argv[1])
    print("up", flush=True)
    sys.stdin.readline()
    t = time.process_time()
    while time.process_time() - t < float(sys.argv[2]):
        pass
    print("burnt", flush=True)
    if sys.argv[3] == "stay":
        sys.stdin.read()
    """
)

# The "server": starts a parse worker that will exit and a DIMSE receiver that stays, says
# "ready"; on "go" lets both burn, reaps the worker, burns CPU itself, says "done"; ends when
# its stdin closes.
SERVER = textwrap.dedent(
    """
    import subprocess, sys, time
    child = sys.argv[1]

    def start(name, seconds, end):
        p = subprocess.Popen([sys.executable, "-c", child, name, seconds, end],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert p.stdout.readline() == "up\\n"
        return p

    worker = start("scanonce-parse", "0.4", "exit")
    receiver = start("scanonce-dimse", "0.3", "stay")
    print("ready", flush=True)
    sys.stdin.readline()
    for p in (worker, receiver):
        p.stdin.write("go\\n")
        p.stdin.flush()
    assert worker.stdout.readline() == "burnt\\n"
    worker.wait()
    assert receiver.stdout.readline() == "burnt\\n"
    t = time.process_time()
    while time.process_time() - t < 0.2:
        pass
    print("done", flush=True)
    sys.stdin.read()
    receiver.stdin.close()
    receiver.wait()
    """
)


def test_the_split_adds_up_and_counts_a_child_that_exited() -> None:
    server = subprocess.Popen(
        [sys.executable, "-c", SERVER, CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert server.stdin is not None and server.stdout is not None
    try:
        assert server.stdout.readline() == "ready\n"
        total0 = cpu_seconds(server.pid)
        with CpuMeter(server.pid) as cpu:
            server.stdin.write("go\n")
            server.stdin.flush()
            assert server.stdout.readline() == "done\n"
        total = cpu_seconds(server.pid) - total0
    finally:
        server.stdin.close()
        server.wait(30)
    split = cpu.split
    # The parts add up to the tree's total, which counts the worker that exited (0.4 s).
    assert abs(sum(split.values()) - cpu.seconds) < 1e-9
    assert abs(total - cpu.seconds) < 0.05
    assert 0.8 <= cpu.seconds <= 1.3, split
    # Gone by the end: its kind with it, its CPU (after the start) in the serving process's cutime.
    assert "parse workers" not in split
    assert 0.35 <= split[EXITED] <= 0.55, split
    assert 0.25 <= split["DIMSE receivers"] <= 0.4, split
    assert 0.15 <= split[SERVING] <= 0.4, split


def test_cells_beside_a_cpu_row() -> None:
    tranches = [
        {"instances": 100, "server_cpu_s": 0.15, "server_cpu_split": {SERVING: 0.1, "parse workers": 0.05}},
        {"instances": 100, "server_cpu_s": 0.15, "server_cpu_split": {SERVING: 0.1, "parse workers": 0.05}},
    ]
    so = cpu_parts(tranches, 1e3 / 200)
    assert so is not None and abs(so[SERVING] - 1.0) < 1e-9 and abs(so["parse workers"] - 0.5) < 1e-9
    orthanc = cpu_parts(
        [{"instances": 200, "server_cpu_s": 0.2, "server_cpu_split": {SERVING: 0.2, EXITED: 0.0}}], 5
    )
    kinds = "serving process / parse workers"
    assert split_cells(so, orthanc) == (kinds, "1.00 / 0.50", "1.00 (one process)")
    # Idle parse workers are still there (a retrieve): not "one process".
    idle = split_cells({SERVING: 0.8, "parse workers": 0.0, "other children": 0.0, EXITED: 0.0}, orthanc)
    assert idle == (kinds, "0.80 / 0.00", "1.00 (one process)")
    # A run saved before the split: nothing to show, or "n/a" for the side without it.
    old = [{"instances": 100, "server_cpu_s": 0.15}]
    assert cpu_parts(old, 10) is None
    assert split_cells(None, None) is None
    assert split_cells(so, None) == (kinds, "1.00 / 0.50", "n/a")


def _saved_run(split: bool) -> dict[str, Any]:
    """A saved run as `--out` writes it, trimmed to the CPU rows' measurements."""

    def measure(cpu: float, parts: dict[str, float], **rest: float) -> dict[str, Any]:
        return {"server_cpu_s": cpu, **rest, **({"server_cpu_split": parts} if split else {})}

    sides = {}
    for name, parts in (
        ("ScanOnce", {SERVING: 0.1, "parse workers": 0.05, "other children": 0.0, EXITED: 0.0}),
        ("Orthanc", {SERVING: 0.1, EXITED: 0.0}),
    ):
        side = SideResults(name)
        total = sum(parts.values())
        side.tranches = [measure(total, parts, instances=100, per_s=500.0, mb_s=1.0)]
        side.ct = measure(total, parts, instances=10, per_s=50.0, mb_s=20.0)
        side.retrieve = [measure(total, parts, bytes=10**9, mb_s=900.0, seconds=1.1)]
        sides[name] = asdict(side)
    return {
        "plan": asdict(QUICK),
        "threads": 4,
        "seed": 1,
        "total_s": 60.0,
        "loadavg_1m": [1.0, 2.0],
        "sides": sides,
    }


def test_render_shows_the_split_and_reprints_a_run_saved_without_it() -> None:
    table = render(json.loads(json.dumps(_saved_run(split=True))))
    assert "| … of which serving process / parse workers, ms | 1.00 / 0.50 | 1.00 (one process) |" in table
    assert "| … of which serving process / parse workers, s | 0.10 / 0.05 | 0.10 (one process) |" in table
    old = render(json.loads(json.dumps(_saved_run(split=False))))
    assert "of which serving process" not in old
    assert "| Server CPU per small instance stored, ms (load-independent) | 1.5 | 1.0 | 1.50× |" in old


def test_dimse_rounds_split_of_the_median_round() -> None:
    def round_(ms: float, receivers: float) -> dict[str, Any]:
        split = {SERVING: (ms - receivers) * 0.1, "parse workers": 0.0, "DIMSE receivers": receivers * 0.1}
        return {"instances": 100, "server_cpu_s": ms * 0.1, "server_cpu_split": {**split, EXITED: 0.0}}

    runs = [round_(3.0, 1.0), round_(2.0, 0.5), round_(9.0, 4.0)]
    summary = summarize_store([{**r, "per_s": 1.0, "seconds": 1.0, "failed_processes": 0} for r in runs])
    split = summary["cpu_split_ms"]
    assert abs(sum(split.values()) - summary["cpu_ms"]) < 1e-9  # the median round: 3.0 ms
    assert split_text(split) == "2.00 serving process + 0.00 parse workers + 1.00 DIMSE receivers"
    two = median_split(runs[:2])  # the mean of the middle two: (2.0 + 3.0) / 2
    assert two is not None and abs(sum(two.values()) - 2.5) < 1e-9
    assert split_text({SERVING: 1.2, EXITED: 0.0}) == "(one process)"
    assert median_split([{"instances": 100, "server_cpu_s": 0.3}]) is None  # saved before the split
    assert split_text(None) == "n/a"
