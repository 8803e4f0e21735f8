"""What to do with a batch that ended: its results, its unfinished rows, its files.

* ``completed``, ``expired``, ``cancelled``: the output and error files are
  downloaded and mapped back to input lines; the part's results file is
  written (durably) before the part is marked ``collected``. Rows without a
  result (expired, cancelled, missing from a completed batch) go into a new
  part, or to online mode with ``--fallback online``; no row is ever in two
  live batches, and never in a live batch and online. Each new batch is paid
  again, so a row left unfinished by ``MAX_ROUNDS`` batches is not
  resubmitted: it gets a retryable ``batch_unfinished`` error record (a
  later online ``--retry-failed`` sends it).
* ``failed`` on the enqueued-token limit: the part goes back to ``uploaded``
  (its input file kept) and is tried again later.
* ``failed`` at validation: each line the provider names becomes a row error
  and the other rows go into a new part; with no line named, the run aborts
  quoting the provider.

Provider files are deleted once their part is collected, unless ``keep_files``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import anyio
import orjson

from batchrun.batchmode.api import BatchApi
from batchrun.batchmode.filing import PartFiler
from batchrun.batchmode.plan import line_of_key
from batchrun.batchmode.record import BatchRecord, BatchState, Part
from batchrun.batchmode.results import (
    Reading,
    Records,
    collect,
    invalid_line_record,
)
from batchrun.errors import RequestError
from batchrun.providers import Provider
from batchrun.records import Outcome, output_line
from batchrun.reuse import Answers

log = logging.getLogger("batchrun")

TOKEN_LIMIT = "token_limit_exceeded"
# Batches that may end leaving a row unfinished before it is given up on: a
# provider that keeps dropping rows would otherwise be paid again and again.
MAX_ROUNDS = 3
UNFINISHED = "batch_unfinished"
# Completed batches with no result for any row before the run says the
# provider is at fault.
EMPTY_WARNING = 2
# Batches whose result files are downloaded and mapped at the same time.
COLLECT_AT_ONCE = 1


class BatchRefused(Exception):
    """The provider refused a whole batch file without naming a line."""


class Settler:
    """Collects ended batches into results files and follow-up parts."""

    def __init__(
        self,
        api: BatchApi,
        record: BatchRecord,
        state: BatchState,
        dialect: Provider,
        *,
        keep_files: bool,
        fallback_online: bool,
        answers: Answers | None = None,
        reading: Reading = Reading(),
    ) -> None:
        """``reading``: how answers are read (tokens, the response schema's
        check, the price; see ``results.Reading``)."""
        self.api = api
        self.record = record
        self.state = state
        self.dialect = dialect
        self.keep_files = keep_files
        self.fallback_online = fallback_online
        self.answers = answers
        self.reading = reading
        self._collecting = anyio.CapacityLimiter(COLLECT_AT_ONCE)
        self._empty = 0  # completed batches that brought no result for any row

    async def ended(self, part: Part, batch: dict[str, Any]) -> bool:
        """Handle ``part``'s ended batch; False when it must be tried again
        later (the enqueued-token limit). Raises ``BatchRefused``."""
        errors = _errors(batch)
        if batch.get("status") == "failed":
            if any(error.get("code") == TOKEN_LIMIT for error in errors):
                part.status, part.batch_id = "uploaded", None
                part.tries += 1
                self.record.save(self.state)
                return False
            await self._refused(part, errors)
            return True
        async with self._collecting:
            ids = self.record.read_ids(part.id)
            files = [batch.get("output_file_id"), batch.get("error_file_id")]
            part.result_files = [str(file_id) for file_id in files if file_id]
            downloads = [self.record.file(part.id, f"got{n}") for n in range(len(files))]
            for file_id, path in zip(part.result_files, downloads, strict=False):
                await self.api.download(file_id, path)
            try:
                self._collect(part, ids, downloads[: len(part.result_files)])
            finally:
                for path in downloads:
                    path.unlink(missing_ok=True)
        await self.cleanup(part)
        return True

    def _collect(self, part: Part, ids: dict[int, str], downloads: list[Path]) -> None:
        """Map the downloaded result files to records, store the answers, then
        settle the part (every answer is stored before it is collected)."""
        filer = self._filer(part, ids)
        note = filer.note if filer is not None else None
        spill = self._spill(part)
        found = collect(downloads, ids, self.dialect, spill, note, self.reading)
        if part.batch_status == "completed" and not len(found.records):
            self._completed_empty(part)
        try:
            unfinished = found.unfinished
            if unfinished and not self.fallback_online and part.rounds + 1 >= MAX_ROUNDS:
                _give_up(part, found.records, unfinished, ids, filer)
                unfinished = set()
            if filer is not None:
                filer.file(found.records)
            self._settle(part, found.records, unfinished, ids)
        finally:
            found.records.close()

    async def _refused(self, part: Part, errors: list[dict[str, Any]]) -> None:
        """A validation failure: named lines become row errors, the rest is resubmitted."""
        ids = self.record.read_ids(part.id)
        order = list(ids)
        named = Records(self._spill(part))
        filer = self._filer(part, ids)
        for error in errors:
            number = error.get("line")
            if isinstance(number, int) and 1 <= number <= len(order):
                line = order[number - 1]
                code, message = str(error.get("code") or "invalid_request"), error.get("message")
                record = invalid_line_record(line, ids[line], code, str(message or code))
                _add_error(named, line, record, filer, retryable=False)
        if not len(named):
            named.close()
            text = "; ".join(str(error.get("message") or error.get("code")) for error in errors)
            part.status = "refused"
            part.refusal = (
                f"the provider refused batch {part.batch_id} (part {part.id}):"
                f" {text or 'no reason given'}"
            )
            await self.cleanup(part)  # the file would be refused again: no use kept
            self.record.save(self.state)
            raise BatchRefused(part.refusal)
        try:  # the batch never ran: its other rows are no round further
            if filer is not None:
                filer.file(named)
            self._settle(part, named, set(ids) - named.lines(), ids, ran=False)
        finally:
            named.close()
        await self.cleanup(part)

    def _filer(self, part: Part, ids: dict[int, str]) -> PartFiler | None:
        """Files each answer in the result store under its request's content
        key, so no later run, online or batch, pays for that request again."""
        if self.answers is None:
            return None
        return PartFiler(self.answers, self.record.read_keys(part.id, ids))

    def _spill(self, part: Part) -> Path:
        return self.record.file(part.id, "spill")

    def _settle(
        self,
        part: Part,
        records: Records,
        unfinished: set[int],
        ids: dict[int, str],
        *,
        ran: bool = True,
    ) -> None:
        """Write the results, plan the unfinished rows, then mark the part
        collected. ``ran``: the batch ran (one refused at validation did not),
        so its unfinished rows are one round further (see ``MAX_ROUNDS``)."""
        rounds = part.rounds + ran
        if not records.keep_as(self.record.file(part.id, "results")):
            self.record.write_results(part.id, records.sorted_chunks())
        if unfinished and self.fallback_online and ran:  # one refused never ran: a new part
            part.online = len(unfinished)
        elif unfinished:
            child = self._child(part, unfinished, ids, rounds)
            self.state.parts.append(child)
            log.info(
                "batch %s ended %s with %d rows unfinished: resubmitting them as part %d",
                part.batch_id,
                part.batch_status,
                len(unfinished),
                child.id,
            )
        part.counts = {**part.counts, "settled": len(records)}
        part.status = "collected"
        self.record.save(self.state)

    def _completed_empty(self, part: Part) -> None:
        """Count a completed batch with no result for any row; the second one
        is a provider fault worth one log line."""
        self._empty += 1
        if self._empty == EMPTY_WARNING:
            log.warning(
                "the provider ended %d batches (the last %s) completed with no result for any"
                " row: a provider fault; rows are resubmitted at most %d times",
                self._empty,
                part.batch_id,
                MAX_ROUNDS - 1,
            )

    def _child(self, part: Part, unfinished: set[int], ids: dict[int, str], rounds: int) -> Part:
        """A new part holding ``part``'s ``unfinished`` rows, left so ``rounds`` times."""
        number = max(p.id for p in self.state.parts) + 1
        child = Part(number, part.endpoint, part.model, rows=0, bytes=0, parent=part.id)
        child.rounds = rounds
        lines = _lines_of(self.record.file(part.id, "jsonl").read_bytes().splitlines(True))
        with self.record.file(number, "jsonl").open("wb") as handle:
            for line, raw in lines:
                if line in unfinished:
                    handle.write(raw)
                    child.rows += 1
                    child.bytes += len(raw)
        kept = [line for line in ids if line in unfinished]
        self.record.write_ids(number, ((line, ids[line]) for line in kept))
        keys = self.record.read_keys(part.id, ids)
        self.record.write_keys(number, (keys[line] for line in kept))
        return child

    async def cleanup(self, part: Part) -> None:
        """Delete the part's files on the provider (unless ``keep_files``); the
        part then names only those a deletion failed for (``result_files``),
        which the next run tries again (``BatchJob.run``): DashScope keeps
        at most 10,000 files and never deletes one itself."""
        if self.keep_files:
            return
        left = []
        for file_id in [part.input_file_id, *part.result_files]:
            if file_id:
                try:
                    await self.api.delete(file_id)
                except RequestError:  # a leftover file costs no money: not worth a stop
                    left.append(file_id)
        part.input_file_id, part.result_files = None, left


