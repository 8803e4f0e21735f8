"""Scenarios l-o of ``make bench``: the floor targets of issue 11.

l, m. wide jobs at 1 s of latency: 20,000 rows with 1,000 and 2,000 in
   flight, batchrun against the bare aiohttp loop (run as ordinary
   comparisons by ``benchmarks.run``);
n. one-off failures: 5,000 rows at 50 ms with 64 in flight where 10 % of
   the rows fail once each (a 500, a 503, a 429 with ``Retry-After: 1`` or a
   connection reset, in equal shares, seeded), against the same rows with no
   fault; each repetition gets a fresh mock provider, whose attempt counters
   decide which attempt fails;
o. start-up: ``batchrun --version``, median wall time of 11 runs;
p. work per row without the machine's noise: the instructions batchrun and
   the bare loop execute under valgrind's callgrind, at zero latency with 64
   in flight, for 1,000 and 3,000 rows; the difference over 2,000 rows is
   the work per row, the rest is start-up. User-space instructions only: a
   system call counts as the few instructions that make it. Skipped when
   valgrind is not installed.

``render_targets`` turns these and scenarios a and b into one table: each
ratio against its target, and whether it is met.
"""

from __future__ import annotations

import random
import re
import shutil
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

from benchmarks.run import (
    PY,
    MockProcess,
    batchrun_cmd,
    client_cmd,
    client_env,
    make_input,
    measure,
)

FAULTS = (
    "mock:fail=500x1",
    "mock:fail=503x1",
    "mock:fail=429x1 mock:retry_after=1",
    "mock:reset=1",
)
FAILING_ROWS, FAILING_SHARE, FAILING_LATENCY, FAILING_CONCURRENCY = 5_000, 0.10, 0.05, 64


def make_failing_inputs(work: Path, rows: int, rep: int) -> tuple[Path, Path]:
    """The same rows twice, without and with faults; ``rep`` makes each
    repetition's requests new to the provider."""
    rng = random.Random(11)
    clean, faulty = work / f"clean-{rep}.jsonl", work / f"faulty-{rep}.jsonl"
    with clean.open("w") as c, faulty.open("w") as f:
        for i in range(rows):
            text = f"row {i} rep {rep}"
            row = '{"custom_id": "r%d", "messages": [{"role": "user", "content": "%s"}]}\n'
            c.write(row % (i, text))
            if rng.random() < FAILING_SHARE:
                text += " " + FAULTS[rng.randrange(len(FAULTS))]
            f.write(row % (i, text))
    return clean, faulty


def run_failing_once(work: Path, reps: int) -> dict[str, Any]:
    """Scenario n: batchrun's wall time with and without the faults."""
    walls: dict[str, list[float]] = {"clean": [], "faulty": []}
    errors: list[str] = []
    for rep in range(reps):
        clean, faulty = make_failing_inputs(work, FAILING_ROWS, rep)
        order = [("clean", clean), ("faulty", faulty)]
        for name, inp in order if rep % 2 == 0 else order[::-1]:
            with MockProcess(FAILING_LATENCY, work / f"mock-n-{name}.log") as server:
                out = work / f"out-n-{name}.jsonl"
                cmd = batchrun_cmd(server, inp, out, FAILING_CONCURRENCY)
                run = measure("batchrun", cmd, FAILING_ROWS, server, out, work / "n.log")
            walls[name].append(run.wall_s)
            if not run.ok:
                errors.append(f"{name}: {run.error}")
            print(f"  [n] rep {rep + 1}/{reps} {name:7s} {run.wall_s:6.2f} s", flush=True)
    clean_s, faulty_s = statistics.median(walls["clean"]), statistics.median(walls["faulty"])
    return {
        "rows": FAILING_ROWS,
        "clean_s": clean_s,
        "faulty_s": faulty_s,
        "ratio": faulty_s / clean_s,
        "errors": errors,
    }


def run_version_time(runs: int = 11) -> float:
    """Scenario o: median seconds of ``batchrun --version``."""
    walls = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run(
            [PY, "-m", "batchrun", "--version"],
            capture_output=True, env=client_env(), timeout=60, check=True,
        )  # fmt: skip
        walls.append(time.perf_counter() - started)
    return statistics.median(walls)


COUNTED_ROWS = (1_000, 3_000)
_COLLECTED = re.compile(rb"Collected : (\d+)")


def run_instructions(work: Path) -> dict[str, Any]:
    """Scenario p: instructions per row and at start-up, batchrun and bare."""
    found: dict[str, Any] = {}
    with MockProcess(0.0, work / "mock-p.log") as server:
        for client in ("batchrun", "bare"):
            counts = [_instructions(client, server, work, rows) for rows in COUNTED_ROWS]
            per_row = (counts[1] - counts[0]) / (COUNTED_ROWS[1] - COUNTED_ROWS[0])
            found[client] = {"per_row": per_row, "start": counts[0] - per_row * COUNTED_ROWS[0]}
            print(f"  [p] {client:8s} {per_row / 1e3:,.1f} k instructions per row", flush=True)
    found["ratio"] = found["batchrun"]["per_row"] / found["bare"]["per_row"]
    return found


