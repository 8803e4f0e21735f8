"""What an output's batch record says, read without the provider: whether a
run may go on over it (``guard``), the answers its batches brought
(``known_results``), its parts for ``batchrun status`` (``describe``), and
the provider files it leaves named (``warn_of_undeleted``, and on --restart
``guard``).

Online runs read these too, so this module keeps clear of batch mode's HTTP.
"""

from __future__ import annotations

import logging
from pathlib import Path

from batchrun.batchmode.known import KnownResults
from batchrun.batchmode.record import (
    NOT_CREATED,
    SETTLED,
    TERMINAL,
    BatchRecord,
    BatchState,
    Part,
    upload_name,
)
from batchrun.errors import UsageError
from batchrun.fdlimit import make_room

__all__ = ["describe", "guard", "known_results", "unsettled", "warn_of_undeleted"]

log = logging.getLogger("batchrun")


def guard(state_root: Path, *, mode: str, restart: bool) -> None:
    """Refuse what would pay twice: online mode or ``--restart`` over live
    batches, online mode over parts not yet collected. A record whose parts
    were all only planned (no file uploaded) is dropped for online mode."""
    state = BatchRecord(state_root).load()
    if state is None:
        return
    live = [part for part in state.parts if _running(part)]
    if restart and live:
        cancelling = sum(part.batch_status == "cancelling" for part in live)
        raise UsageError(
            f"{len(live)} batches of this output are, or may be, still running on the provider"
            " and are paid (a stop right after creating one leaves it unrecorded): cancel them"
            " first with `batchrun cancel OUT`, which finds those too, or run without --restart"
            if not cancelling
            else f"{cancelling} batches of this output are being cancelled: run `batchrun"
            " cancel OUT` again until it reports them cancelled, then --restart"
        )
    if restart:  # the record goes: no later run deletes what it names on the provider
        _warn_of_files(state)
        return
    pending = [part for part in state.parts if part.status != "collected"]
    if mode == "online" and pending:
        if all(part.status == "planned" for part in state.parts):
            # No part was uploaded, so no batch can exist: the rows go online
            # and a later batch run plans afresh, leaving out what is answered.
            _warn_of_files(state)
            BatchRecord(state_root).remove()
            log.info("no batch of this output was submitted: its rows go online instead")
            return
        raise UsageError(
            f"this output has {len(pending)} batch parts not yet collected: run it with --mode"
            " batch (add --fallback online to send unfinished rows online)"
        )


def warn_of_undeleted(state: BatchState) -> None:
    """Name the provider files a deletion failed for: the record that holds
    them is dropped once the output is published, so no later run deletes
    them (DashScope keeps at most 10,000 files)."""
    left = [
        file_id
        for part in state.parts
        for file_id in (part.input_file_id, *part.result_files)
        if file_id
    ]
    if left:
        log.warning(
            "%d file(s) could not be deleted on the provider at %s: %s; delete them there"
            " (its files API)",
            len(left),
            state.base_url,
            ", ".join(left),
        )


def _warn_of_files(state: BatchState) -> None:
    """Name the files a stopped batch run may have left on the provider (an
    upload begun, a file not deleted yet, an ended batch's results not
    collected): once the record is dropped, no run looks for them again."""
    names = [upload_name(state, part) for part in state.parts if _may_hold_input(part)]
    names += [file_id for part in state.parts for file_id in part.result_files]
    if names:
        log.warning(
            "a stopped batch run may have left %d file(s) on the provider at %s: %s;"
            " delete them there (its files API) if they are listed",
            len(names),
            state.base_url,
            ", ".join(names),
        )
    # Ended and never collected (--restart refuses live ones): the record
    # holds no id of their result files, only of the batch that names them.
    ended = [part.batch_id for part in state.parts if part.status == "submitted" and part.batch_id]
    if ended:
        log.warning(
            "the result files of %d ended batch(es) may stay on the provider at %s: %s; delete"
            " them there (each batch names its output_file_id and error_file_id)",
            len(ended),
            state.base_url,
            ", ".join(ended),
        )


def _may_hold_input(part: Part) -> bool:
    """Whether ``part``'s input file may be on the provider: its upload
    began, and it was not deleted once the part was settled."""
    return part.upload_started and (part.status not in SETTLED or part.input_file_id is not None)


def _running(part: Part) -> bool:
    """Submitted and not known to have ended (``batchrun cancel`` records a
    cancelled batch's end): it may still run, and be paid. So may an uploaded
    part's batch: a stop between creating it and recording it leaves it
    unrecorded, until ``batchrun cancel`` looks for it."""
    if part.status == "uploaded":
        return part.batch_status != NOT_CREATED
    return part.live and part.batch_status not in TERMINAL


def unsettled(state_root: Path) -> int:
    """The parts of the output's batch record not yet settled (neither
    collected nor refused): their answers are not all in the result store."""
    state = BatchRecord(state_root).load()
    if state is None:
        return 0
    return sum(part.status not in SETTLED for part in state.parts)


def known_results(state_root: Path, pool_size: int) -> KnownResults | None:
    """The collected batch answers of the run in ``state_root``, if any;
    room is made for their files beside ``pool_size`` connections."""
    record = BatchRecord(state_root)
    state = record.load()
    if state is None:
        return None
    paths = list(record.results(state))
    make_room(pool_size, parts=len(paths))
    return KnownResults(paths)


def describe(state_root: Path) -> list[dict[str, object]] | None:
    """Each part's batch id and status, for ``batchrun status``."""
    state = BatchRecord(state_root).load()
    if state is None:
        return None
    return [
        {
            "part": part.id,
            "batch_id": part.batch_id,
            "status": part.batch_status or part.status,
            "state": part.status,
            "rows": part.rows,
            "counts": part.counts,
        }
        for part in state.parts
    ]
