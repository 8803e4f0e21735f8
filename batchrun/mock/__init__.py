"""The simulated model provider behind ``--provider mock`` and ``batchrun mock-server``.

- ``server``: ``MockServer``, the aiohttp server on loopback, its counters
  (``MockStats``), its requests-per-second quota, and ``serve`` (the command);
- ``faults``: how it answers, in each dialect, the faults a row scripts;
- ``script``: pure logic: a prompt's ``mock:`` directives and the
  deterministic answer bodies;
- ``batches``: the files and batches API, on a fast clock, with batch faults.

Requests carry the kinds of ``batchrun.records`` (``Kind``, ``BATCH_URLS``).
"""

from batchrun.mock.batches import BatchFaults
from batchrun.mock.server import MockServer, MockStats, serve

__all__ = ["BatchFaults", "MockServer", "MockStats", "serve"]
