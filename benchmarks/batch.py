"""Scenario h of ``make bench``: ``--mode batch`` overhead and memory.

batchrun sends 1,000,000 rows (``--rows-big``) through the mock provider's
batches API (``mock-server --batch-seconds 0.5``), polling every 0.5 s. The
provider's own time is not batchrun's: the overhead per row (building and
uploading the files, downloading and mapping the results, writing the
ordered output) is measured as rows per second of batchrun's CPU time (user +
sys, from ``os.wait4``). Targets: at least 50,000 rows per CPU second, and at
most 150 MB of peak RSS.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks.run import MockProcess, batchrun_cmd, make_input, measure

MIN_ROWS_PER_CPU_S = 50_000
MAX_PEAK_RSS_MB = 150.0
BATCH_SECONDS = "0.5"


def run_batch(keys: str, work: Path, rows: int) -> dict[str, Any]:
    """Scenario ``h`` when chosen: the measured batch-mode run and its verdict."""
    if "h" not in keys:
        return {}
    print(f"scenario h: --mode batch, {rows:,} rows", flush=True)
    source = make_input(work / f"batch-{rows}.jsonl", rows)
    with MockProcess(0.0, work / "mock-h.log", ("--batch-seconds", BATCH_SECONDS)) as server:
        cmd = batchrun_cmd(server, source, work / "out-h.jsonl", 64)
        cmd += ["--mode", "batch", "--poll-interval", "0.5"]
        run = measure("batchrun", cmd, rows, server, work / "out-h.jsonl", work / "h.log")
    rate = rows / run.cpu_s if run.cpu_s else 0.0
    return {
        "rows": rows,
        "wall_s": round(run.wall_s, 2),
        "cpu_s": round(run.cpu_s, 2),
        "rows_per_cpu_s": round(rate),
        "peak_rss_mb": round(run.peak_rss_mb, 1),
        "error": run.error,
        "ok": run.ok and rate >= MIN_ROWS_PER_CPU_S and run.peak_rss_mb <= MAX_PEAK_RSS_MB,
    }


def render_batch(result: dict[str, Any]) -> list[str]:
    """Markdown lines for the report."""
    if not result:
        return []
    verdict = "ok" if result["ok"] else f"MISSED{': ' + result['error'] if result['error'] else ''}"
    return [
        "",
        "## Batch mode (scenario h): overhead per row and memory",
        "",
        "| rows | wall s | batchrun CPU s | rows per CPU s (>= 50,000) | peak RSS MB (<= 150) "
        "| verdict |",
        "|---:|---:|---:|---:|---:|---|",
        f"| {result['rows']:,} | {result['wall_s']:.1f} | {result['cpu_s']:.2f} "
        f"| {result['rows_per_cpu_s']:,} | {result['peak_rss_mb']:.1f} | {verdict} |",
        "",
        "Wall time is mostly the mock provider answering the rows in its own process.",
    ]
