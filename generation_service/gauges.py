"""Gauges read from the database at each scrape: live jobs by state, and the reconciler's backlog
with the age of its oldest item. One cheap statement (queries.sql `backlog`) per scrape."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from generation_service.model import Backlog
from generation_service.store import Store

log = logging.getLogger(__name__)

# A scrape waits no longer for the database; on a timeout it reports none of these gauges.
SCRAPE_TIMEOUT_SECONDS = 2.0


def _families() -> tuple[GaugeMetricFamily, GaugeMetricFamily, GaugeMetricFamily]:
    return (
        GaugeMetricFamily(
            "generation_jobs",
            "Jobs in each state a job passes through (finished ones are not counted).",
            labels=["state"],
        ),
        GaugeMetricFamily(
            "generation_reconciler_backlog",
            "Work the reconciler may have to finish: unsettled charge intents, owed refunds, expired leases.",
            labels=["kind"],
        ),
        GaugeMetricFamily(
            "generation_reconciler_oldest_seconds",
            "Age of the oldest unsettled charge intent, or owed refund (0 when there is none).",
            labels=["kind"],
        ),
    )


class BacklogCollector(Collector):
    """Reads the backlog on the service's event loop when the scraper's thread asks."""

    def __init__(self, store: Store, loop: asyncio.AbstractEventLoop) -> None:
        self.store = store
        self.loop = loop

    def describe(self) -> Iterator[Metric]:
        # Named here, so registering does not query the database (from the loop's own thread).
        yield from _families()

    def collect(self) -> Iterator[Metric]:
        future = asyncio.run_coroutine_threadsafe(self.store.backlog(), self.loop)
        try:
            backlog = future.result(SCRAPE_TIMEOUT_SECONDS)
        except Exception as exc:  # the gauges are left out of this scrape; the others still go
            future.cancel()
            log.warning("backlog gauges not read: %r", exc)
            return
        yield from families_of(backlog)


def families_of(backlog: Backlog) -> tuple[GaugeMetricFamily, ...]:
    jobs, pending, oldest = _families()
    for state, count in (
        ("CHARGING", backlog.charging),
        ("QUEUED", backlog.queued),
        ("RUNNING", backlog.running),
        ("PAUSED", backlog.paused),
    ):
        jobs.add_metric([state], count)
    pending.add_metric(["intents"], backlog.charging)
    pending.add_metric(["refunds"], backlog.refunds_owed)
    pending.add_metric(["leases"], backlog.leases_expired)
    oldest.add_metric(["intents"], backlog.oldest_intent_seconds or 0.0)
    oldest.add_metric(["refunds"], backlog.oldest_refund_seconds or 0.0)
    return jobs, pending, oldest
