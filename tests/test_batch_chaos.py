"""Chaos for ``--mode batch``: 4,000 rows over 2 models in parts of 500, the
run SIGKILLed at a dozen random moments (starting, planning, uploading,
creating batches, polling, collecting, writing the output) and resumed each
time. The run that finishes writes what an uninterrupted run writes; no row
is paid twice, none is in two batches running at once, nor in two batches
that did not fail or expire; no part's file is uploaded twice, and no file
is left on the provider. A round ends when a run finishes before its kill;
the next starts afresh on a new mock, until the kills are made."""

from __future__ import annotations

import dataclasses
import itertools
import random
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio
import orjson
import pytest
from anyio.abc import Process

from batchrun.batchmode.plan import line_of_key
from batchrun.mock.batches import BatchFaults, MockFiles
from batchrun.mock.server import MockServer
from tests.conftest import chat, write_jsonl
from tests.test_resume import env

pytestmark = [pytest.mark.asyncio, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
ROWS = 4000
BATCH_ROWS = 500
KILLS = 12
# A batch ends in this many seconds; a whole uninterrupted run takes about 1.5 s.
SECONDS = 0.3


def chaos_rows() -> list[dict[str, Any]]:
    return [chat(f"row {i}", model="m-a" if i % 3 else "m-b") for i in range(ROWS)]


def command(source: Path, out: Path, server: MockServer) -> list[str]:
    return [
        sys.executable, "-m", "batchrun", "run", str(source), "--out", str(out),
        "--provider", "openai", "--base-url", server.base_url, "--mode", "batch",
        "--poll-interval", "0.1", "--batch-rows", str(BATCH_ROWS), "--no-progress",
    ]  # fmt: skip


class Uploads:
    """Every batch input file uploaded to the mock: its name and input lines.
    ``on_upload`` is called once each is kept, before the mock answers."""

    def __init__(self) -> None:
        self.lines: dict[str, set[int]] = {}  # by file id
        self.names: list[str] = []
        self.on_upload: Callable[[], None] = lambda: None

    @contextmanager
    def recorded(self) -> Iterator[None]:
        new_file = MockFiles.new_file

        def record(files: MockFiles, purpose: str, filename: str, data: bytes) -> Any:
            info = new_file(files, purpose, filename, data)
            if purpose == "batch":
                self.names.append(filename)
                keys = (orjson.loads(line)["custom_id"] for line in data.splitlines())
                self.lines[info["id"]] = {line_of_key(key) or 0 for key in keys}
                self.on_upload()
            return info

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(MockFiles, "new_file", record)
            yield


class Batches(dict[str, Any]):
    """The mock's batches, calling ``on_create`` as each is made, before the
    mock answers."""

    def __init__(self, on_create: Callable[[], None]) -> None:
        super().__init__()
        self.on_create = on_create

    def __setitem__(self, key: str, value: Any) -> None:
        super().__setitem__(key, value)
        self.on_create()


class Killer:
    """When to SIGKILL a run: after a random time; after a random number of
    changes in what the mock holds (files uploaded, batches created, files
    deleted), at once or a few milliseconds later; or from inside the mock
    as it keeps the k-th file or batch of the run, before it answers (the
    run never learns its id). So kills land inside the short phases
    (uploading 9 files and creating 9 batches take 70 ms) as well as the
    long ones (starting, planning, polling)."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.landed: list[str] = []  # where each kill landed (see ``landed``)
        self._inside: tuple[str, int, Process] | None = None

    async def wait(self, server: MockServer, process: Process) -> None:
        """Return when ``process`` is to be killed, or kill it from inside."""
        rng, choice = self.rng, self.rng.random()
        if choice < 0.3:
            await anyio.sleep(rng.uniform(0.05, 1.2))
        elif choice < 0.7:
            await _changes(server, rng.randint(1, 16))
            await anyio.sleep(rng.choice((0, rng.uniform(0, 0.04))))
        else:
            self._inside = (rng.choice(("upload", "create")), rng.randint(1, 6), process)
            try:
                await anyio.sleep_forever()
            finally:
                self._inside = None

    def saw(self, what: str) -> None:
        """The mock kept a file (``upload``) or made a batch (``create``)."""
        if self._inside is None or self._inside[0] != what:
            return
        what, left, process = self._inside
        self._inside = (what, left - 1, process)
        if left == 1 and process.returncode is None:
            process.send_signal(signal.SIGKILL)


async def _changes(server: MockServer, count: int) -> None:
    """Wait for ``count`` changes in what ``server`` holds."""
    last = _held(server)
    while count > 0:
        await anyio.sleep(0.002)
        now = _held(server)
        count -= now != last
        last = now


def landed(out: Path) -> str:
    """Where a killed run was, from its batch record: its parts' statuses."""
    if out.exists():
        return "published"
    record = out.with_name(out.name + ".batchrun") / "batch" / "state.json"
    try:
        parts = orjson.loads(record.read_bytes())["parts"]
    except (FileNotFoundError, orjson.JSONDecodeError, KeyError):
        return "no record"
    counts = Counter(str(part["status"]) for part in parts)
    return " ".join(f"{status} {n}" for status, n in sorted(counts.items())) or "no part"


def _held(server: MockServer) -> tuple[int, int, int]:
    return server.batches.uploads, server.batches.created, len(server.batches.files)


async def one_run(
    argv: list[str], log: Path, kill: Callable[[Process], Awaitable[None]] | None = None
) -> int:
    """One CLI process, its stderr in ``log``, SIGKILLed once ``kill(process)``
    returns unless it ends first; returns its exit code."""
    with log.open("wb") as stderr:
        process = await anyio.open_process(
            argv, env=env(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=stderr
        )
        async with process:
            if kill is not None:
                async with anyio.create_task_group() as group:

                    async def killer() -> None:
                        await kill(process)
                        group.cancel_scope.cancel()

                    group.start_soon(killer)
                    await process.wait()
                    group.cancel_scope.cancel()
                if process.returncode is None:
                    process.send_signal(signal.SIGKILL)
            with anyio.fail_after(60):
                return await process.wait()


def answers(path: Path) -> list[tuple[int, Any, Any]]:
    """Each output line's input line, answer and error."""
    records = (orjson.loads(line) for line in path.read_bytes().splitlines())
    return [(r["line"], r["response"], r["error"]) for r in records]


def paid_twice(server: MockServer) -> int:
    return sum(count - 1 for count in server.stats.by_digest.values())


def rows_in_two_ended_batches(server: MockServer, uploads: Uploads) -> set[int]:
    """Input lines in the files of two batches neither failed nor expired
    (an expired batch's unfinished rows go into a new one, and so do a
    completed batch's missing rows: see ``BatchFaults.lose_share``)."""
    seen: Counter[int] = Counter()
    for batch in server.batches.batches.values():
        if batch.info["status"] not in ("failed", "expired", "cancelled"):
            seen.update(uploads.lines[batch.info["input_file_id"]])
    return {line for line, count in seen.items() if count > 1}


def rows_in_two_batches_at_once(server: MockServer, uploads: Uploads) -> set[int]:
    """Input lines in the files of two batches that ran at the same time on
    the mock: a row's new batch must wait for the end of its last one."""
    seconds = server.batches.faults.seconds
    spans: dict[int, list[tuple[float, float]]] = {}
    for batch in server.batches.batches.values():
        # A failed batch fails at validation, a tenth of the way in.
        end = batch.created + (seconds / 10 if batch.info["status"] == "failed" else seconds)
        for line in uploads.lines[batch.info["input_file_id"]]:
            spans.setdefault(line, []).append((batch.created, end))
    overlapping = set()
    for line, runs in spans.items():
        runs.sort()
        if any(later[0] < earlier[1] for earlier, later in itertools.pairwise(runs)):
            overlapping.add(line)
    return overlapping


async def clean_answers(tmp_path: Path, source: Path) -> list[tuple[int, Any, Any]]:
    """The answers of one uninterrupted run, on a server of its own."""
    async with MockServer(batch_faults=BatchFaults(seconds=SECONDS)) as server:
        out = tmp_path / "clean.jsonl"
        code = await one_run(command(source, out, server), tmp_path / "clean.log")
        assert code == 0, (tmp_path / "clean.log").read_text()
    return answers(out)


async def chaos_round(
    source: Path, folder: Path, killer: Killer, kills: int, faults: BatchFaults
) -> tuple[Path, int, int]:
    """Runs of one output on a fresh mock, killed up to ``kills`` times, then
    one left to finish; the output, the kills made and the rows paid. A run
    that finishes before its kill ends the round. Asserts what must hold at
    its end."""
    await anyio.Path(folder).mkdir()
    out, uploads = folder / "out.jsonl", Uploads()
    uploads.on_upload = lambda: killer.saw("upload")
    with uploads.recorded():
        async with MockServer(batch_faults=faults) as server:
            server.batches.batches = Batches(lambda: killer.saw("create"))
            made = 0
            for index in range(kills):
                log = folder / f"run-{index}.log"
                argv = command(source, out, server)
                code = await one_run(argv, log, lambda process: killer.wait(server, process))
                assert "Traceback" not in log.read_text(), log.read_text()
                if code != -signal.SIGKILL:  # it ended before its kill
                    assert code == 0, log.read_text()
                    break
                made += 1
                killer.landed.append(landed(out))
            log = folder / "final.log"
            assert await one_run(command(source, out, server), log) == 0, log.read_text()
            assert paid_twice(server) == 0
            paid = server.stats.batch_rows
            assert rows_in_two_batches_at_once(server, uploads) == set()
            if not faults.lose_share:
                assert rows_in_two_ended_batches(server, uploads) == set()
            assert [name for name, n in Counter(uploads.names).items() if n > 1] == []
            assert server.batches.files == {}
    return out, made, paid


async def chaos(tmp_path: Path, faults: BatchFaults, seed: int) -> list[str]:
    """Rounds of killed runs (see ``chaos_round``) until ``KILLS`` kills are
    made, each round's output checked against an uninterrupted run's; where
    the kills landed."""
    source = write_jsonl(tmp_path / "in.jsonl", chaos_rows())
    expected = await clean_answers(tmp_path, source)
    assert [line for line, _, _ in expected] == list(range(1, ROWS + 1))
    killer, kills = Killer(seed), 0
    for index in range(KILLS):  # bounded: a round that kills no run would loop
        folder, faults_now = tmp_path / f"round-{index}", dataclasses.replace(faults)
        out, made, paid = await chaos_round(source, folder, killer, KILLS - kills, faults_now)
        assert answers(out) == expected
        assert paid == ROWS  # every row once
        kills += made
        if kills >= KILLS:
            return killer.landed
    raise AssertionError(f"only {kills} kills made: {killer.landed}")


@pytest.mark.timeout(120)
async def test_batch_mode_survives_a_dozen_kills(tmp_path: Path) -> None:
    landed = await chaos(tmp_path, BatchFaults(seconds=SECONDS), seed=2026)
    print("kills landed:", *landed, sep="\n  ")


@pytest.mark.timeout(120)
async def test_batch_mode_survives_kills_among_provider_faults(tmp_path: Path) -> None:
    # Batches that expire half done or hit the enqueued-token limit, and
    # uploads and creates whose answers a gateway loses, between the kills.
    faults = BatchFaults(
        seconds=SECONDS, expire_first=2, token_limit_first=1, lost_creates=2, lost_uploads=2
    )
    landed = await chaos(tmp_path, faults, seed=7)
    print("kills landed:", *landed, sep="\n  ")
