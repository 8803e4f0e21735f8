"""The benchmark harness in smoke mode: tiny inputs, one rep, scenarios a and b.

The SDK peers are optional: the harness reports them unavailable when they
are not installed, so only batchrun and the bare aiohttp loop are required.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
@pytest.mark.timeout(200)  # a few seconds alone; minutes on a machine busy with other suites
def test_bench_smoke_measures_batchrun_and_bare(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--smoke", "--out-dir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    report = json.loads((tmp_path / "smoke.json").read_text())
    assert [sc["key"] for sc in report["scenarios"]] == ["a", "b"]
    for scenario in report["scenarios"]:
        by_client = {row["client"]: row for row in scenario["table"]}
        for client in ("batchrun", "bare"):
            assert by_client[client]["rows_per_s"] > 0, (scenario["key"], client)
    assert (tmp_path / "smoke.md").read_text().startswith("# batchrun benchmark")