def _give_up(
    part: Part,
    records: Records,
    unfinished: set[int],
    ids: dict[int, str],
    filer: PartFiler | None,
) -> None:
    """Give each of ``unfinished`` (left so by ``MAX_ROUNDS`` batches) a
    retryable error record instead of a new batch, noted for ``filer``."""
    message = (
        f"{MAX_ROUNDS} batches ended without this row's result (the last, {part.batch_id},"
        f" {part.batch_status}); not resubmitted: send it online with --retry-failed"
    )
    for line in sorted(unfinished):
        record = unfinished_record(line, ids[line], message, MAX_ROUNDS)
        _add_error(records, line, record, filer, retryable=True)
    log.warning(
        "batch %s ended %s with %d rows unfinished, each now by %d batches: not resubmitting"
        " them; they get %s errors (retryable: run --retry-failed without --mode batch"
        " once this run is done)",
        part.batch_id,
        part.batch_status,
        len(unfinished),
        MAX_ROUNDS,
        UNFINISHED,
    )


def _add_error(
    records: Records, line: int, record: bytes, filer: PartFiler | None, *, retryable: bool
) -> None:
    """Keep a row error of the batch's own (a line refused, a row given up
    on) and note it for the store, as collected errors are: the rows left out
    of the batches as its twins find it there, and are not sent online."""
    at = records.add(line, record)
    if filer is not None and at is not None:
        filer.note(line, at, record, False, retryable, None)


def unfinished_record(line: int, custom_id: str, message: str, batches: int) -> bytes:
    """The record of a row that ``batches`` batches ended without answering."""
    outcome = Outcome(
        line=line,
        custom_id=custom_id,
        error_code=UNFINISHED,
        error_message=message,
        retryable=True,
        attempts=batches,
    )
    return output_line(outcome)


def _errors(batch: dict[str, Any]) -> list[dict[str, Any]]:
    errors = batch.get("errors")
    data = errors.get("data") if isinstance(errors, dict) else None
    return [error for error in data or [] if isinstance(error, dict)]


def _lines_of(raws: Iterable[bytes]) -> Iterable[tuple[int, bytes]]:
    for raw in raws:
        line = line_of_key(orjson.loads(raw).get("custom_id"))
        if line is not None:
            yield line, raw