def _instructions(client: str, server: MockProcess, work: Path, rows: int) -> int:
    """User-space instructions of one run of ``client`` over ``rows`` rows."""
    inp, out = make_input(work / f"p-{rows}.jsonl", rows), work / f"out-p-{client}.jsonl"
    cmd = client_cmd(client, server, inp, out, 64)
    valgrind = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null"]
    done = subprocess.run(
        valgrind + cmd, capture_output=True, env=client_env(), timeout=900, check=True
    )
    shutil.rmtree(out.with_name(out.name + ".batchrun"), ignore_errors=True)
    out.unlink()
    match = _COLLECTED.search(done.stderr)
    if match is None:
        raise RuntimeError(f"callgrind reported no count for {client}")
    return int(match.group(1))


def render_instructions(p: dict[str, Any]) -> list[str]:
    """Markdown lines for scenario p."""
    lines = ["", "## Instructions per row (scenario p, callgrind, zero latency, 64 in flight)"]
    lines += ["", "| client | instructions per row | vs bare | start-up instructions |"]
    lines.append("|---|---:|---:|---:|")
    for client in ("batchrun", "bare"):
        row = p[client]
        ratio = row["per_row"] / p["bare"]["per_row"]
        lines.append(
            f"| {client} | {row['per_row']:,.0f} | {ratio:.2f} | {row['start'] / 1e6:,.0f} M |"
        )
    return lines


def _ratio(tables: list[dict[str, Any]], key: str) -> float | None:
    sc = next((s for s in tables if s["key"] == key), None)
    row = next((r for r in sc["table"] if r["client"] == "batchrun"), None) if sc else None
    return None if row is None else row.get("rows_per_s_x_bare")


def render_targets(tables: list[dict[str, Any]], floor: dict[str, Any]) -> list[str]:
    """Markdown lines: every floor target, its figure and whether it is met."""
    checks: list[tuple[str, float | None, str, bool | None]] = []
    for key, title, goal in (
        ("a", "a: zero latency, 64 in flight, vs bare", 1.0),
        ("b", "b: 50 ms, 128 in flight, vs bare", 0.97),
        ("l", "l: 1 s, 1,000 in flight, 20,000 rows, vs bare", 0.95),
        ("m", "m: 1 s, 2,000 in flight, 20,000 rows, vs bare", 0.95),
    ):
        ratio = _ratio(tables, key)
        checks.append((title, ratio, f">= {goal:.2f} x", None if ratio is None else ratio >= goal))
    n = floor.get("n")
    if n is not None:
        walls = f"{n['faulty_s']:.1f} s / {n['clean_s']:.1f} s"
        note = f"n: 10 % fail once, 50 ms, 64 in flight, vs no faults ({walls})"
        checks.append((note, n["ratio"], "<= 2.50 x", n["ratio"] <= 2.5 and not n["errors"]))
    o = floor.get("o")
    if o is not None:
        checks.append(("o: `batchrun --version`, seconds", o, "< 0.150 s", o < 0.150))
    lines = render_instructions(floor["p"]) if "ratio" in floor.get("p", {}) else []
    if not checks:
        return lines
    lines += ["", "## Floor targets (issue 11)", "", "| scenario | figure | target | met |"]
    lines.append("|---|---:|---|---|")
    for title, figure, target, met in checks:
        shown = "—" if figure is None else f"{figure:.2f}" if figure >= 0.5 else f"{figure:.3f}"
        verdict = "—" if met is None else "yes" if met else "**no**"
        lines.append(f"| {title} | {shown} | {target} | {verdict} |")
    return lines


def run_floor(scenarios: str, work: Path, reps: int) -> dict[str, Any]:
    """Scenarios n and o, as asked for by ``scenarios`` (letters)."""
    found: dict[str, Any] = {}
    if "n" in scenarios:
        print(f"scenario n: {FAILING_ROWS:,} rows, 10 % failing once, {reps} rep(s)", flush=True)
        found["n"] = run_failing_once(work, reps)
    if "o" in scenarios:
        print("scenario o: batchrun --version", flush=True)
        found["o"] = run_version_time()
    if "p" in scenarios:
        if shutil.which("valgrind") is None:
            found["p"] = {"skipped": "valgrind is not installed"}
        else:
            print("scenario p: instructions per row under callgrind", flush=True)
            found["p"] = run_instructions(work)
    return found
