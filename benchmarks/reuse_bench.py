"""Paying once, measured (scenarios i and j of ``make bench``).

i. edits: a 2,000-row file is answered, then 10 rows are edited (same byte
   size), 5 deleted and 50 appended; the same command runs again. Target: it
   sends exactly 60 requests.
j. cache: 200,000 rows are answered at zero latency into a ``--cache`` (the
   sending run), then the same rows are answered again for another output
   from that cache (the serving run). Targets: serving takes at most 0.3 x
   the sending run's time, peak RSS <= 150 MB. Then the cache is grown with
   synthetic results to ``--store-rows`` (10,000,000 by default) and the
   serving run is repeated: its RSS must stay flat (the store is never
   loaded into memory).

Every run is a separate ``batchrun run`` process against the mock server
process; rusage comes from ``os.wait4``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from benchmarks.run import PY, MockProcess, batchrun_cmd, client_env, count_lines, make_input

EDIT_ROWS, EDITED, DELETED, APPENDED = 2_000, 10, 5, 50
CACHE_ROWS = 200_000
CONCURRENCY = 64


def _run(cmd: list[str], server: MockProcess) -> dict[str, Any]:
    """One ``batchrun run``: wall s, peak RSS MB, exit code, requests it sent."""
    before = server.requests()
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=client_env())  # fmt: skip
    assert proc.stderr is not None
    stderr = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    return {
        "wall_s": time.perf_counter() - started,
        "peak_rss_mb": usage.ru_maxrss / 1024,
        "exit_code": os.waitstatus_to_exitcode(status),
        "requests": server.requests() - before,
        "stderr_tail": stderr.decode(errors="replace").strip().splitlines()[-1:],
    }


def _edit(source: Path, target: Path) -> None:
    """10 rows edited in place (same size), 5 deleted, 50 appended."""
    lines = source.read_bytes().splitlines(keepends=True)
    for i in range(100, 100 + 10 * EDITED, 10):
        lines[i] = lines[i].replace(b'"row ', b'"ROW ')  # same byte size
    del lines[1000 : 1000 + DELETED]
    row = '{{"custom_id": "new{0}", "messages": [{{"role": "user", "content": "new {0}"}}]}}\n'
    lines += [row.format(i).encode() for i in range(APPENDED)]
    target.write_bytes(b"".join(lines))


def run_edits(work: Path) -> dict[str, Any]:
    """Scenario i."""
    source = make_input(work / f"rows-{EDIT_ROWS}.jsonl", EDIT_ROWS)
    inp, out = work / "edit-in.jsonl", work / "edit-out.jsonl"
    shutil.copyfile(source, inp)
    with MockProcess(0.0, work / "mock-i.log") as server:
        first = _run(batchrun_cmd(server, inp, out, CONCURRENCY), server)
        _edit(source, inp)
        again = _run(batchrun_cmd(server, inp, out, CONCURRENCY), server)
    expected = EDITED + APPENDED
    rows = EDIT_ROWS - DELETED + APPENDED
    ok = again["exit_code"] == 0 and again["requests"] == expected and count_lines(out) == rows
    return {"first": first, "rerun": again, "expected": expected, "out_lines": count_lines(out),
            "ok": ok}  # fmt: skip


def grow_store(cache: Path, rows: int) -> float:
    """Fill the store in ``cache`` up to ``rows`` results with synthetic keys
    that no request has (sequential, so the fill is fast); seconds taken."""
    code = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from batchrun.store import STORE_FILE, Stored, open_store\n"
        "store = open_store(Path(sys.argv[1]) / STORE_FILE)\n"
        "have, want = store.stats().results, int(sys.argv[2])\n"
        'rec = Stored(record=b\'{"id":"synthetic"}\', ok=True, retryable=False,'
        " cost=None, created=time.time())\n"
        "for start in range(0, max(0, want - have), 200_000):\n"
        "    stop = min(start + 200_000, want - have)\n"
        "    store.put_many((b'\\xff' * 24 + i.to_bytes(8, 'big'), rec)"
        " for i in range(start, stop))\n"
        "store.close()\n"
    )
    started = time.perf_counter()
    subprocess.run([PY, "-c", code, str(cache), str(rows)], env=client_env(), check=True,
                   timeout=3600)  # fmt: skip
    return time.perf_counter() - started


def run_cache(work: Path, store_rows: int) -> dict[str, Any]:
    """Scenario j."""
    inp = make_input(work / f"rows-{CACHE_ROWS}.jsonl", CACHE_ROWS)
    cache = work / "cache"
    result: dict[str, Any] = {"rows": CACHE_ROWS, "store_rows": store_rows}
    with MockProcess(0.0, work / "mock-j.log") as server:

        def serve(name: str) -> dict[str, Any]:
            out = work / f"{name}.jsonl"
            run = _run([*batchrun_cmd(server, inp, out, CONCURRENCY), "--cache", str(cache)],
                       server)  # fmt: skip
            run["out_lines"] = count_lines(out)
            out.unlink(missing_ok=True)
            shutil.rmtree(work / f"{name}.jsonl.batchrun", ignore_errors=True)
            return run

        result["send"] = serve("cache-send")
        result["serve"] = serve("cache-serve")
        if store_rows > CACHE_ROWS:
            result["grow_s"] = grow_store(cache, store_rows)
            result["serve_big"] = serve("cache-serve-big")
    result["store_bytes"] = sum(f.stat().st_size for f in cache.iterdir())
    shutil.rmtree(cache, ignore_errors=True)
    send, served = result["send"], result["serve"]
    result["ratio"] = served["wall_s"] / send["wall_s"]
    big = result.get("serve_big", served)
    result["ok"] = (
        served["requests"] == 0 and big["requests"] == 0 and result["ratio"] <= 0.3
        and max(served["peak_rss_mb"], big["peak_rss_mb"]) <= 150
    )  # fmt: skip
    return result


def render_reuse(edits: dict[str, Any] | None, cache: dict[str, Any] | None) -> list[str]:
    lines: list[str] = []
    if edits is not None:
        rerun = edits["rerun"]
        lines += [
            "", "## Paying once: an edited input (scenario i)", "",
            f"{EDIT_ROWS:,} rows answered ({edits['first']['requests']:,} requests,"
            f" {edits['first']['wall_s']:.2f} s); then {EDITED} rows edited (same size),"
            f" {DELETED} deleted, {APPENDED} appended: the rerun sent **{rerun['requests']}**"
            f" requests (target exactly {edits['expected']}) in {rerun['wall_s']:.2f} s,"
            f" exit {rerun['exit_code']}, {edits['out_lines']:,} output lines:"
            f" {'met' if edits['ok'] else 'NOT met'}.",
        ]  # fmt: skip
    if cache is not None:
        send, serve = cache["send"], cache["serve"]
        lines += [
            "", "## Paying once: answers from --cache (scenario j)", "",
            "| run | wall s | rows/s | peak RSS MB | requests |", "|---|---:|---:|---:|---:|",
        ]  # fmt: skip
        runs = [("send 200,000 rows into an empty cache", send),
                ("serve them from the cache", serve)]  # fmt: skip
        if "serve_big" in cache:
            runs.append((f"serve them from a {cache['store_rows']:,}-result cache",
                         cache["serve_big"]))  # fmt: skip
        for name, run in runs:
            lines.append(
                f"| {name} | {run['wall_s']:.2f} | {cache['rows'] / run['wall_s']:,.0f}"
                f" | {run['peak_rss_mb']:.1f} | {run['requests']:,} |"
            )
        lines += [
            "",
            f"Serving took **{cache['ratio']:.2f} x** the sending run's time (target <= 0.3),"
            f" store {cache['store_bytes'] / 1e6:,.0f} MB on disk"
            + (f" (grown in {cache['grow_s']:.0f} s)" if "grow_s" in cache else "")
            + f": {'met' if cache['ok'] else 'NOT met'}.",
        ]
    return lines
