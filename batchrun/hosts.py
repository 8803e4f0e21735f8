"""Several base URLs for one job: replicas of a self-hosted server, or regions.

Each request goes to the host with the fewest requests in flight; a host
that fails several times in a row (no answer, 5xx) rests for a while and the
others carry the load. With every host resting, the one whose rest ends
first is used rather than stopping the run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

# Consecutive failures that send a host to rest, and the first rest in seconds
# (doubling with each rest in a row, up to _MAX_REST).
FAILURES_TO_REST = 3
FIRST_REST = 5.0
_MAX_REST = 300.0


@dataclass(slots=True)
class Host:
    """One base URL and what batchrun has seen of it."""

    base_url: str
    in_flight: int = 0
    sent: int = 0
    failed: int = 0
    rests: int = 0
    failures_in_a_row: int = 0
    resting_until: float = 0.0
    next_rest: float = FIRST_REST


class HostPool:
    """Chooses a host per request and learns from each attempt's end."""

    def __init__(self, base_urls: tuple[str, ...], *, clock: Callable[[], float]) -> None:
        if not base_urls:
            raise ValueError("at least one base URL")
        self.hosts = [Host(url) for url in base_urls]
        self._clock = clock

    def pick(self) -> Host:
        """The host for the next request, counted in flight until ``finished``."""
        hosts = self.hosts
        if len(hosts) == 1:
            host = hosts[0]
        else:
            now = self._clock()
            awake = [h for h in hosts if h.resting_until <= now]
            host = (
                min(awake, key=lambda h: h.in_flight)
                if awake
                else min(hosts, key=lambda h: h.resting_until)
            )
        host.in_flight += 1
        host.sent += 1
        return host

    def finished(self, host: Host, *, host_failed: bool) -> None:
        """An attempt on ``host`` ended; ``host_failed``: no answer, or a 5xx."""
        host.in_flight -= 1
        if not host_failed:
            host.failures_in_a_row = 0
            host.next_rest = FIRST_REST
            return
        host.failed += 1
        host.failures_in_a_row += 1
        if host.failures_in_a_row >= FAILURES_TO_REST and len(self.hosts) > 1:
            host.resting_until = self._clock() + host.next_rest
            host.next_rest = min(_MAX_REST, host.next_rest * 2)
            host.failures_in_a_row = 0
            host.rests += 1

    def report(self) -> dict[str, str]:
        """Per host, for the summary (only worth showing with several hosts)."""
        return {
            h.base_url: f"{h.sent} sent, {h.failed} failed, rested {h.rests}x" for h in self.hosts
        }
