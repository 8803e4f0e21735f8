"""Benchmark batchrun against a bare aiohttp loop and the DashScope and openai SDK recipes.

Run ``make bench`` (or ``.venv/bin/python -m benchmarks.run --help``). Every
client runs as its own process against the project's mock provider, itself a
separate process (``python -m batchrun mock-server``) on 127.0.0.1, so each
client's wall time, CPU time (user + sys) and peak RSS come from ``os.wait4``.
Clients alternate within each repetition; the table shows medians.

Scenarios:

a. client overhead: zero latency, 64 in flight, 20,000 rows;
b. latency-bound: 50 ms per answer, 128 in flight, 10,000 rows; the ideal is
   C / latency = 2,560 rows/s;
c. memory: batchrun alone at zero latency on 10,000 and 1,000,000 rows;
d. resume start-up: a 1,000,000-row batchrun run is stopped (SIGTERM) once 60 %
   of the rows reached the server; the same command is run again and the time
   from its start to the server's first received request is measured (by
   polling ``GET /_mock/stats`` every 10 ms);
e, f. rate limits against a provider refusing past 40 requests per sliding
   second: one process, then three shards sharing the rate through Redis
   (see ``benchmarks/limits.py``);
g. export: ``batchrun export`` of 30,000, 100,000 and 300,000 output rows to Parquet,
   rows/s and peak RSS (see ``benchmarks/export_bench.py``);
h. ``--mode batch`` on 1,000,000 rows: overhead per row and peak RSS (see
   ``benchmarks/batch.py``);
i. paying once, an edited input: 2,000 rows, then 10 edited (same size),
   5 deleted, 50 appended; the rerun must send exactly 60 requests;
j. paying once, a cache: 200,000 rows sent into a ``--cache``, then served
   from it to another output (target: <= 0.3 x the sending time, RSS <= 150
   MB), and served again once the store holds ``--store-rows`` results
   (10,000,000; RSS must stay flat) (see ``benchmarks/reuse_bench.py``);
k. memory behind a slow head row: row 1 answers after 25 s, 2,000 rows of 512 KB
   answers wait for it; peak RSS with ``--reorder-bytes`` at its default and
   unbounded (see ``benchmarks/reorder_bench.py``);
l, m, n, o, p. the floor (``benchmarks/floor.py``): 1 s of latency with 1,000
   and 2,000 in flight against the bare loop; 10 % of rows failing once
   against no faults; ``batchrun --version`` start-up; instructions per row
   under callgrind, against the bare loop's. The report ends with every
   ratio against its target.

Results go to ``benchmarks/results/latest.md`` and ``latest.json`` (``smoke.*``
with ``--smoke``). Only loopback is contacted, and every loop has a deadline.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.metadata
import json
import os
import platform
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import timeit
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.export_bench import render as render_export
from benchmarks.export_bench import run_export
from benchmarks.reorder_bench import render as render_reorder
from benchmarks.reorder_bench import run_reorder

ROOT = Path(__file__).resolve().parent.parent
PEERS = ROOT / "benchmarks" / "peers"
PY = sys.executable
CLIENTS = ("batchrun", "bare", "dashscope_sdk", "openai_sdk")
PEER_SCRIPTS = {
    "bare": "bare_aiohttp.py",
    "dashscope_sdk": "dashscope_recipe.py",
    "openai_sdk": "openai_recipe.py",
}
NEEDS = {"bare": "aiohttp", "dashscope_sdk": "dashscope", "openai_sdk": "openai"}
RUN_DEADLINE_S = 1800.0  # no single client run may take longer than this


# --- the mock provider, as a separate process ---------------------------------------


class MockProcess:
    """``python -m batchrun mock-server --port 0 --latency L``; ``with`` stops it."""

    def __init__(self, latency: float, log_path: Path, extra: tuple[str, ...] = ()) -> None:
        self.latency = latency
        self._log = log_path.open("wb")
        cmd = [PY, "-m", "batchrun", "mock-server", "--port", "0", "--latency", str(latency)]
        cmd += extra  # e.g. a rate limit
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self._log, cwd=ROOT)
        line = _read_line(self.proc, deadline_s=30.0)
        if not line.startswith("mock server listening on http://127.0.0.1:"):
            self.stop()
            raise RuntimeError(f"mock server did not start: {line!r}")
        self.origin = line.split()[4]  # http://127.0.0.1:PORT
        self.openai_url = self.origin + "/v1"
        self.dashscope_url = self.origin + "/api/v1"

    def requests(self) -> int:
        """The server's count of model requests received so far."""
        return int(self.stats()["requests"])

    def stats(self) -> dict[str, Any]:
        """The server's counters (``GET /_mock/stats``)."""
        with urllib.request.urlopen(self.origin + "/_mock/stats", timeout=5) as resp:
            return dict(json.load(resp))

    def cpu_seconds(self) -> float:
        """The server's user + sys CPU time so far, from /proc."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._log.close()

    def __enter__(self) -> MockProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _read_line(proc: subprocess.Popen[bytes], deadline_s: float) -> str:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], deadline_s)
    return proc.stdout.readline().decode().strip() if ready else ""


# --- inputs, commands, measured runs --------------------------------------------------


def make_input(path: Path, rows: int) -> Path:
    """``rows`` chat rows ``{"custom_id": "rN", "messages": [user: "row N"]}``."""
    if not path.exists():
        with path.open("w") as out:
            for i in range(rows):
                out.write(
                    f'{{"custom_id": "r{i}", "messages": '
                    f'[{{"role": "user", "content": "row {i}"}}]}}\n'
                )
    return path


def batchrun_cmd(server: MockProcess, inp: Path, out: Path, concurrency: int) -> list[str]:
    return [
        PY, "-m", "batchrun", "run", str(inp), "--out", str(out),
        "--provider", "openai", "--base-url", server.openai_url, "--model", "mock",
        "--max-async-requests", str(concurrency), "--no-progress",
    ]  # fmt: skip


def client_cmd(
    client: str, server: MockProcess, inp: Path, out: Path, concurrency: int
) -> list[str]:
    if client == "batchrun":
        return batchrun_cmd(server, inp, out, concurrency)
    url = server.dashscope_url if client == "dashscope_sdk" else server.openai_url
    script = str(PEERS / PEER_SCRIPTS[client])
    return [PY, script, "--input", str(inp), "--out", str(out), "--base-url", url,
            "--concurrency", str(concurrency)]  # fmt: skip


def client_env() -> dict[str, str]:
    env = dict(os.environ, OPENAI_API_KEY="bench", DASHSCOPE_API_KEY="bench")
    env["PYTHONPATH"] = str(ROOT)  # the project's own batchrun, whatever the cwd
    for proxy in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy"):
        env.pop(proxy, None)  # loopback only
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    return env


def availability() -> dict[str, str | None]:
    """Each client's reason to be unavailable (None: available)."""
    found: dict[str, str | None] = {"batchrun": None}
    for client, module in NEEDS.items():
        probe = subprocess.run(
            [PY, "-c", f"import {module}"], capture_output=True, timeout=120, check=False
        )
        found[client] = None if probe.returncode == 0 else f"unavailable ({module} not importable)"
    return found


