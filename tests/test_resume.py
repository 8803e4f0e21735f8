"""Resume for real: subprocess runs killed with SIGKILL or stopped by signals,
resumed, and compared with a clean run. The mock server runs in this test's
event loop and counts every request it receives."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import orjson
import pytest
from anyio.abc import Process

from batchrun.mock.server import MockServer
from batchrun.state import StateDir
from tests.conftest import chat, read_jsonl, write_jsonl

pytestmark = pytest.mark.asyncio
ROOT = Path(__file__).resolve().parents[1]
MAX_ASYNC = 8


def rows(count: int, seed: int = 1, slowest: float = 0.03) -> list[dict[str, Any]]:
    """Distinct rows whose delays scramble the completion order."""
    rng = random.Random(seed)
    return [chat(f"row {i} mock:delay={rng.uniform(0, slowest):.3f}") for i in range(count)]


def command(source: Path, out: Path, server: MockServer, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "batchrun",
        "run",
        str(source),
        "--out",
        str(out),
        "--provider",
        "openai",
        "--base-url",
        server.base_url,
        "--max-async-requests",
        str(MAX_ASYNC),
        "--no-progress",
        *extra,
    ]


def env(**extra: str) -> dict[str, str]:
    return {**os.environ, "OPENAI_API_KEY": "sk-test", **extra}


async def run_cli(argv: list[str], **extra_env: str) -> subprocess.CompletedProcess[bytes]:
    with anyio.fail_after(60):
        return await anyio.run_process(argv, env=env(**extra_env), cwd=ROOT, check=False)


async def start_cli(argv: list[str], **extra_env: str) -> Process:
    return await anyio.open_process(
        argv, env=env(**extra_env), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )


async def finish(process: Process) -> tuple[int, str]:
    """Wait for ``process`` (bounded) and return its exit code and stderr."""
    assert process.stderr is not None
    with anyio.fail_after(30):
        chunks = [chunk async for chunk in process.stderr]
        code = await process.wait()
    await process.aclose()
    return code, b"".join(chunks).decode()


async def wait_for(condition: Any, limit: float = 20) -> None:
    """Wait, bounded, for a condition on another process's state (no event to await)."""
    with anyio.fail_after(limit):
        while not condition():  # noqa: ASYNC110 - the state lives in another process
            await anyio.sleep(0.01)


def duplicates(server: MockServer) -> int:
    return sum(count - 1 for count in server.stats.by_digest.values())


async def clean_output(tmp_path: Path, source: Path) -> bytes:
    """The output of one uninterrupted run, on a server of its own."""
    async with MockServer() as other:
        out = tmp_path / "clean.jsonl"
        done = await run_cli(command(source, out, other))
        assert done.returncode == 0, done.stderr.decode()
        return out.read_bytes()


async def resume_to_end(
    source: Path, out: Path, server: MockServer, tmp_path: Path
) -> dict[str, Any]:
    summary_path = tmp_path / "summary.json"
    done = await run_cli(command(source, out, server, "--summary", str(summary_path)))
    assert done.returncode == 0, done.stderr.decode()
    assert b"Unclosed" not in done.stderr
    return dict(orjson.loads(summary_path.read_bytes()))


@pytest.mark.slow
async def test_sigkill_at_random_instants_loses_nothing_and_repeats_little(
    tmp_path: Path, server: MockServer
) -> None:
    # Enough rows that no run finishes between two kills (each run sends for
    # at most 0.6 s; the whole input takes about 2 s of sending).
    source = write_jsonl(tmp_path / "in.jsonl", rows(1200))
    out = tmp_path / "out.jsonl"
    rng = random.Random(2026)
    kills = 0
    for _ in range(8):
        process = await start_cli(command(source, out, server))
        await anyio.sleep(rng.uniform(0.15, 0.6))
        if process.returncode is not None:
            break
        process.kill()
        code, _ = await finish(process)
        kills += code == -signal.SIGKILL
        assert not out.exists() or StateDir(out).read_finished() is not None
    summary = await resume_to_end(source, out, server, tmp_path)

    assert out.read_bytes() == await clean_output(tmp_path, source)
    assert kills >= 3
    in_doubt = summary["extra"]["in doubt (all runs)"]
    assert duplicates(server) <= in_doubt <= kills * MAX_ASYNC


