"""Writing the batch input files: the I/O shell around ``plan``.

The input is read once. Rows already answered (in the ordered output, the
journal or the result store, by an online run or an earlier batch run: the
ordered writer takes them from there), lines that are not requests (online
mode's error records cover them) and rows whose request is already in a part
(identical rows: once collected, the store answers them) are left out; the
rest go into part files. Parts are recorded only when every file is written, so a
crash while planning leaves nothing half-known: the next run plans again.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from batchrun.batchmode.plan import Group, Splitter, batch_line
from batchrun.batchmode.record import BatchRecord, Part
from batchrun.config import WHOLE, RunConfig
from batchrun.inputs import open_input, read_lines
from batchrun.keyset import KeySet
from batchrun.records import LineError, Request, parse_line
from batchrun.resume import ResumePoint

Body = Callable[[Request], dict[str, Any]]
# Whether a content key has a stored answer (in the result store).
Answered = Callable[[bytes], bool]
# A request's content key (``contentkey.request_key`` with the run's
# provider), given the body its batch line sends and that body's canonical JSON.
KeyOf = Callable[[Request, dict[str, Any], bytes], bytes]
# Raises when the run has been stopped (a signal): planning then ends at once.
CheckStop = Callable[[], None]

# Rows planned between two looks at whether the run was stopped: planning a
# million rows takes tens of seconds, and a stop must come within its grace
# period (Airflow kills a task 5 s after asking it to stop).
STOP_CHECK_ROWS = 4096


@dataclass(slots=True)
class _Writing:
    part: Part
    handle: BinaryIO
    ids: list[tuple[int, str]] = field(default_factory=list)
    keys: list[bytes] = field(default_factory=list)


class PartWriter:
    """Part files being written; each closed when the splitter says it is full."""

    def __init__(self, record: BatchRecord, splitter: Splitter) -> None:
        self.record = record
        self.splitter = splitter
        self.parts: list[Part] = []
        self._open: dict[int, _Writing] = {}

    def add(self, group: Group, request: Request, data: bytes, key: bytes) -> None:
        number, closed = self.splitter.place(group, len(data))
        if closed is not None:
            self._close(closed)
        writing = self._open.get(number)
        if writing is None:
            part = Part(id=number, endpoint=group.endpoint, model=group.model, rows=0, bytes=0)
            handle = self.record.file(number, "jsonl").open("wb")
            writing = self._open[number] = _Writing(part, handle)
        writing.handle.write(data)
        writing.ids.append((request.line, request.custom_id))
        writing.keys.append(key)
        writing.part.rows += 1
        writing.part.bytes += len(data)

    def finish(self) -> list[Part]:
        """Close every part; all parts, in number order."""
        for number in list(self._open):
            self._close(number)
        return sorted(self.parts, key=lambda part: part.id)

    def abandon(self) -> None:
        for writing in self._open.values():
            writing.handle.close()

    def _close(self, number: int) -> None:
        writing = self._open.pop(number)
        writing.handle.close()
        self.record.write_ids(number, writing.ids)
        self.record.write_keys(number, writing.keys)
        self.parts.append(writing.part)


def plan_parts(
    config: RunConfig,
    record: BatchRecord,
    start: ResumePoint,
    body: Body,
    max_bytes: int,
    key_of: KeyOf,
    answered: Answered | None = None,
    check_stop: CheckStop | None = None,
) -> list[Part]:
    """Write the part files of every row still to answer (none in the output,
    the journal, or, by ``answered``, the result store), each request once
    however many rows repeat it, with each row's content key (its answer is
    stored under it); the parts. ``check_stop`` is called every
    ``STOP_CHECK_ROWS`` rows; what it raises ends planning, files abandoned."""
    writer = PartWriter(record, Splitter(config.batch.rows, max_bytes))
    planned = KeySet()
    try:
        for index, request in enumerate(unanswered(config, start)):
            if check_stop is not None and not index % STOP_CHECK_ROWS:
                check_stop()
            sent = body(request)
            group, data, sent_json = batch_line(request, sent)
            key = key_of(request, sent, sent_json)
            if (answered is None or not answered(key)) and planned.add(key):
                writer.add(group, request, data, key)
    except BaseException:
        writer.abandon()
        raise
    return writer.finish()


def unanswered(config: RunConfig, start: ResumePoint) -> Iterator[Request]:
    """The input's requests that have no result yet in the output or the
    journal, in input order."""
    shard = config.shard or WHOLE
    defaults = config.request_defaults()  # as online mode's, with a schema's response_format
    written, known = start.checkpoint.rows, start.journal.results
    first, offset = start.checkpoint.input_line, start.checkpoint.input_offset
    with open_input(config.input) as handle:
        handle.seek(offset)
        for index, raw in enumerate(read_lines(handle, config.input), start=first):
            if not shard.owns(index) or shard.seq(index) < written or index + 1 in known:
                continue
            parsed = parse_line(raw.rstrip(b"\r\n"), index + 1, defaults)
            if not isinstance(parsed, LineError):
                yield parsed