@dataclass
class Run:
    """One measured client process."""

    client: str
    rows: int
    wall_s: float
    cpu_s: float
    peak_rss_mb: float
    exit_code: int
    out_lines: int
    server_requests: int
    server_cpu_s: float
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def measure(
    client: str, cmd: list[str], rows: int, server: MockProcess, out: Path, log: Path
) -> Run:
    """Run ``cmd`` to its end; its rusage comes from ``os.wait4`` on its own pid."""
    requests0, server_cpu0 = server.requests(), server.cpu_seconds()
    with log.open("wb") as err:
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=client_env())
        watchdog = threading.Timer(RUN_DEADLINE_S, proc.kill)
        watchdog.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            watchdog.cancel()
        wall = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    lines = count_lines(out)
    run = Run(
        client=client,
        rows=rows,
        wall_s=wall,
        cpu_s=usage.ru_utime + usage.ru_stime,
        peak_rss_mb=usage.ru_maxrss / 1024,  # KiB on Linux
        exit_code=proc.returncode,
        out_lines=lines,
        server_requests=server.requests() - requests0,
        server_cpu_s=server.cpu_seconds() - server_cpu0,
    )
    if proc.returncode != 0 or lines != rows:
        tail = log.read_text(errors="replace").strip().splitlines()[-3:]
        run.error = f"exit {proc.returncode}, {lines}/{rows} lines: {' | '.join(tail)}"
    with contextlib.suppress(FileNotFoundError):
        out.unlink()
    shutil.rmtree(out.with_name(out.name + ".batchrun"), ignore_errors=True)
    return run


