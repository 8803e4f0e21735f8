"""Scenario k of ``make bench``: memory behind a slow head row, in bytes.

The first row's answer takes 25 s; the next 2,000 rows get 512 KB answers at
once. Every one of those waits for row 1 before it can be written, so the
reorder window (10,000 rows) alone would let about 1 GB of results pile up
in memory. ``--reorder-bytes`` (default 256 MiB) bounds them in bytes: past
the bound a result waits in the journal, which already holds it. batchrun's
peak RSS is measured with ``os.wait4``, at the default and, for comparison,
with the bound out of the way. Target: under 400 MB at the default.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson

TARGET_RSS_MB = 400
HEAD_DELAY_S = 25
ROWS = 2_000
ANSWER_CHARS = 512 * 1024
UNBOUNDED = str(1 << 40)  # a bound never reached: memory as before --reorder-bytes


def make_input(path: Path, rows: int = ROWS) -> Path:
    """A slow head row, then ``rows`` rows with ``ANSWER_CHARS``-character answers."""
    with path.open("wb") as out:
        head = f"head mock:delay={HEAD_DELAY_S}"
        out.write(orjson.dumps({"messages": [{"role": "user", "content": head}]}) + b"\n")
        for i in range(rows):
            text = f"row {i} mock:size={ANSWER_CHARS}"
            out.write(orjson.dumps({"messages": [{"role": "user", "content": text}]}) + b"\n")
    return path


def run_reorder(work: Path) -> dict[str, Any]:
    """Scenario h: batchrun's peak RSS at the default bound and without one."""
    from benchmarks.run import MockProcess, batchrun_cmd, measure

    source = make_input(work / "reorder.jsonl")
    results: dict[str, Any] = {"rows": ROWS + 1, "target_rss_mb": TARGET_RSS_MB}
    with MockProcess(0.0, work / "reorder-mock.log") as server:
        for name, extra in (("default", []), ("unbounded", ["--reorder-bytes", UNBOUNDED])):
            out = work / f"reorder-{name}.jsonl"
            cmd = batchrun_cmd(server, source, out, 64) + extra
            run = measure("batchrun", cmd, ROWS + 1, server, out, work / f"reorder-{name}.log")
            results[name] = {
                "peak_rss_mb": run.peak_rss_mb,
                "wall_s": run.wall_s,
                "error": run.error,
            }
            print(f"  [k] {name}: {results[name]}", flush=True)
    source.unlink()
    default = results["default"]
    results["ok"] = default["error"] is None and default["peak_rss_mb"] < TARGET_RSS_MB
    return results


def render(report: dict[str, Any]) -> list[str]:
    """Markdown lines for the benchmark report."""
    lines = [
        "",
        "## Memory behind a slow head row (scenario k)",
        "",
        f"Row 1 answers after {HEAD_DELAY_S} s; {ROWS:,} rows behind it get"
        f" {ANSWER_CHARS // 1024} KB answers at once. Target: peak RSS under"
        f" {TARGET_RSS_MB} MB at the default --reorder-bytes (256 MiB).",
        "",
        "| --reorder-bytes | peak RSS MB | wall s | note |",
        "|---|---:|---:|---|",
    ]
    for name, label in (("default", "256 MiB (default)"), ("unbounded", "unbounded")):
        run = report.get(name) or {}
        note = run.get("error") or ""
        if name == "default" and not note:
            note = "met" if report.get("ok") else "not met"
        lines.append(
            f"| {label} | {run.get('peak_rss_mb', 0):.1f} | {run.get('wall_s', 0):.1f} | {note} |"
        )
    return lines
