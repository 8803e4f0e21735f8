"""--reorder-bytes: results behind a slow row wait in the journal past the
bound, are read back in their turn, survive compaction and a SIGKILL."""

from __future__ import annotations

import gc
import platform
import sys
from pathlib import Path

import pytest

from batchrun import ordered
from batchrun.heap import GC_YOUNG_THRESHOLD, pin_mmap_threshold, space_out_collections
from batchrun.holding import Held
from batchrun.journal import Journal
from batchrun.mock.server import MockServer
from batchrun.ordered import OrderedWriter
from batchrun.records import Outcome, Request
from batchrun.rowsource import Finished
from batchrun.runner import Clock, run_async
from batchrun.sender import RowSender
from tests.conftest import chat, make_config, read_jsonl, write_jsonl
from tests.test_resume import clean_output, command, resume_to_end, start_cli, wait_for

SPILLED = "results waited in the journal (--reorder-bytes)"
PEAK = "most result bytes waiting in memory"


def record(line: int, size: int = 10) -> bytes:
    return b'{"line":%d,"pad":"%s"}\n' % (line, b"x" * size)


def test_results_past_the_limit_wait_in_the_journal_and_follow_compaction(
    tmp_path: Path,
) -> None:
    journal = Journal(tmp_path / "journal")
    journal.open()
    held = Held(journal, limit=100, results={})
    places = {}
    for line in range(2, 8):  # row 1 is unfinished: all of these wait
        data = record(line, 30)
        places[line] = journal.record(data)
        held.add(line, data)
    kept = [held.keep(line, record(line, 30), places[line]) for line in range(2, 8)]

    assert kept == [True, True, False, False, False, False]  # two 50-byte records fit in 100
    assert held.bytes == 2 * len(record(2, 30)) <= held.limit
    assert held.spilled == 4
    held.compact([b'{"b":1}\n'])  # offsets move: the spilled ones must follow
    assert journal.path.read_bytes().startswith(b'{"b":1}\n' + record(2, 30))
    assert [held.get(line) for line in range(2, 8)] == [record(n, 30) for n in range(2, 8)]
    held.done(2, kept=len(record(2, 30)))
    held.done(5, kept=0)
    assert held.bytes == len(record(3, 30))
    assert held.get(5) is None
    assert held.get(6) == record(6, 30)
    journal.close()


def test_a_result_not_in_the_journal_waits_aside_past_the_limit(tmp_path: Path) -> None:
    # A reused answer, an identical row's, a row kept by --retry-failed: the
    # journal does not hold them, and past the limit they wait in a scratch file.
    journal = Journal(tmp_path / "journal")
    journal.open()
    held = Held(journal, limit=len(record(2)), results={})

    assert held.keep(2, record(2), journal_at=None)  # fits: in memory
    assert not held.keep(3, record(3, 50), journal_at=None)
    assert not held.keep(4, record(4, 70), journal_at=None)
    assert held.bytes == len(record(2))
    assert (held.get(3), held.get(4)) == (record(3, 50), record(4, 70))
    held.done(3, kept=0)
    held.done(4, kept=0)
    assert held.get(4) is None
    assert not held.keep(5, record(5, 5), journal_at=None)  # the scratch file starts over
    assert held.get(5) == record(5, 5)
    held.close()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["journal"]
    journal.close()


def large_rows(count: int, size: int, head_delay: float) -> list[dict[str, object]]:
    """A slow head row, then rows with ``size``-character answers."""
    head = chat(f"head mock:delay={head_delay}")
    return [head, *(chat(f"big {i} mock:size={size}") for i in range(count))]


@pytest.mark.asyncio
async def test_a_slow_head_row_holds_at_most_reorder_bytes_in_memory(
    tmp_path: Path, server: MockServer, fake_clock: Clock
) -> None:
    source = write_jsonl(tmp_path / "in.jsonl", large_rows(60, 20_000, head_delay=0.5))
    bounded = make_config(tmp_path, [], server, input=source, reorder_bytes=100_000)
    free = make_config(tmp_path, [], server, input=source, out=tmp_path / "free.jsonl")

    summary = await run_async(bounded, clock=fake_clock)
    await run_async(free, clock=fake_clock)

    assert summary.exit_code == 0
    assert bounded.out.read_bytes() == free.out.read_bytes()
    assert [r["line"] for r in read_jsonl(bounded.out)] == list(range(1, 62))
    assert summary.extra[SPILLED] >= 50  # at most 4 of 60 x 20 kB fit in 100 kB
    assert 0 < summary.extra[PEAK] <= 100_000


@pytest.mark.asyncio
async def test_compaction_moves_results_that_wait_in_the_journal(
    tmp_path: Path, server: MockServer, fake_clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ordered, "CHECKPOINT_EVERY", 3)
    rows = [chat(f"fast {i}") for i in range(5)] + large_rows(40, 5_000, head_delay=0.5)
    config = make_config(tmp_path, rows, server, reorder_bytes=12_000)

    summary = await run_async(config, clock=fake_clock)

    written = read_jsonl(config.out)
    assert [r["line"] for r in written] == list(range(1, 47))
    assert all(r["error"] is None for r in written)
    assert summary.extra[SPILLED] > 20
    assert written[10]["response"]["body"]["choices"][0]["message"]["content"].startswith(
        "echo: big 4 mock:size=5000 pad pad"
    )