def count_lines(path: Path) -> int:
    if not path.exists():
        return 0
    count = 0
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            count += chunk.count(b"\n")
    return count


# --- scenarios -----------------------------------------------------------------------


@dataclass
class Scenario:
    key: str
    title: str
    latency: float
    concurrency: int
    rows: int
    clients: list[str]
    reps: int
    runs: list[Run] = field(default_factory=list)
    note: str = ""


def run_comparison(sc: Scenario, work: Path, avail: dict[str, str | None]) -> None:
    """Alternate the clients, ``reps`` rounds, rotating who goes first each round."""
    inp = make_input(work / f"rows-{sc.rows}.jsonl", sc.rows)
    clients = [c for c in sc.clients if avail.get(c) is None]
    with MockProcess(sc.latency, work / f"mock-{sc.key}.log") as server:
        for rep in range(sc.reps):
            shift = rep % len(clients)
            for client in clients[shift:] + clients[:shift]:
                out = work / f"out-{sc.key}-{client}.jsonl"
                cmd = client_cmd(client, server, inp, out, sc.concurrency)
                run = measure(client, cmd, sc.rows, server, out, work / f"{client}.log")
                sc.runs.append(run)
                status = "ok" if run.ok else f"FAILED: {run.error}"
                print(
                    f"  [{sc.key}] rep {rep + 1}/{sc.reps} {client:14s} "
                    f"{sc.rows / run.wall_s:9.0f} rows/s  cpu {run.cpu_s:6.2f} s  "
                    f"rss {run.peak_rss_mb:6.1f} MB  {status}",
                    flush=True,
                )


def resume_flag() -> list[str]:
    """``--resume`` if ``batchrun run`` has such a flag (else resuming is the default)."""
    help_text = subprocess.run(
        [PY, "-m", "batchrun", "run", "--help"],
        capture_output=True, text=True, env=dict(client_env(), COLUMNS="200"), timeout=60,
        check=False,
    ).stdout  # fmt: skip
    return ["--resume"] if "--resume" in help_text else []


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else 0


