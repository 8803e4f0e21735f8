"""In doubt counts only requests that may have reached the provider: a row is
marked begun just before its request goes to the socket, after its waits at
the rate budget, the adaptive limit and any pause (a real CLI process, killed
for real, against the real mock provider)."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import anyio
import orjson
import pytest

from batchrun.mock.server import MockServer
from tests.conftest import chat, write_jsonl
from tests.redis_server import free_port
from tests.test_resume import command, duplicates, finish, rows, run_cli, start_cli, wait_for

pytestmark = [pytest.mark.asyncio, pytest.mark.slow]


async def status_of(out: Path) -> dict[str, object]:
    status = await run_cli([sys.executable, "-m", "batchrun", "status", str(out), "--json"])
    return dict(orjson.loads(status.stdout))


async def test_rows_waiting_at_the_rate_budget_are_not_in_doubt(
    tmp_path: Path, server: MockServer
) -> None:
    # Answers take 30 s, so every request the server received is in flight.
    source = write_jsonl(tmp_path / "in.jsonl", [chat(f"r{i} mock:delay=30") for i in range(40)])
    out = tmp_path / "out.jsonl"

    process = await start_cli(command(source, out, server, "--rpm", "30"))
    await wait_for(lambda: server.stats.requests >= 2)
    await anyio.sleep(0.5)  # the other 38 rows wait at the budget (one every 2 s)
    process.kill()
    code, _ = await finish(process)

    assert code == -signal.SIGKILL
    received = server.stats.requests
    in_doubt = (await status_of(out))["in_doubt"]
    assert isinstance(in_doubt, int)
    assert received <= in_doubt <= received + 1  # +1: begun, killed before the socket


async def test_after_a_fatal_answer_the_rows_cut_off_in_flight_are_in_doubt(
    tmp_path: Path, server: MockServer
) -> None:
    slow = [chat(f"slow {i} mock:delay=30") for i in range(4)]
    source = write_jsonl(tmp_path / "in.jsonl", [*slow, chat("bad mock:fail=401")])
    out, summary_path = tmp_path / "out.jsonl", tmp_path / "summary.json"

    done = await run_cli(command(source, out, server, "--summary", str(summary_path)))

    assert done.returncode == 3, done.stderr.decode()
    summary = orjson.loads(summary_path.read_bytes())
    assert summary["extra"]["in doubt"] == 4
    assert (await status_of(out))["in_doubt"] == 4
    assert b"in doubt 4" in done.stderr


async def test_rows_waiting_to_retry_after_an_error_answer_are_not_in_doubt(
    tmp_path: Path, server: MockServer
) -> None:
    # Three rows get a 429 asking for 30 s (not billed) and wait out that
    # pause for their retry; one row is in flight for 30 s.
    pushed_back = [chat(f"r{i} mock:fail=429x1 mock:retry_after=30") for i in range(3)]
    source = write_jsonl(tmp_path / "in.jsonl", [*pushed_back, chat("slow mock:delay=30")])
    out = tmp_path / "out.jsonl"

    process = await start_cli(command(source, out, server))
    await wait_for(lambda: server.stats.requests >= 4)
    await anyio.sleep(0.5)  # the 429s are answered and journaled
    process.kill()
    code, _ = await finish(process)

    assert code == -signal.SIGKILL
    assert server.stats.requests == 4  # no retry went out yet
    assert (await status_of(out))["in_doubt"] == 1  # the row in flight only


async def test_a_row_cut_short_then_answered_with_an_error_stays_in_doubt(
    tmp_path: Path,
) -> None:
    # The first attempt's 200 is cut short (the provider did, and billed, the
    # work); the second gets a 503 asking for 30 s (fail_rate 0.8, seed 0:
    # draws 0.84, then 0.76), and the run is killed while the row waits: its
    # resend may be billed twice, so it is in doubt.
    source = write_jsonl(tmp_path / "in.jsonl", [chat("r mock:truncate=1 mock:retry_after=30")])
    out = tmp_path / "out.jsonl"

    async with MockServer(fail_rate=0.8, seed=0) as server:
        process = await start_cli(command(source, out, server))
        await wait_for(lambda: server.stats.requests >= 2)
        await anyio.sleep(0.5)  # the 503 is answered and journaled
        process.kill()
        code, _ = await finish(process)
        assert server.stats.statuses == {0: 1, 503: 1}  # cut short, then the 503

    assert code == -signal.SIGKILL
    assert (await status_of(out))["in_doubt"] == 1


async def test_a_row_reset_then_answered_fatally_stays_in_doubt(
    tmp_path: Path, server: MockServer
) -> None:
    # Its first attempt is reset on a new connection (the provider may have
    # done the work); its retry gets a 401, which stops the run. Un-marking
    # the row for the 401 left a possibly billed request out of "in doubt".
    source = write_jsonl(tmp_path / "in.jsonl", [chat("r mock:reset=1 mock:fail=401")])
    out, summary_path = tmp_path / "out.jsonl", tmp_path / "summary.json"
    fast = ("--backoff-initial", "0.01", "--summary", str(summary_path))

    done = await run_cli(command(source, out, server, *fast))

    assert done.returncode == 3, done.stderr.decode()
    assert server.stats.requests == 2
    assert orjson.loads(summary_path.read_bytes())["extra"]["in doubt"] == 1
    assert (await status_of(out))["in_doubt"] == 1


async def test_rows_waiting_to_retry_after_no_connection_are_not_in_doubt(
    tmp_path: Path,
) -> None:
    # Nothing listens on the port: every attempt is refused before a byte of
    # the request leaves, and the rows wait 30 s for their retry. A row is
    # marked sent only once its connection is made: none is ever marked.
    source = write_jsonl(tmp_path / "in.jsonl", [chat(f"r{i}") for i in range(3)])
    out = tmp_path / "out.jsonl"
    argv = [sys.executable, "-m", "batchrun", "run", str(source), "--out", str(out)]
    argv += ["--provider", "openai", "--base-url", f"http://127.0.0.1:{free_port()}/v1"]
    argv += ["--no-progress", "--backoff-initial", "30", "--backoff-max", "30"]
    state = out.with_name("out.jsonl.batchrun")

    process = await start_cli(argv)
    await wait_for(lambda: (state / "meta.json").exists())  # the run has begun its rows
    await anyio.sleep(2)  # the first attempts are refused at once; the retries wait 30 s
    process.kill()
    code, _ = await finish(process)

    assert code == -signal.SIGKILL
    assert b'{"b":' not in (state / "journal").read_bytes()
    assert (await status_of(out))["in_doubt"] == 0


@pytest.mark.parametrize("cut_off", [False, True])
async def test_rows_in_doubt_stay_counted_when_the_input_changed_before_the_resume(
    tmp_path: Path, server: MockServer, cut_off: bool
) -> None:
    # The killed run leaves rows in flight; the input then gets one more line,
    # so the next run starts a new pass that reuses stored answers by content.
    # ``cut_off``: a run started that pass and died at its first step.
    source = write_jsonl(tmp_path / "in.jsonl", rows(150))
    out, summary_path = tmp_path / "out.jsonl", tmp_path / "summary.json"
    crashed = await run_cli(command(source, out, server), BATCHRUN_CRASH_AT="after_response:40")
    assert crashed.returncode == -signal.SIGKILL
    before = await status_of(out)
    in_doubt, done = before["in_doubt"], before["done"]
    assert isinstance(in_doubt, int)
    assert isinstance(done, int)
    assert in_doubt > 0  # at least the row whose answer came just before the kill
    sent_before = server.stats.requests
    with source.open("ab") as handle:
        handle.write(orjson.dumps(chat("one more row")) + b"\n")
    if cut_off:
        (out.with_name("out.jsonl.batchrun") / "meta.json").unlink()

    rerun = await run_cli(command(source, out, server, "--summary", str(summary_path)))

    assert rerun.returncode == 0, rerun.stderr.decode()
    assert cut_off or b"the input changed" in rerun.stderr
    extra = orjson.loads(summary_path.read_bytes())["extra"]
    assert extra["in doubt"] == in_doubt
    assert extra["in doubt (all runs)"] == in_doubt
    finished = await status_of(out)  # the finished output still says so
    assert (finished["in_doubt"], finished["resent_after_crashes"]) == (0, in_doubt)
    # Every row without a stored answer was sent, the rows in doubt among them:
    # the one answered just before the kill reached the server twice.
    assert server.stats.requests - sent_before == 151 - done
    assert 1 <= duplicates(server) <= in_doubt


@pytest.mark.parametrize("next_pass", ["edited input", "--retry-failed"])
async def test_rows_resent_stay_counted_over_a_new_pass_of_a_finished_output(
    tmp_path: Path, server: MockServer, next_pass: str
) -> None:
    # A killed run, resumed to the end, resent its rows in doubt; a later pass
    # over the finished output (an edited input, or --retry-failed) must keep
    # counting them in "in doubt (all runs)" and in status's "resent".
    source = write_jsonl(tmp_path / "in.jsonl", [*rows(60), chat("bad mock:fail=503")])
    out, summary_path = tmp_path / "out.jsonl", tmp_path / "summary.json"
    fast = ("--max-attempts", "1")
    crashed = await run_cli(
        command(source, out, server, *fast), BATCHRUN_CRASH_AT="after_response:20"
    )
    assert crashed.returncode == -signal.SIGKILL
    in_doubt = (await status_of(out))["in_doubt"]
    assert isinstance(in_doubt, int)
    assert in_doubt > 0
    resumed = await run_cli(command(source, out, server, *fast))
    assert resumed.returncode == 1, resumed.stderr.decode()  # the 503 row failed
    assert (await status_of(out))["resent_after_crashes"] == in_doubt
    extra: tuple[str, ...] = fast
    if next_pass == "edited input":
        with source.open("ab") as handle:
            handle.write(orjson.dumps(chat("one more row")) + b"\n")
    else:
        extra = (*fast, "--retry-failed")

    again = await run_cli(command(source, out, server, *extra, "--summary", str(summary_path)))

    assert again.returncode == 1, again.stderr.decode()
    summary = orjson.loads(summary_path.read_bytes())
    assert summary["extra"]["in doubt (all runs)"] == in_doubt
    assert (await status_of(out))["resent_after_crashes"] == in_doubt
