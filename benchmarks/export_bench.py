"""Scenario g of ``make bench``: ``batchrun export`` to Parquet, speed and memory.

An output of chat answers in batchrun's record shape (one row in 50 failed)
is written for each size; ``python -m benchmarks.export_bench OUT TO`` then
exports it three times in a process of its own, which reports the median
wall and CPU time of the three export calls (CPU time is the figure that
other load on the machine disturbs least); its peak RSS comes from
``os.wait4``. Targets: at least 100,000 rows/s,
and 100,000 rows within 250 MB of peak RSS, flat in the number of rows.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson

TARGET_ROWS_PER_S = 100_000
TARGET_RSS_MB = 250


def make_output(path: Path, rows: int) -> Path:
    """``rows`` output records: chat answers, every 50th one failed."""
    with path.open("wb") as handle:
        for line in range(1, rows + 1):
            handle.write(orjson.dumps(_record(line), option=orjson.OPT_APPEND_NEWLINE))
    return path


def _record(line: int) -> dict[str, Any]:
    record: dict[str, Any] = {"id": f"batch_req_{line}", "custom_id": f"row-{line}", "line": line}
    if line % 50 == 0:
        error = {"code": "invalid_request_error", "message": "mock fault", "retryable": False}
        return {**record, "response": None, "error": error, "attempts": 1}
    text = f"echo: the answer to question number {line}, with a few more words in it"
    body = {
        "id": f"chatcmpl-{line:012d}",
        "object": "chat.completion",
        "model": "mock",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 12, "completion_tokens": 15, "total_tokens": 27},
    }
    response = {"status_code": 200, "request_id": f"req-{line}", "body": body}
    return {**record, "response": response, "error": None, "attempts": 1}


def measure(out: Path, to: Path) -> dict[str, Any]:
    """Export ``out`` to ``to`` in a child process: its export time and peak RSS."""
    started = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.export_bench", str(out), str(to)],
        stdout=subprocess.PIPE,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert proc.stdout is not None
    reported = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.stdout.close()
    if os.waitstatus_to_exitcode(status) != 0:
        return {"error": f"exit {os.waitstatus_to_exitcode(status)}"}
    child = json.loads(reported)
    return {
        **child,
        "rows_per_s": child["rows"] / child["export_s"],
        "rows_per_cpu_s": child["rows"] / child["export_cpu_s"],
        "process_wall_s": time.perf_counter() - started,
        "peak_rss_mb": usage.ru_maxrss / 1024,  # KiB on Linux
    }


def run_export(sizes: list[int], work: Path) -> dict[str, Any]:
    """Scenario e for each size in ``sizes``; the RSS ratio of the largest to the smallest."""
    results = []
    for rows in sizes:
        out = make_output(work / f"export-{rows}.jsonl", rows)
        result = {"rows": rows, **measure(out, work / f"export-{rows}.parquet")}
        results.append(result)
        out.unlink()
        print(f"  [g] {rows:,} rows: {result}", flush=True)
    ok = [r for r in results if "error" not in r]
    report: dict[str, Any] = {"sizes": results}
    if len(ok) >= 2:
        report["rss_ratio"] = ok[-1]["peak_rss_mb"] / ok[0]["peak_rss_mb"]
    return report


def render(report: dict[str, Any]) -> list[str]:
    """Markdown lines for the benchmark report."""
    lines = [
        "",
        "## Export to Parquet (scenario g)",
        "",
        f"Targets: >= {TARGET_ROWS_PER_S:,} rows/s; 100,000 rows within {TARGET_RSS_MB} MB"
        " peak RSS, flat in rows.",
        "",
        "| rows | export s | rows/s | rows per CPU s | peak RSS MB | process wall s |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["sizes"]:
        if "error" in r:
            lines.append(f"| {r['rows']:,} | failed: {r['error']} | | | | |")
            continue
        lines.append(
            f"| {r['rows']:,} | {r['export_s']:.2f} | {r['rows_per_s']:,.0f}"
            f" | {r['rows_per_cpu_s']:,.0f} | {r['peak_rss_mb']:.1f} | {r['process_wall_s']:.2f} |"
        )
    if "rss_ratio" in report:
        lines.append("")
        lines.append(f"Peak RSS of the largest size is {report['rss_ratio']:.2f}x the smallest's.")
    return lines


def _child(out: Path, to: Path, reps: int = 3) -> None:
    """Export ``reps`` times; print the rows and the median time as JSON."""
    from batchrun.export import export

    times, cpu = [], []
    for _ in range(reps):
        started, cpu_started = time.perf_counter(), time.process_time()
        report = export(out, to)
        times.append(time.perf_counter() - started)
        cpu.append(time.process_time() - cpu_started)
    print(
        json.dumps(
            {
                "rows": report.rows,
                "export_s": statistics.median(times),
                "export_cpu_s": statistics.median(cpu),
                "reps": reps,
            }
        )
    )


if __name__ == "__main__":
    _child(Path(sys.argv[1]), Path(sys.argv[2]))