@pytest.mark.slow
@pytest.mark.parametrize(
    "point", ["after_response:40", "journal_torn:50", "output_torn:60", "before_publish"]
)
async def test_sigkill_at_critical_points(tmp_path: Path, server: MockServer, point: str) -> None:
    source = write_jsonl(tmp_path / "in.jsonl", rows(150))
    out = tmp_path / "out.jsonl"

    crashed = await run_cli(command(source, out, server), BATCHRUN_CRASH_AT=point)
    assert crashed.returncode == -signal.SIGKILL
    assert not out.exists()  # nothing half-done is ever visible at OUT
    summary = await resume_to_end(source, out, server, tmp_path)

    assert out.read_bytes() == await clean_output(tmp_path, source)
    if point == "before_publish":  # all was done: the re-run only publishes
        assert summary["extra"]["requests sent"] == 0
        assert duplicates(server) == 0
    else:
        assert duplicates(server) <= summary["extra"]["in doubt (all runs)"] <= MAX_ASYNC


@pytest.mark.slow
async def test_a_kill_between_checkpoint_and_compaction_keeps_the_in_doubt_count(
    tmp_path: Path, server: MockServer
) -> None:
    source = write_jsonl(tmp_path / "in.jsonl", rows(150))
    out = tmp_path / "out.jsonl"
    first = await run_cli(command(source, out, server), BATCHRUN_CRASH_AT="after_response:40")
    assert first.returncode == -signal.SIGKILL
    # The resume's first checkpoint (at its start) moves the first run's
    # in-doubt rows from the journal into the checkpoint; it dies right there.
    second = await run_cli(
        command(source, out, server), BATCHRUN_CRASH_AT="between_checkpoint_and_compaction"
    )
    assert second.returncode == -signal.SIGKILL
    summary = await resume_to_end(source, out, server, tmp_path)

    assert duplicates(server) >= 1
    assert duplicates(server) <= summary["extra"]["in doubt (all runs)"] <= 2 * MAX_ASYNC
    assert out.read_bytes() == await clean_output(tmp_path, source)


@pytest.mark.slow
async def test_sigterm_stops_gracefully_and_resumes(tmp_path: Path, server: MockServer) -> None:
    source = write_jsonl(tmp_path / "in.jsonl", rows(400, slowest=0.1))
    out = tmp_path / "out.jsonl"

    process = await start_cli(command(source, out, server, "--grace", "2"))
    await wait_for(lambda: server.stats.requests >= 40)
    process.send_signal(signal.SIGTERM)
    code, stderr = await finish(process)

    assert code == 75, stderr
    assert "interrupted by SIGTERM" in stderr
    assert "Unclosed" not in stderr
    assert not out.exists()
    status = await run_cli([sys.executable, "-m", "batchrun", "status", str(out), "--json"])
    report = orjson.loads(status.stdout)
    assert report["state"] == "unfinished"
    assert not report["running"]
    assert report["in_doubt"] == 0  # the grace period let in-flight rows finish
    assert 0 < report["done"] < 400
    summary = await resume_to_end(source, out, server, tmp_path)
    assert duplicates(server) == 0
    assert summary["extra"]["in doubt (all runs)"] == 0
    assert out.read_bytes() == await clean_output(tmp_path, source)


@pytest.mark.slow
async def test_sigterm_during_a_retry_pause_stops_without_waiting_out_the_grace(
    tmp_path: Path, server: MockServer
) -> None:
    # Row 2 is refused with "Retry-After: 20": once row 1 is answered, no row
    # is in flight, and nothing that the grace period could finish is left.
    source = write_jsonl(
        tmp_path / "in.jsonl", [chat("a"), chat("b mock:fail=429x1 mock:retry_after=20")]
    )
    out = tmp_path / "out.jsonl"
    stopped = tmp_path / "stopped.json"
    process = await start_cli(
        command(source, out, server, "--grace", "30", "--summary", str(stopped))
    )
    await wait_for(lambda: server.stats.requests >= 2 and server.stats.in_flight == 0)
    await anyio.sleep(0.2)  # the 429 is read and the pause begun
    process.send_signal(signal.SIGTERM)
    with anyio.fail_after(5):  # far less than the grace or the pause
        code, stderr = await finish(process)

    assert code == 75, stderr
    extra = orjson.loads(stopped.read_bytes())["extra"]
    assert extra["in doubt"] == 0  # a refused request was not paid
    sent_before = server.stats.requests
    summary = await resume_to_end(source, out, server, tmp_path)
    assert server.stats.requests == sent_before + 1  # only row 2, once
    assert summary["extra"]["in doubt (all runs)"] == 0
    assert [r["line"] for r in read_jsonl(out)] == [1, 2]