def run_resume(rows: int, concurrency: int, stop_at: float, work: Path) -> dict[str, Any]:
    """Scenario d: stop a big run partway, rerun it, time its first request."""
    inp = make_input(work / f"rows-{rows}.jsonl", rows)
    out = work / "out-resume.jsonl"
    state = out.with_name(out.name + ".batchrun")
    partial = state / "output.partial"
    result: dict[str, Any] = {"rows": rows, "concurrency": concurrency, "stop_at": stop_at}
    with MockProcess(0.0, work / "mock-d.log") as server:
        cmd = batchrun_cmd(server, inp, out, concurrency)
        baseline, started = server.requests(), time.perf_counter()
        first = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                 env=client_env())  # fmt: skip
        result["fresh_first_request_s"] = first_request_after(first, server, baseline, started)
        deadline = time.monotonic() + RUN_DEADLINE_S
        while first.poll() is None and time.monotonic() < deadline:
            if server.requests() >= stop_at * rows:
                break
            time.sleep(0.05)
        first.send_signal(signal.SIGTERM)
        try:
            first.wait(timeout=30)
        except subprocess.TimeoutExpired:
            first.kill()
            first.wait()
        sent_before = server.requests()
        state_before = partial.stat().st_size if partial.exists() else 0
        result.update(sent_before_stop=sent_before, state_bytes=dir_bytes(state))

        # The rerun: same command (plus --resume if the CLI has it).
        cmd += resume_flag()
        baseline = server.requests()
        started = time.perf_counter()
        log = (work / "resume.log").open("wb")
        rerun = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, env=client_env())
        result["first_request_s"] = first_request_after(rerun, server, baseline, started)
        verdict = _resume_verdict(rerun, server, baseline, rows, sent_before, partial,
                                  state_before)  # fmt: skip
        log.close()
        if verdict["why_not"] and verdict["why_not"].endswith(":"):
            tail = (work / "resume.log").read_text(errors="replace").strip().splitlines()
            verdict["why_not"] += " " + (tail[-1] if tail else "")
        result.update(verdict)
        if verdict["resumed"]:
            result["resume_wall_s"] = time.perf_counter() - started
            result["out_lines"] = count_lines(out)
    with contextlib.suppress(FileNotFoundError):
        out.unlink()
    shutil.rmtree(state, ignore_errors=True)
    return result


def first_request_after(
    proc: subprocess.Popen[bytes], server: MockProcess, baseline: int, started: float
) -> float | None:
    """Seconds from ``started`` until the server counts a request past ``baseline``
    (polled every 10 ms for at most 120 s); None if ``proc`` ended or time ran out."""
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        if server.requests() > baseline:
            return time.perf_counter() - started
        time.sleep(0.01)
    return None


def _resume_verdict(
    rerun: subprocess.Popen[bytes],
    server: MockProcess,
    baseline: int,
    rows: int,
    sent_before: int,
    partial: Path,
    state_before: int,
) -> dict[str, Any]:
    """Let the rerun finish, unless it shows it started over (then stop it)."""
    # A resumed run re-sends at most the unfinished rows plus one reorder window.
    budget = rows - sent_before // 2
    deadline = time.monotonic() + RUN_DEADLINE_S
    why = None
    while rerun.poll() is None and time.monotonic() < deadline:
        resent = server.requests() - baseline
        shrunk = partial.exists() and partial.stat().st_size < state_before // 10
        if resent > 0 and state_before > 0 and shrunk:
            why = "the rerun emptied the partial output and started over"
        if resent > budget:
            why = f"the rerun re-sent {resent:,} of {rows:,} rows"
        if why:
            break
        time.sleep(0.2)
    if rerun.poll() is None:
        rerun.kill()
    rerun.wait()
    resent = server.requests() - baseline
    if why is None and rerun.returncode != 0:
        why = f"the rerun exited {rerun.returncode}:"
    return {"resumed": why is None, "why_not": why, "rows_resent": resent}


# --- summary and report --------------------------------------------------------------


def summarize(sc: Scenario) -> list[dict[str, Any]]:
    """Median figures per client, and their ratios to the bare loop's."""
    table: list[dict[str, Any]] = []
    for client in sc.clients:
        runs = [r for r in sc.runs if r.client == client]
        good = [r for r in runs if r.ok]
        row: dict[str, Any] = {"client": client, "runs": len(runs), "failed": len(runs) - len(good)}
        if good:
            row.update(
                rows_per_s=statistics.median(r.rows / r.wall_s for r in good),
                cpu_s_per_1k=statistics.median(1000 * r.cpu_s / r.rows for r in good),
                peak_rss_mb=statistics.median(r.peak_rss_mb for r in good),
                server_cpu_pct=statistics.median(100 * r.server_cpu_s / r.wall_s for r in good),
            )
            if sc.latency > 0:
                row["pct_of_ideal"] = 100 * row["rows_per_s"] / (sc.concurrency / sc.latency)
        table.append(row)
    bare = next((r for r in table if r["client"] == "bare" and "rows_per_s" in r), None)
    for row in table:
        if bare and "rows_per_s" in row:
            for key in ("rows_per_s", "cpu_s_per_1k", "peak_rss_mb"):
                row[key + "_x_bare"] = row[key] / bare[key]
    return table


