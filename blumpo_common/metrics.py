"""Prometheus metrics both services expose: gRPC calls served and made, and the database pool.

The gRPC families carry the names and labels of go-grpc-middleware's prometheus interceptors
(grpc_type, grpc_service, grpc_method, grpc_code, with Go's code names such as InvalidArgument),
so dashboards and alerts written for them apply. docs/observability.md lists every metric.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from typing import Any, Literal

import asyncpg
import grpc
import prometheus_client
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]

# The status codes as go-grpc-middleware writes them into grpc_code.
GO_CODE_NAMES: dict[grpc.StatusCode, str] = {
    grpc.StatusCode.OK: "OK",
    grpc.StatusCode.CANCELLED: "Canceled",
    grpc.StatusCode.UNKNOWN: "Unknown",
    grpc.StatusCode.INVALID_ARGUMENT: "InvalidArgument",
    grpc.StatusCode.DEADLINE_EXCEEDED: "DeadlineExceeded",
    grpc.StatusCode.NOT_FOUND: "NotFound",
    grpc.StatusCode.ALREADY_EXISTS: "AlreadyExists",
    grpc.StatusCode.PERMISSION_DENIED: "PermissionDenied",
    grpc.StatusCode.RESOURCE_EXHAUSTED: "ResourceExhausted",
    grpc.StatusCode.FAILED_PRECONDITION: "FailedPrecondition",
    grpc.StatusCode.ABORTED: "Aborted",
    grpc.StatusCode.OUT_OF_RANGE: "OutOfRange",
    grpc.StatusCode.UNIMPLEMENTED: "Unimplemented",
    grpc.StatusCode.INTERNAL: "Internal",
    grpc.StatusCode.UNAVAILABLE: "Unavailable",
    grpc.StatusCode.DATA_LOSS: "DataLoss",
    grpc.StatusCode.UNAUTHENTICATED: "Unauthenticated",
}

UNARY = "unary"
SERVER_STREAM = "server_stream"
_LABELS = ("grpc_type", "grpc_service", "grpc_method")
# Prometheus' default buckets with finer steps below 5 ms, where most calls end.
_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class _Family:
    """The five series of one side (server or client) of gRPC calls."""

    def __init__(self, side: str, whom: str) -> None:
        prefix = f"grpc_{side}"
        self.started = prometheus_client.Counter(f"{prefix}_started_total", f"RPCs started {whom}.", _LABELS)
        self.handled = prometheus_client.Counter(
            f"{prefix}_handled_total", f"RPCs completed {whom}, whatever their status.", (*_LABELS, "grpc_code")
        )
        self.handling = prometheus_client.Histogram(
            f"{prefix}_handling_seconds", f"Time from start to status of RPCs {whom}.", _LABELS, buckets=_BUCKETS
        )
        self.received = prometheus_client.Counter(
            f"{prefix}_msg_received_total", f"Messages received {whom} (requests or responses).", _LABELS
        )
        self.sent = prometheus_client.Counter(
            f"{prefix}_msg_sent_total", f"Messages sent {whom} (requests or responses).", _LABELS
        )


SERVER = _Family("server", "on the server")
CLIENT = _Family("client", "by the client")


class MethodMetrics:
    """One method's series on one side, with the label children resolved once: a call only
    increments and observes."""

    __slots__ = ("_family", "_handled", "_labels", "grpc_type", "handling", "received", "sent", "started")

    def __init__(self, family: _Family, grpc_type: str, full_method: str | bytes) -> None:
        name = full_method.decode() if isinstance(full_method, bytes) else full_method
        service, _, method = name.lstrip("/").rpartition("/")
        self._family = family
        self.grpc_type = grpc_type
        self._labels = (grpc_type, service, method)
        self.started = family.started.labels(*self._labels)
        self.handling = family.handling.labels(*self._labels)
        self.received = family.received.labels(*self._labels)
        self.sent = family.sent.labels(*self._labels)
        self._handled: dict[grpc.StatusCode, Any] = {}

    def handled(self, code: grpc.StatusCode, seconds: float) -> None:
        """Counts a call finished with code after seconds."""
        child = self._handled.get(code)
        if child is None:
            child = self._handled[code] = self._family.handled.labels(*self._labels, GO_CODE_NAMES[code])
        child.inc()
        self.handling.observe(seconds)


class MethodTable:
    """MethodMetrics by full method name (a method has one type), made on first use. Clients name
    methods in bytes, servers in str: either is a key as it comes."""

    def __init__(self, family: _Family) -> None:
        self.family = family
        self._methods: dict[str | bytes, MethodMetrics] = {}

    def get(self, method: str | bytes, grpc_type: str) -> MethodMetrics:
        found = self._methods.get(method)
        if found is None:
            found = self._methods[method] = MethodMetrics(self.family, grpc_type, method)
        return found


SERVER_METHODS = MethodTable(SERVER)
CLIENT_METHODS = MethodTable(CLIENT)


class CountedWrites:
    """A served call's context whose writes (a stream written rather than yielded) are counted."""

    def __init__(self, context: Any, observed: MethodMetrics) -> None:
        self._context = context
        self._sent = observed.sent

    async def write(self, message: Any) -> None:
        self._sent.inc()
        await self._context.write(message)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)