@pytest.mark.slow
async def test_a_second_sigterm_stops_at_once_and_counts_in_doubt(
    tmp_path: Path, server: MockServer
) -> None:
    source = write_jsonl(tmp_path / "in.jsonl", [chat(f"slow {i} mock:delay=3") for i in range(20)])
    out = tmp_path / "out.jsonl"

    stopped = tmp_path / "stopped.json"
    process = await start_cli(
        command(source, out, server, "--grace", "30", "--summary", str(stopped))
    )
    await wait_for(lambda: server.stats.in_flight == MAX_ASYNC)
    process.send_signal(signal.SIGTERM)
    await anyio.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    with anyio.fail_after(2.5):  # far less than the grace or the answers' delay
        code, stderr = await finish(process)

    assert code == 75, stderr
    extra = orjson.loads(stopped.read_bytes())["extra"]
    assert extra["in doubt"] == extra["in doubt (all runs)"] == MAX_ASYNC  # cut off by this run
    status = await run_cli([sys.executable, "-m", "batchrun", "status", str(out), "--json"])
    assert orjson.loads(status.stdout)["in_doubt"] == MAX_ASYNC
    summary = await resume_to_end(source, out, server, tmp_path)
    assert summary["extra"]["in doubt"] == MAX_ASYNC
    assert [r["line"] for r in read_jsonl(out)] == list(range(1, 21))


@pytest.mark.slow
async def test_a_second_run_on_the_same_output_exits_4_and_writes_nothing(
    tmp_path: Path, server: MockServer
) -> None:
    # Two seconds of rows at the default 32 in flight: the second run starts
    # (about a second on a busy machine) while the first still holds the lock.
    source = write_jsonl(tmp_path / "in.jsonl", [chat(f"r{i} mock:delay=1") for i in range(60)])
    out = tmp_path / "out.jsonl"
    first = await start_cli(command(source, out, server))
    await wait_for(lambda: StateDir(out).is_locked())
    holder = StateDir(out).holder()

    second = await run_cli(command(source, out, server))

    assert second.returncode == 4
    assert b"another run holds" in second.stderr
    assert holder is not None
    assert f"pid {first.pid}" in holder
    assert holder.encode() in second.stderr
    assert StateDir(out).holder() == holder
    code, stderr = await finish(first)
    assert code == 0, stderr
    assert duplicates(server) == 0  # the second run sent none of the rows
    assert [r["line"] for r in read_jsonl(out)] == list(range(1, 61))


async def test_a_finished_run_is_a_no_op_with_its_exit_code(
    tmp_path: Path, server: MockServer
) -> None:
    source = write_jsonl(tmp_path / "in.jsonl", [chat("fine"), chat("bad mock:fail=400")])
    out = tmp_path / "out.jsonl"
    first = await run_cli(command(source, out, server))
    assert first.returncode == 1
    sent, content = server.stats.requests, out.read_bytes()

    summary_path = tmp_path / "summary.json"
    again = await run_cli(command(source, out, server, "--summary", str(summary_path)))

    assert again.returncode == 1
    assert server.stats.requests == sent
    assert out.read_bytes() == content
    assert b"already finished" in again.stderr
    extra = orjson.loads(summary_path.read_bytes())["extra"]
    assert (extra["in doubt"], extra["in doubt (all runs)"]) == (0, 0)


