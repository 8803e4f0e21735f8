"""Scenarios e and f of ``make bench``: rate limits against a strict provider.

The mock provider refuses (429, ``Retry-After``) every request past 40 in any
sliding second and answers the rest after 50 ms. batchrun is asked for 36/s
(``--rpm 2160``), 10 % below the provider's limit:

e. one process, 900 rows: target at most 5 refusals and at least 90 % of 36/s;
f. three shard processes (``--shard I/3``) sharing the 36/s through Redis
   (``--shared-limits``), 1,800 rows: target at most 20 refusals, at least
   90 % of 36/s, and at most 0.1 Redis calls per request.

Scenario f starts its own ``redis-server`` on a free loopback port with
``--save ''``; it is skipped when the binary or the ``redis`` extra is missing.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from benchmarks.run import PY, MockProcess, client_env, count_lines

RATE_LIMIT = 40  # the provider's requests per sliding second
RPM = 2160  # what batchrun is asked for: 36/s
LATENCY = 0.05
DEADLINE_S = 300.0  # no scenario process may take longer than this
MOCK_ARGS = ("--rate-limit", str(RATE_LIMIT), "--sliding-window")


def make_rows(path: Path, rows: int) -> Path:
    with path.open("w") as out:
        for i in range(rows):
            out.write(
                f'{{"custom_id": "r{i}", "messages": [{{"role": "user", "content": "{i}"}}]}}\n'
            )
    return path


def run_cmd(server: MockProcess, inp: Path, out: Path, *extra: str) -> list[str]:
    return [
        PY, "-m", "batchrun", "run", str(inp), "--out", str(out), "--provider", "openai",
        "--base-url", server.openai_url, "--model", "mock", "--rpm", str(RPM),
        "--no-progress", "--summary", str(out.with_suffix(".summary.json")), *extra,
    ]  # fmt: skip


def _verdict(rows: int, wall: float, refusals: int, max_refusals: int) -> dict[str, Any]:
    rate = rows / wall
    share = rate / (RPM / 60)
    return {
        "rows": rows,
        "wall_s": round(wall, 2),
        "rows_per_s": round(rate, 1),
        "pct_of_rate": round(100 * share, 1),
        "refusals_429": refusals,
        "ok": refusals <= max_refusals and share >= 0.9,
    }


def one_process(work: Path) -> dict[str, Any]:
    """Scenario e: one batchrun process, 900 rows."""
    inp = make_rows(work / "limits-900.jsonl", 900)
    out = work / "limits-e.jsonl"
    with MockProcess(LATENCY, work / "mock-e.log", MOCK_ARGS) as server:
        started = time.perf_counter()
        done = subprocess.run(
            run_cmd(server, inp, out), env=client_env(), capture_output=True, timeout=DEADLINE_S
        )
        wall = time.perf_counter() - started
        refusals = int(server.stats()["statuses"].get("429", 0))
    result = _verdict(900, wall, refusals, max_refusals=5)
    result["exit_codes"] = [done.returncode]
    result["ok"] = result["ok"] and done.returncode == 0 and count_lines(out) == 900
    return result


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextlib.contextmanager
def redis_server(work: Path) -> Iterator[str]:
    """A throwaway ``redis-server`` on a free loopback port; yields its URL."""
    port = free_port()
    cmd = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
    with (work / "redis.log").open("wb") as log:
        proc = subprocess.Popen([*cmd, "--appendonly", "no"], stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                break
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def shared_shards(work: Path) -> dict[str, Any]:
    """Scenario f: three shard processes sharing the rate through Redis, 1,800 rows."""
    if shutil.which("redis-server") is None:
        return {"skipped": "redis-server is not installed"}
    probe = subprocess.run([PY, "-c", "import redis.asyncio"], capture_output=True, check=False)
    if probe.returncode != 0:
        return {"skipped": "the redis extra is not installed (pip install 'batchrun[redis]')"}
    inp = make_rows(work / "limits-1800.jsonl", 1800)
    outs = [work / f"limits-f-{i}.jsonl" for i in range(3)]
    with redis_server(work) as url, MockProcess(LATENCY, work / "mock-f.log", MOCK_ARGS) as server:
        extra = ("--shared-limits", url, "--limits-key", "bench-f")
        started = time.perf_counter()
        procs = [
            subprocess.Popen(
                run_cmd(server, inp, out, "--shard", f"{i}/3", *extra),
                env=client_env(),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for i, out in enumerate(outs)
        ]
        codes = [proc.wait(timeout=DEADLINE_S) for proc in procs]
        wall = time.perf_counter() - started
        refusals = int(server.stats()["statuses"].get("429", 0))
    calls = sum(_summary(out).get("redis calls", 0) for out in outs)
    result = _verdict(1800, wall, refusals, max_refusals=20)
    result["exit_codes"] = codes
    result["redis_calls_per_request"] = round(calls / 1800, 3)
    lines = sum(count_lines(out) for out in outs)
    result["ok"] = result["ok"] and codes == [0, 0, 0] and lines == 1800
    result["ok"] = result["ok"] and calls / 1800 <= 0.1
    return result


def _summary(out: Path) -> dict[str, Any]:
    path = out.with_suffix(".summary.json")
    if not path.exists():
        return {}
    return dict(json.loads(path.read_text()).get("extra", {}))


def run_limits(keys: str, work: Path) -> dict[str, Any]:
    """The chosen scenarios (``e``, ``f``) by key."""
    results: dict[str, Any] = {}
    if "e" in keys:
        print("scenario e: one process at 36/s against 40/s (sliding)", flush=True)
        results["e"] = one_process(work)
    if "f" in keys:
        print("scenario f: three shards sharing 36/s through Redis", flush=True)
        results["f"] = shared_shards(work)
    return results


def render_limits(results: dict[str, Any]) -> list[str]:
    """Markdown lines for the report."""
    if not results:
        return []
    lines = [
        "",
        f"## Rate limits (scenarios e, f): --rpm {RPM} against {RATE_LIMIT}/s (sliding)",
        "",
        "| scenario | rows | wall s | rows/s | % of 36/s | 429s | Redis calls/request | verdict |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    titles = {"e": "e: one process", "f": "f: three shards, Redis"}
    for key, r in results.items():
        if "skipped" in r:
            lines.append(f"| {titles[key]} | — | — | — | — | — | — | skipped: {r['skipped']} |")
            continue
        calls = r.get("redis_calls_per_request")
        lines.append(
            f"| {titles[key]} | {r['rows']:,} | {r['wall_s']:.1f} | {r['rows_per_s']:.1f} "
            f"| {r['pct_of_rate']:.0f} % | {r['refusals_429']} | {'—' if calls is None else calls} "
            f"| {'ok' if r['ok'] else 'MISSED'} (exit {r['exit_codes']}) |"
        )
    return lines


if __name__ == "__main__":  # pragma: no cover - a quick way to run e and f alone
    import sys
    import tempfile

    with tempfile.TemporaryDirectory(prefix="batchrun-limits-") as tmp:
        found = run_limits(sys.argv[1] if len(sys.argv) > 1 else "ef", Path(tmp))
    print("\n".join(render_limits(found)))
    print(json.dumps(found, indent=2))