@pytest.mark.slow
@pytest.mark.asyncio
async def test_sigkill_while_results_wait_in_the_journal_loses_nothing(
    tmp_path: Path, server: MockServer
) -> None:
    source = write_jsonl(tmp_path / "in.jsonl", large_rows(80, 20_000, head_delay=3))
    out = tmp_path / "out.jsonl"

    process = await start_cli(command(source, out, server, "--reorder-bytes", "60000"))
    await wait_for(lambda: server.stats.statuses[200] >= 60)
    process.kill()
    await process.wait()
    await process.aclose()
    await resume_to_end(source, out, server, tmp_path)

    assert out.read_bytes() == await clean_output(tmp_path, source)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_the_mmap_threshold_can_be_pinned_on_glibc() -> None:
    assert pin_mmap_threshold() is True


def test_collections_are_spaced_out_for_the_command() -> None:
    before = gc.get_threshold()
    try:
        space_out_collections()
        assert gc.get_threshold() == (GC_YOUNG_THRESHOLD, *before[1:])
    finally:
        gc.set_threshold(*before)


@pytest.mark.asyncio
async def test_a_worker_keeps_no_finished_row_while_it_sends_the_next(
    tmp_path: Path, server: MockServer, fake_clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A worker that kept its last result while sending the next row held a
    # record and a parsed answer per worker outside --reorder-bytes: 1 MB per
    # slot for 512 KB answers, 90 MB at 64 in flight.
    delivered: list[Finished] = []
    references: list[int] = []
    deliver, send = OrderedWriter.deliver, RowSender.send

    def deliver_and_note(self: OrderedWriter, item: Finished) -> None:
        delivered.append(item)
        deliver(self, item)

    async def send_and_count(self: RowSender, request: Request) -> Outcome:
        if delivered:  # the one worker wrote its last row: who still has it?
            references.append(sys.getrefcount(delivered[-1]))
        return await send(self, request)

    monkeypatch.setattr(OrderedWriter, "deliver", deliver_and_note)
    monkeypatch.setattr(RowSender, "send", send_and_count)
    rows = [chat(f"row {i}") for i in range(5)]
    config = make_config(tmp_path, rows, server, max_async_requests=1)

    summary = await run_async(config, clock=fake_clock)

    assert summary.exit_code == 0
    assert references == [2] * 4  # the list above and getrefcount's argument: nobody else


@pytest.mark.asyncio
async def test_the_journal_is_compacted_by_bytes_written_not_only_by_rows(
    tmp_path: Path, server: MockServer, fake_clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 40 answers of 20 kB, far fewer rows than CHECKPOINT_EVERY: without a
    # byte bound the journal would keep every written answer (a second copy
    # of the output on disk, parsed again by a resume) until the run ends.
    monkeypatch.setattr(ordered, "CHECKPOINT_BYTES", 100_000, raising=False)
    compactions = []
    rewrite = Journal.rewrite

    def counted(self: Journal, records: object) -> list[int]:
        compactions.append(self.size)
        return rewrite(self, records)

    monkeypatch.setattr(Journal, "rewrite", counted)
    rows = [chat(f"big {i} mock:size=20000") for i in range(40)]
    # Two in flight: at most two results wait in the journal besides the written ones.
    config = make_config(tmp_path, rows, server, max_async_requests=2)

    summary = await run_async(config, clock=fake_clock)

    assert summary.exit_code == 0
    assert [r["line"] for r in read_jsonl(config.out)] == list(range(1, 41))
    assert len(compactions) >= 5  # about one per 100 kB of output
    assert max(compactions) < 100_000 + 4 * 21_000  # the bound, a row over, two waiting


@pytest.mark.asyncio
async def test_reused_answers_behind_a_slow_head_row_hold_at_most_reorder_bytes_in_memory(
    tmp_path: Path, server: MockServer, fake_clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A new pass over an edited input: the head row is new (and slow), the 60
    # rows of 20 kB answers behind it come from the result store. They wait
    # for the head row as a fresh run's answers do, within --reorder-bytes.
    rows = large_rows(60, 20_000, head_delay=0)
    config = make_config(tmp_path, rows, server, reorder_bytes=100_000)
    assert (await run_async(config, clock=fake_clock)).exit_code == 0
    write_jsonl(config.input, [chat("edited head mock:delay=0.5"), *rows[1:]])
    made: list[Held] = []

    class Recorded(Held):
        def __init__(self, journal: Journal, limit: int, results: dict[int, bytes]) -> None:
            super().__init__(journal, limit, results)
            made.append(self)

    monkeypatch.setattr(ordered, "Held", Recorded)

    summary = await run_async(config, clock=fake_clock)

    assert summary.exit_code == 0
    assert summary.reused == 60
    assert [r["line"] for r in read_jsonl(config.out)] == list(range(1, 62))
    assert made[0].peak_bytes <= 100_000


def test_the_scratch_file_stays_bounded_while_results_always_wait_in_it(
    tmp_path: Path,
) -> None:
    # Behind staggered slow rows some result always waits aside: the file
    # must not grow with every result set aside over the run, only with
    # what waits at once.
    journal = Journal(tmp_path / "journal")
    journal.open()
    held = Held(journal, limit=0, results={})
    assert not held.keep(1, record(1, 1000), journal_at=None)
    for line in range(2, 500):
        assert not held.keep(line, record(line, 1000), journal_at=None)
        assert held.get(line - 1) == record(line - 1, 1000)  # in order, once
        held.done(line - 1, kept=0)
    assert held.get(499) == record(499, 1000)
    assert held.aside_bytes <= 4 * len(record(1, 1000))
    held.close()
    journal.close()
