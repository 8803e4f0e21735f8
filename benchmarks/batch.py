"""Scenario h of ``make bench``: ``--mode batch`` overhead and memory.

batchrun sends 1,000,000 rows (``--rows-big``) through the mock provider's
batches API (``mock-server --batch-seconds 0.5``), polling every 0.5 s. The
provider's own time is not batchrun's: the overhead per row (building and
uploading the files, downloading and mapping the results, writing the
ordered output) is measured as rows per second of batchrun's CPU time (user +
sys, from ``os.wait4``). Targets: at least 50,000 rows per CPU second, and at
most 150 MB of peak RSS, on the median of ``--reps`` runs (peak RSS: the
largest).
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from benchmarks.run import MockProcess, batchrun_cmd, make_input, measure

MIN_ROWS_PER_CPU_S = 50_000
MAX_PEAK_RSS_MB = 150.0
BATCH_SECONDS = "0.5"


def run_batch(keys: str, work: Path, rows: int, reps: int = 1) -> dict[str, Any]:
    """Scenario ``h`` when chosen: ``reps`` measured batch-mode runs and their
    verdict, on the median run's CPU time and the largest peak RSS. One run
    is not enough: the same code's CPU time moves by a tenth from run to run
    on a shared machine."""
    if "h" not in keys:
        return {}
    print(f"scenario h: --mode batch, {rows:,} rows, {reps} run(s)", flush=True)
    source = make_input(work / f"batch-{rows}.jsonl", rows)
    runs = []
    with MockProcess(0.0, work / "mock-h.log", ("--batch-seconds", BATCH_SECONDS)) as server:
        cmd = batchrun_cmd(server, source, work / "out-h.jsonl", 64)
        cmd += ["--mode", "batch", "--poll-interval", "0.5"]
        for _ in range(max(1, reps)):
            runs.append(
                measure("batchrun", cmd, rows, server, work / "out-h.jsonl", work / "h.log")
            )
    cpu_s = statistics.median(run.cpu_s for run in runs)
    rate = rows / cpu_s if cpu_s else 0.0
    peak = max(run.peak_rss_mb for run in runs)
    error = next((run.error for run in runs if run.error), None)
    met = all(run.ok for run in runs) and rate >= MIN_ROWS_PER_CPU_S
    return {
        "rows": rows,
        "runs": len(runs),
        "wall_s": round(statistics.median(run.wall_s for run in runs), 2),
        "cpu_s": round(cpu_s, 2),
        "cpu_s_each": [round(run.cpu_s, 2) for run in runs],
        "rows_per_cpu_s": round(rate),
        "peak_rss_mb": round(peak, 1),
        "error": error,
        "ok": met and peak <= MAX_PEAK_RSS_MB,
    }


def render_batch(result: dict[str, Any]) -> list[str]:
    """Markdown lines for the report."""
    if not result:
        return []
    verdict = "ok" if result["ok"] else f"MISSED{': ' + result['error'] if result['error'] else ''}"
    each = ", ".join(f"{cpu:.2f}" for cpu in result.get("cpu_s_each", [result["cpu_s"]]))
    return [
        "",
        "## Batch mode (scenario h): overhead per row and memory",
        "",
        "| rows | runs | wall s (median) | batchrun CPU s (median; each run) "
        "| rows per CPU s (>= 50,000) | peak RSS MB (<= 150) | verdict |",
        "|---:|---:|---:|---|---:|---:|---|",
        f"| {result['rows']:,} | {result.get('runs', 1)} | {result['wall_s']:.1f} "
        f"| {result['cpu_s']:.2f} ({each}) | {result['rows_per_cpu_s']:,} "
        f"| {result['peak_rss_mb']:.1f} | {verdict} |",
        "",
        "Wall time is mostly the mock provider answering the rows in its own process.",
    ]
