"""Getting parts onto the provider without ever giving one two live batches.

Order, each step recorded before the next: the part file is written (``planned``),
uploaded under a name naming the run and the part (``uploaded`` with its
file id), then a batch is created with metadata naming the run, the part and
the try, and its id recorded at once (``submitted``). A crash between
uploading and recording finds the file by listing files and matching the
name; a crash between creating a batch and recording it finds the batch by
listing batches and matching the metadata: the next run attaches to them
instead of uploading or creating a second one. A create that fails in
transit is looked up the same way before it is tried again.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import anyio

from batchrun import crashpoint
from batchrun.batchmode.api import BatchApi, Doubt, made_with, metadata_of
from batchrun.batchmode.record import BatchRecord, BatchState, Part, upload_name
from batchrun.config import RetryPolicy
from batchrun.errors import RequestError
from batchrun.retry import retrying
from batchrun.timing import Sleep

log = logging.getLogger("batchrun")

# Files uploaded at the same time: enough to fill the link, few enough to bound buffers.
UPLOAD_AT_ONCE = 4


def metadata(state: BatchState, part: Part) -> dict[str, str]:
    """What names a part's batch on the provider (at most 16 pairs)."""
    return {
        "batchrun_run": state.run_id,
        "batchrun_part": str(part.id),
        "batchrun_try": str(part.tries),
    }


class Submitter:
    """Uploads parts and creates their batches, recording every step."""

    def __init__(
        self,
        api: BatchApi,
        record: BatchRecord,
        state: BatchState,
        *,
        retry: RetryPolicy,
        sleep: Sleep,
    ) -> None:
        self.api = api
        self.record = record
        self.state = state
        self.retry = retry
        self.sleep = sleep
        self._uploading = anyio.CapacityLimiter(UPLOAD_AT_ONCE)
        # Parts whose batch a failed create may have made (a new process
        # looks for them in ``reattach``).
        self._tried: set[int] = set()

    async def submit(self, part: Part) -> None:
        """Upload ``part`` if needed, then create and record its batch."""
        if part.status == "planned":
            async with self._uploading:
                path = self.record.file(part.id, "jsonl")
                part.input_file_id = await self._upload(part, path)
            crashpoint.hit("after_upload")
            part.status = "uploaded"
            self.record.save(self.state)
        assert part.input_file_id is not None
        batch = await self._create(part)
        crashpoint.hit("after_batch_create")
        attach(part, batch)
        self.record.save(self.state)
        log.info("part %d (%d rows): batch %s", part.id, part.rows, part.batch_id)

    async def _upload(self, part: Part, path: Path) -> str:
        """Upload ``part``'s file at ``path``; its file id. The start is
        recorded first: a stop before the id is recorded may leave the file
        on the provider (``standing.guard`` names it)."""
        # Started by this run or one before: the file may be there.
        doubt = Doubt(stored=part.upload_started)
        if not part.upload_started:
            part.upload_started = True
            self.record.save(self.state)
        try:
            return await self.api.upload(path, upload_name(self.state, part), doubt)
        except RequestError:
            # Un-recorded only if no try stored the file: a lookup's failure
            # (after a lost answer) is no proof that nothing is there.
            if not doubt.stored:
                part.upload_started = False
                self.record.save(self.state)
            raise

    async def _create(self, part: Part) -> dict[str, Any]:
        """Create ``part``'s batch; first, if a create of this try failed
        before (in this call or an earlier round, whose lookup may have
        failed too), look for the batch it may have made after all."""
        wanted = metadata(self.state, part)

        async def once() -> dict[str, Any]:
            if part.id in self._tried:
                found = await self.api.find(wanted, part.input_file_id)
                if found is not None:
                    return found
            self._tried.add(part.id)
            assert part.input_file_id is not None
            return await self.api.create(part.input_file_id, part.endpoint, wanted)

        batch: dict[str, Any] = await retrying(self.retry, sleep=self.sleep)(once)
        self._tried.discard(part.id)  # a later try has metadata of its own
        return batch

    async def reattach(self, *, resumed: bool) -> None:
        """After a crash (``resumed``): record the files uploaded and the
        batches created that the record does not hold yet, so no part is
        uploaded or submitted twice."""
        if not resumed:
            return
        if any(part.status == "planned" for part in self.state.parts):
            await self._find_uploads()
        if any(part.status == "uploaded" for part in self.state.parts):
            await self._find_batches()

    async def _find_uploads(self) -> None:
        planned = {upload_name(self.state, p): p for p in self.state.parts if p.status == "planned"}
        async for file in self.api.files():
            part = planned.pop(str(file.get("filename")), None)
            if part is not None:
                part.input_file_id, part.status = str(file["id"]), "uploaded"
                log.info("part %d: found its file uploaded before a crash", part.id)
            if not planned:
                break
        self.record.save(self.state)

    async def _find_batches(self) -> None:
        waiting = {str(part.id): part for part in self.state.parts if part.status == "uploaded"}
        by_file = {part.input_file_id: part for part in waiting.values() if part.input_file_id}
        async for batch in self.api.batches():
            part = self._made_for(batch, waiting, by_file)
            if part is None:
                continue
            attach(part, batch)
            del waiting[str(part.id)]
            by_file.pop(part.input_file_id or "", None)
            log.info("part %d: attached to batch %s created before a crash", part.id, part.batch_id)
            if not waiting:
                break
        self.record.save(self.state)

    def _made_for(
        self, batch: dict[str, Any], waiting: dict[str, Part], by_file: dict[str, Part]
    ) -> Part | None:
        """The waiting part ``batch`` was created for (see ``api.made_with``),
        looked up by the part its metadata names, or by its input file."""
        given = metadata_of(batch)
        if given:
            part = waiting.get(str(given.get("batchrun_part")))
        else:
            part = by_file.get(str(batch.get("input_file_id")))
        if part is None or not made_with(batch, metadata(self.state, part), part.input_file_id):
            return None
        return part


def attach(part: Part, batch: dict[str, Any]) -> None:
    """Record ``batch`` (as ``BatchApi`` hands it out: its id and status
    checked strings) as ``part``'s live batch."""
    part.batch_id = batch["id"]
    part.batch_status = batch["status"]
    part.status = "submitted"