async def test_a_changed_input_resumes_by_content_not_position(
    tmp_path: Path, server: MockServer
) -> None:
    source = write_jsonl(tmp_path / "in.jsonl", [chat("a"), chat("b unknown mock:fail=401")])
    out = tmp_path / "out.jsonl"
    # One row at a time: row a is answered before row b's fatal answer stops
    # the run (sent together, a could still be in flight then, and be resent).
    aborted = await run_cli([*command(source, out, server), "--max-async-requests", "1"])
    assert aborted.returncode == 3  # leaves a resumable state behind
    sent = server.stats.requests
    write_jsonl(source, [chat("a"), chat("b fixed")])

    resumed = await run_cli(command(source, out, server))

    assert resumed.returncode == 0, resumed.stderr.decode()
    assert server.stats.requests - sent == 1  # row a's answer is reused
    records = read_jsonl(out)
    assert records[0]["reused"] is True
    assert records[1]["response"]["body"]["choices"][0]["message"]["content"] == "echo: b fixed"
    restarted = await run_cli(command(source, out, server, "--restart"))
    assert restarted.returncode == 0
    assert server.stats.requests - sent == 3  # --restart pays for both again


async def test_changed_request_settings_are_new_requests(
    tmp_path: Path, server: MockServer
) -> None:
    source = write_jsonl(tmp_path / "in.jsonl", [chat("a"), chat("b")])
    out = tmp_path / "out.jsonl"
    assert (await run_cli(command(source, out, server))).returncode == 0

    other = await run_cli(command(source, out, server, "--model", "other"))

    assert other.returncode == 0
    assert server.stats.requests == 4
    assert {r["response"]["body"]["model"] for r in read_jsonl(out)} == {"other"}


async def test_retry_failed_resends_only_retryable_rows_in_place(
    tmp_path: Path, server: MockServer
) -> None:
    source = write_jsonl(
        tmp_path / "in.jsonl",
        [chat("a"), chat("b mock:fail=500x2"), chat("c mock:fail=400"), chat("d")],
    )
    out = tmp_path / "out.jsonl"
    first = await run_cli(command(source, out, server, "--max-attempts", "1"))
    assert first.returncode == 1
    before = read_jsonl(out)
    assert before[1]["error"]["retryable"]
    assert not before[2]["error"]["retryable"]
    sent = server.stats.requests

    retried = await run_cli(command(source, out, server, "--retry-failed", "--max-attempts", "3"))

    assert retried.returncode == 1, retried.stderr.decode()  # row c still failed
    after = read_jsonl(out)
    assert server.stats.requests - sent == 2  # row b's second and third attempts only
    assert after[1]["error"] is None
    assert after[1]["response"]["status_code"] == 200
    assert after[0] == before[0]
    assert after[2] == before[2]
    assert after[3] == before[3]
    assert [r["line"] for r in after] == [1, 2, 3, 4]