class ClientInterceptor(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[type-arg]
    """Counts and times the unary calls a channel makes (grpc_client_*)."""

    async def intercept_unary_unary(
        self,
        continuation: Callable[[grpc.aio.ClientCallDetails, Any], Any],
        client_call_details: grpc.aio.ClientCallDetails,
        request: Any,
    ) -> Any:
        metrics = CLIENT_METHODS.get(client_call_details.method, UNARY)
        metrics.started.inc()
        metrics.sent.inc()
        started = time.monotonic()
        call = await continuation(client_call_details, request)
        code = grpc.StatusCode.OK
        try:
            await call
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
        except BaseException:
            # Cancelled by the caller: counted as such, and passed on.
            metrics.handled(grpc.StatusCode.CANCELLED, time.monotonic() - started)
            raise
        if code is grpc.StatusCode.OK:
            metrics.received.inc()
        metrics.handled(code, time.monotonic() - started)
        # Awaiting the call again gives the caller the same response or error.
        return call


class _Waiting:
    """Calls waiting for a pooled connection now (db.BaseStore.connection counts them)."""

    count = 0


POOL_WAITING = _Waiting()
# The process's open pools (pools cannot be weakly referenced: closed ones are dropped here).
_pools: list[asyncpg.Pool] = []


def watch_pool(pool: asyncpg.Pool) -> None:
    """Reports the pool's connections at each scrape (summed over a process's pools)."""
    _pools[:] = [p for p in _pools if not p.is_closing()] + [pool]


class _PoolCollector(Collector):
    def collect(self) -> Iterator[Metric]:
        pools = [p for p in _pools if not p.is_closing()]
        size = GaugeMetricFamily("db_pool_connections", "Connections the database pool holds open.")
        size.add_metric([], sum(p.get_size() for p in pools))
        in_use = GaugeMetricFamily("db_pool_connections_in_use", "Pooled connections lent out to a call.")
        in_use.add_metric([], sum(p.get_size() - p.get_idle_size() for p in pools))
        most = GaugeMetricFamily("db_pool_connections_max", "The most connections the pool may open.")
        most.add_metric([], sum(p.get_max_size() for p in pools))
        waiting = GaugeMetricFamily("db_pool_waiting", "Calls waiting for a pooled connection.")
        waiting.add_metric([], POOL_WAITING.count)
        yield from (size, in_use, most, waiting)


# How the supervisor of several workers (workers.py) joins a gauge read at scrape time.
Join = Literal["livesum", "livemostrecent"]
PER_PROCESS: Join = "livesum"  # each worker's own (its pool): summed
ONE_FOR_ALL: Join = "livemostrecent"  # the same fact read by every worker (the database's backlog): the latest
# Gauges read at scrape time, and how workers' values are joined.
_scraped: list[tuple[Collector, Join]] = []
# A worker's copies of them, refreshed this often.
PUBLISH_SECONDS = 1.0


def register_scraped(collector: Collector, join: Join) -> None:
    """Registers a collector of gauges read at scrape time; join (PER_PROCESS or ONE_FOR_ALL) says
    how a supervisor joins the values of its workers."""
    prometheus_client.REGISTRY.register(collector)
    _scraped.append((collector, join))


def _collected(collector: Collector) -> list[Metric]:
    return list(collector.collect())


async def publish_scraped() -> None:
    """In a worker, whose supervisor serves the metrics (prometheus_client's multiprocess mode,
    where only counters, histograms and gauges written to its files are seen): the gauges read
    at scrape time copied there every PUBLISH_SECONDS (so that much behind), until cancelled."""
    copies: dict[str, prometheus_client.Gauge] = {}
    while True:
        for collector, join in _scraped:
            # In a thread: a collector may wait for this loop (the backlog's query).
            for family in await asyncio.to_thread(_collected, collector):
                for sample in family.samples:
                    gauge = copies.get(sample.name)
                    if gauge is None:
                        gauge = copies[sample.name] = prometheus_client.Gauge(
                            sample.name,
                            family.documentation,
                            list(sample.labels),
                            registry=None,
                            multiprocess_mode=join,
                        )
                    (gauge.labels(**sample.labels) if sample.labels else gauge).set(sample.value)
        await asyncio.sleep(PUBLISH_SECONDS)


register_scraped(_PoolCollector(), PER_PROCESS)