def machine_info() -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    versions = {}
    for dist in ("aiohttp", "orjson", "anyio", "dashscope", "openai", "httpx"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = None
    commit = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT,
                            capture_output=True, text=True, check=False).stdout.strip()  # fmt: skip
    return {
        "cpu_model": cpu,
        "cores": os.cpu_count(),
        "python_loop_us": python_loop_us(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": versions,
        "batchrun_commit": commit or None,
    }


def python_loop_us() -> float:
    """This machine's speed at plain Python work: the best of five timings of
    ``sum(range(1000))``, in microseconds (the README quotes it beside CPU
    figures, which move with it from machine to machine)."""
    timer = timeit.Timer("sum(range(1000))")
    loops, _ = timer.autorange()
    return round(min(timer.repeat(5, loops)) / loops * 1e6, 1)


def source_fingerprint() -> str:
    """A hash of batchrun's source, to flag a tree that changed during the run."""
    digest = hashlib.sha256()
    for path in sorted((ROOT / "batchrun").rglob("*.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def _fmt(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def render(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [
        "# batchrun benchmark",
        "",
        f"{m['cpu_model']}, {m['cores']} cores, Python {m['python']} "
        f"(`sum(range(1000))`: {m.get('python_loop_us', '?')} us), "
        f"aiohttp {m['versions']['aiohttp']}, batchrun {m['batchrun_commit']}; "
        f"median of {report['reps']} rep(s); each client and the mock server are "
        "separate processes on loopback.",
        *([f"**Warning: {m['warning']}: figures may mix versions.**"] if m.get("warning") else []),
        "",
        "| scenario | client | rows/s | vs bare | CPU s / 1k rows | vs bare "
        "| peak RSS MB | vs bare | note |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for sc in report["scenarios"]:
        for row in sc["table"]:
            if row.get("unavailable"):
                cells = ["—"] * 6 + [row["unavailable"]]
            elif "rows_per_s" not in row:
                cells = ["—"] * 6 + [f"failed ({row['failed']}/{row['runs']} runs)"]
            else:
                notes = [f"server CPU {row['server_cpu_pct']:.0f}%"]
                if "pct_of_ideal" in row:
                    notes.insert(0, f"{row['pct_of_ideal']:.0f}% of ideal")
                if row.get("note"):
                    notes.insert(0, row["note"])
                cells = [
                    f"{row['rows_per_s']:,.0f}", _fmt(row.get("rows_per_s_x_bare"), ".2f"),
                    f"{row['cpu_s_per_1k']:.3f}", _fmt(row.get("cpu_s_per_1k_x_bare"), ".2f"),
                    f"{row['peak_rss_mb']:.1f}", _fmt(row.get("peak_rss_mb_x_bare"), ".2f"),
                    "; ".join(notes),
                ]  # fmt: skip
            lines.append(f"| {sc['title']} | {row['client']} | " + " | ".join(cells) + " |")
    d = report.get("resume")
    if d is not None:
        lines += ["", "## Resume start-up (scenario d)", ""]
        if d.get("skipped"):
            lines.append(f"skipped: {d['skipped']}")
        elif d["resumed"]:
            lines.append(
                f"{d['rows']:,} rows, stopped after {d['sent_before_stop']:,} requests; "
                f"the rerun's first request came {_fmt(d['first_request_s'], '.3f')} s after "
                f"its start (a fresh start's: {_fmt(d['fresh_first_request_s'], '.3f')} s), "
                f"it re-sent {d['rows_resent']:,} rows and finished in {d['resume_wall_s']:.1f} s "
                f"({d['out_lines']:,} output lines)."
            )
        else:
            first = d.get("first_request_s")
            seen = f" (the rerun's first request came after {first:.3f} s)" if first else ""
            lines.append(f"n/a (resume not available): {d['why_not']}{seen}.")
    from benchmarks.limits import render_limits

    lines += render_limits(report.get("limits") or {})
    if report.get("export") is not None:
        lines += render_export(report["export"])
    if report.get("reorder") is not None:
        lines += render_reorder(report["reorder"])
    from benchmarks.batch import render_batch

    lines += render_batch(report.get("batch") or {})
    from benchmarks.reuse_bench import render_reuse

    reuse = report.get("reuse") or {}
    lines += render_reuse(reuse.get("edits"), reuse.get("cache"))
    from benchmarks.floor import render_targets

    lines += render_targets(report["scenarios"], report.get("floor") or {})
    return "\n".join(lines) + "\n"


# --- main ----------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n")[0])
    p.add_argument("--reps", type=int, default=3, help="repetitions per client (3)")
    p.add_argument(
        "--scenarios", default="abcdefghijklmnop", help="which of a-p to run (abcdefghijklmnop)"
    )
    p.add_argument("--clients", default=",".join(CLIENTS), help="comma-separated clients")
    p.add_argument("--rows-a", type=int, default=20_000)
    p.add_argument("--rows-b", type=int, default=10_000)
    p.add_argument("--rows-small", type=int, default=10_000, help="scenario c, small input")
    p.add_argument("--rows-big", type=int, default=1_000_000, help="scenarios c and d")
    p.add_argument("--skip-big", action="store_true", help="skip the 1M-row runs (c big, d, h)")
    p.add_argument(
        "--store-rows",
        type=int,
        default=10_000_000,
        help="scenario j: results in the grown cache (1,000,000 with --skip-big)",
    )
    p.add_argument("--smoke", action="store_true", help="tiny: 300 rows, 1 rep, a and b")
    p.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results")
    args = p.parse_args(argv)
    if args.smoke:
        args.reps, args.rows_a, args.rows_b, args.scenarios = 1, 300, 300, "ab"
    return args


def compile_sources() -> None:
    """Compile batchrun's modules to bytecode once, as an install or a first
    run does, so each measured run starts as it would for a user. Where
    PYTHONDONTWRITEBYTECODE is set, every run would otherwise compile all of
    them again (a quarter of a second of start-up)."""
    import compileall

    compileall.compile_dir(ROOT / "batchrun", quiet=1)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    compile_sources()
    machine, source = machine_info(), source_fingerprint()
    clients = [c.strip() for c in args.clients.split(",") if c.strip() in CLIENTS]
    avail = availability()
    for client in clients:
        if avail[client]:
            print(f"{client}: {avail[client]}", flush=True)
    scenarios: list[Scenario] = []
    if "a" in args.scenarios:
        scenarios.append(Scenario("a", "a: 0 ms, C=64", 0.0, 64, args.rows_a, clients, args.reps))
    if "b" in args.scenarios:
        scenarios.append(
            Scenario("b", "b: 50 ms, C=128", 0.05, 128, args.rows_b, clients, args.reps)
        )
    wide = [c for c in clients if c in ("batchrun", "bare")]
    for key, concurrency in (("l", 1_000), ("m", 2_000)):
        if key in args.scenarios:
            title = f"{key}: 1 s, C={concurrency:,}"
            scenarios.append(Scenario(key, title, 1.0, concurrency, 20_000, wide, args.reps))
    if "c" in args.scenarios:
        small = args.rows_small
        scenarios.append(Scenario("c1", f"c: memory, {small:,} rows", 0.0, 64, small,
                                  ["batchrun"], args.reps))  # fmt: skip
        if not args.skip_big:
            scenarios.append(Scenario("c2", f"c: memory, {args.rows_big:,} rows", 0.0, 64,
                                      args.rows_big, ["batchrun"], 1))  # fmt: skip
    resume: dict[str, Any] | None = None
    with tempfile.TemporaryDirectory(prefix="batchrun-bench-") as tmp:
        work = Path(tmp)
        for sc in scenarios:
            print(f"scenario {sc.title}: {sc.rows:,} rows, {sc.reps} rep(s)", flush=True)
            run_comparison(sc, work, avail)
        if "d" in args.scenarios:
            if args.skip_big:
                resume = {"skipped": "--skip-big"}
            else:
                print(f"scenario d: resume start-up on {args.rows_big:,} rows", flush=True)
                resume = run_resume(args.rows_big, 64, 0.6, work)
        from benchmarks.floor import run_floor

        floor = run_floor(args.scenarios, work, args.reps)
        from benchmarks.limits import run_limits

        limits = run_limits(args.scenarios, work)
        exported = None
        if "g" in args.scenarios:
            print("scenario g: export to Parquet", flush=True)
            exported = run_export([30_000, 100_000, 300_000], work)
        reorder = None
        if "k" in args.scenarios:
            print("scenario k: memory behind a slow head row", flush=True)
            reorder = run_reorder(work)
        from benchmarks.batch import run_batch

        batch = {} if args.skip_big else run_batch(args.scenarios, work, args.rows_big, args.reps)
        from benchmarks.reuse_bench import run_cache, run_edits

        edits = cache = None
        if "i" in args.scenarios:
            print("scenario i: an edited input sends only the changed rows", flush=True)
            edits = run_edits(work)
        if "j" in args.scenarios:
            store_rows = min(args.store_rows, 1_000_000) if args.skip_big else args.store_rows
            print(
                f"scenario j: 200,000 rows from --cache ({store_rows:,}-result store)", flush=True
            )
            cache = run_cache(work, store_rows)
    tables = []
    for sc in scenarios:
        table = summarize(sc)
        for row in table:
            if avail.get(row["client"]):
                row["unavailable"] = avail[row["client"]]
        tables.append({**asdict(sc), "table": table})
    small = next((s for s in tables if s["key"] == "c1"), None)
    big = next((s for s in tables if s["key"] == "c2"), None)
    if small and big and "peak_rss_mb" in big["table"][0] and "peak_rss_mb" in small["table"][0]:
        ratio = big["table"][0]["peak_rss_mb"] / small["table"][0]["peak_rss_mb"]
        big["table"][0]["note"] = f"RSS {ratio:.2f}x that of {small['rows']:,} rows"
        big["rss_ratio_big_to_small"] = ratio
    if source_fingerprint() != source:
        machine["warning"] = "batchrun's source changed while the benchmark ran"
    report = {
        "machine": machine,
        "reps": args.reps,
        "smoke": args.smoke,
        "scenarios": tables,
        "resume": resume,
        "export": exported,
        "reorder": reorder,
        "limits": limits,
        "batch": batch,
        "reuse": {"edits": edits, "cache": cache},
        "floor": floor,
    }
    markdown = render(report)
    print("\n" + markdown)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = "smoke" if args.smoke else "latest"
    (args.out_dir / f"{stem}.md").write_text(markdown)
    (args.out_dir / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out_dir / stem}.md and .json")
    # A failed peer shows in the table; a failed batchrun or bare run fails the harness.
    failed = [r for sc in scenarios for r in sc.runs if not r.ok and r.client in CLIENTS[:2]]
    missed = [key for key, r in limits.items() if not r.get("ok", True)]
    if batch and not batch["ok"]:
        missed.append("h")
    verdicts = (("i", edits), ("j", cache), ("k", reorder))
    missed += [key for key, r in verdicts if r is not None and not r["ok"]]
    if "n" in floor and (floor["n"]["ratio"] > 2.5 or floor["n"]["errors"]):
        missed.append("n")
    if "o" in floor and floor["o"] >= 0.150:
        missed.append("o")
    if missed:
        print(f"scenarios that missed their targets: {', '.join(missed)}")
    return 1 if failed or missed else 0


if __name__ == "__main__":
    sys.exit(main())