async def test_resume_seeks_past_the_checkpoint_without_parsing_it(
    tmp_path: Path, server: MockServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    from batchrun import ordered, records, rowsource
    from batchrun.jobfile import build_config
    from batchrun.runner import run_async

    monkeypatch.setattr(ordered, "CHECKPOINT_EVERY", 10)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    lines = [chat(f"r{i}") for i in range(100)]
    lines[60] = chat("r60 mock:fail=401")  # aborts the first run around row 60
    source = write_jsonl(tmp_path / "in.jsonl", lines)
    settings = {
        "input": source,
        "out": tmp_path / "out.jsonl",
        "provider": "openai",
        "base_url": server.base_url,
        "progress": False,
        "max_async_requests": 1,
    }
    first = await run_async(build_config(settings))
    assert first.exit_code == 3
    parsed: list[int] = []
    real_parse = records.parse_line

    def counting_parse(raw: bytes, line: int, defaults: records.Defaults) -> object:
        parsed.append(line)
        return real_parse(raw, line, defaults)

    monkeypatch.setattr(rowsource, "parse_line", counting_parse)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    # The fatal row stays fatal: the resume aborts there again, having parsed nothing before it.
    second = await run_async(build_config(settings))

    assert second.exit_code == 3
    assert parsed
    assert min(parsed) == 61


def without_reuse_mark(record: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in record.items() if key != "reused"}


@pytest.mark.slow
@pytest.mark.parametrize("cut", ["100 bytes", "5000 bytes", "all", "last byte"])
async def test_a_torn_output_starts_over_from_the_store_without_paying_again(
    tmp_path: Path, server: MockServer, cut: str
) -> None:
    source = write_jsonl(tmp_path / "in.jsonl", rows(300, slowest=0.05))
    out = tmp_path / "out.jsonl"
    process = await start_cli(command(source, out, server))
    await wait_for(lambda: server.stats.requests >= 150)
    process.send_signal(signal.SIGINT)
    code, stderr = await finish(process)
    assert code == 75, stderr
    state = StateDir(out)
    checkpoint = state.read_checkpoint()
    assert checkpoint.output_bytes > 5_000  # every cut reaches into the checkpointed rows
    # What a power loss with --fsync off, or a damaged disk, leaves behind.
    with state.partial_path.open("r+b") as partial:
        if cut == "last byte":
            partial.seek(checkpoint.output_bytes - 1)
            partial.write(b"x")
        else:
            partial.truncate(0 if cut == "all" else checkpoint.output_bytes - int(cut.split()[0]))
    answered = server.stats.requests

    done = await run_cli(command(source, out, server, "--summary", str(tmp_path / "s.json")))

    assert done.returncode == 0, done.stderr.decode()
    records = [orjson.loads(line) for line in out.read_bytes().splitlines()]
    clean = [orjson.loads(line) for line in (await clean_output(tmp_path, source)).splitlines()]
    assert [without_reuse_mark(r) for r in records] == [without_reuse_mark(r) for r in clean]
    assert duplicates(server) == 0  # no answered row was sent again
    assert server.stats.requests == 300  # every row once, over both runs
    assert sum(bool(r.get("reused")) for r in records) == answered
    assert b"starting the output over from row 0" in done.stderr
    assert b"Traceback" not in done.stderr


@pytest.mark.slow
@pytest.mark.parametrize(
    "point", ["locked", "locked:1:SIGTERM", "request", "request:1:SIGTERM", "request:5"]
)
async def test_a_signal_as_the_run_starts_stops_it_resumably(
    tmp_path: Path, server: MockServer, point: str
) -> None:
    source = write_jsonl(tmp_path / "in.jsonl", rows(100, slowest=0.1))
    out = tmp_path / "out.jsonl"

    stopped = await run_cli(command(source, out, server), BATCHRUN_SIGNAL_AT=point)

    stderr = stopped.stderr.decode()
    assert stopped.returncode == 75, stderr
    assert "Traceback" not in stderr
    signal_name = point.split(":")[2] if point.count(":") == 2 else "SIGINT"
    assert f"interrupted by {signal_name}" in stderr
    status = await run_cli([sys.executable, "-m", "batchrun", "status", str(out), "--json"])
    assert orjson.loads(status.stdout)["in_doubt"] == 0  # the rows in flight had their grace
    await resume_to_end(source, out, server, tmp_path)
    assert duplicates(server) == 0
    assert out.read_bytes() == await clean_output(tmp_path, source)


@pytest.mark.slow
async def test_a_resume_keeps_no_copy_of_the_journals_written_results(
    tmp_path: Path, server: MockServer
) -> None:
    # A kill leaves a journal of about 45 MB of answers, nearly all of them
    # already in the ordered output. Resuming salvages them into the store and
    # must not hold them in memory: the README allows at most the results of
    # rows after the ordered prefix (one reorder window).
    import tracemalloc

    from batchrun.providers import get_provider
    from batchrun.reuse import open_answers
    from batchrun.runner import prepare
    from tests.conftest import make_config

    source = write_jsonl(
        tmp_path / "in.jsonl", [chat(f"row {i} mock:size=500000") for i in range(100)]
    )
    out = tmp_path / "out.jsonl"
    crashed = await run_cli(command(source, out, server), BATCHRUN_CRASH_AT="after_response:90")
    assert crashed.returncode == -signal.SIGKILL
    state = StateDir(out)
    journal_bytes = state.journal_path.stat().st_size
    assert journal_bytes > 40_000_000
    config = make_config(tmp_path, [], server, input=source, out=out, provider="openai")
    answers = open_answers(state.root, None, resend_retryable=False)
    try:
        tracemalloc.start()
        try:
            _, start = prepare(state, config, get_provider("openai"), answers)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    finally:
        answers.close()

    assert start.checkpoint.rows > 60  # most rows were written before the kill
    assert start.journal.keyed == []
    waiting = sum(map(len, start.journal.results.values()))
    assert waiting <= MAX_ASYNC * 600_000
    assert peak < waiting + 12_000_000, (peak, journal_bytes)


async def test_a_retry_pass_resumed_without_the_flag_still_resends_its_failed_rows(
    tmp_path: Path, server: MockServer
) -> None:
    # A scheduler reruns the plain command after a stopped --retry-failed
    # pass: the pass goes on, and its failed rows are sent, not reused as failed.
    rows = [chat("a"), chat("b mock:fail=500x1"), chat("c"), chat("d mock:fail=500x1")]
    source, out = write_jsonl(tmp_path / "in.jsonl", rows), tmp_path / "out.jsonl"
    plain = command(source, out, server, "--max-attempts", "1", "--max-async-requests", "1")
    assert (await run_cli(plain)).returncode == 1
    stopped = await run_cli([*plain, "--retry-failed"], BATCHRUN_SIGNAL_AT="request:1")
    assert stopped.returncode == 75, stopped.stderr.decode()
    resumed = await run_cli(plain)
    assert resumed.returncode == 0, resumed.stderr.decode()
    assert [r["error"] for r in read_jsonl(out)] == [None] * 4


@pytest.mark.slow
@pytest.mark.parametrize("stop", ["SIGINT", "SIGKILL"])
async def test_a_resumed_retry_pass_does_not_count_the_kept_rows_against_max_cost(
    tmp_path: Path, server: MockServer, stop: str
) -> None:
    # A --retry-failed pass starts its own count under --max-cost: the rows it
    # keeps from the finished output were paid by the pass before it, so a
    # resume of the pass must not count them as spent (it would exit 5
    # without sending anything). Each answer costs 3 at these prices; row d's
    # worst case is 13, so a cap of 16 leaves room for it, not for 9 more.
    row_d = chat("d mock:fail=500x1 mock:delay=0.5", max_tokens=5)
    kept = [chat(text, max_tokens=5) for text in ("a", "b", "c")]
    source, out = write_jsonl(tmp_path / "in.jsonl", [*kept, row_d]), tmp_path / "out.jsonl"
    prices = ("--price-input-per-million", "1000000", "--price-output-per-million", "1000000")
    plain = command(
        source, out, server, "--max-attempts", "1", "--max-async-requests", "1", *prices
    )
    assert (await run_cli(plain)).returncode == 1  # row d failed, retryable
    crash = (
        {"BATCHRUN_SIGNAL_AT": "request:1"}
        if stop == "SIGINT"
        else {"BATCHRUN_CRASH_AT": "after_response:1"}
    )
    stopped = await run_cli([*plain, "--retry-failed"], **crash)
    assert stopped.returncode == (75 if stop == "SIGINT" else -signal.SIGKILL)
    assert (out.with_name("out.jsonl.batchrun") / "output.partial").read_bytes().count(b"\n") == 3

    resumed = await run_cli([*plain, "--retry-failed", "--max-cost", "16"])

    assert resumed.returncode == 0, resumed.stderr.decode()
    assert [r["error"] for r in read_jsonl(out)] == [None] * 4


async def test_a_resumed_retry_pass_whose_finished_output_is_gone_stops_with_a_message(
    tmp_path: Path, server: MockServer
) -> None:
    # The pass keeps the rows it does not resend from OUT: gone, the resume
    # names it (exit 2) instead of failing with an internal error's traceback.
    rows_ = [chat("a"), chat("b mock:fail=500x1")]
    source, out = write_jsonl(tmp_path / "in.jsonl", rows_), tmp_path / "out.jsonl"
    plain = command(source, out, server, "--max-attempts", "1", "--max-async-requests", "1")
    assert (await run_cli(plain)).returncode == 1  # row b failed, retryable
    stopped = await run_cli([*plain, "--retry-failed"], BATCHRUN_SIGNAL_AT="request:1")
    assert stopped.returncode == 75
    out.rename(tmp_path / "moved.jsonl")

    resumed = await run_cli([*plain, "--retry-failed"])

    stderr = resumed.stderr.decode()
    assert resumed.returncode == 2, stderr
    assert "Traceback" not in stderr
    assert f"{out} is missing" in stderr
    (tmp_path / "moved.jsonl").rename(out)
    assert (await run_cli([*plain, "--retry-failed"])).returncode == 0
    assert [r["error"] for r in read_jsonl(out)] == [None, None]
