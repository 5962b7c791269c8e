"""The gRPC server both services run: interceptor, health, reflection, shutdown.

Handlers stay thin: they raise ServiceError, and the interceptor here turns it (or a
database failure) into a status with details, logs the call and counts it (metrics.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import inspect
import logging
import os
import signal
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeAlias

import asyncpg
import grpc
import prometheus_client
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from grpc_status import rpc_status

from blumpo_common import authz, db, logs, metrics, tls, tracing
from blumpo_common.admission import Admission
from blumpo_common.config import DEFAULT_MAX_CONCURRENT_CALLS, ConfigError, ServerConfig, exit_on, load_or_exit
from blumpo_common.errors import ServiceError, from_exception, to_status

log = logging.getLogger(__name__)

# The context of a call being served.
Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"
# grpcio-health-checking's stubs do not describe its asyncio servicer.
HealthServicer: Any = health.aio.HealthServicer  # type: ignore[attr-defined]

HEALTH_PROBE_SECONDS = 2.0
MAX_REQUEST_ID = 128
REQUEST_ID = "x-request-id"
# Failed calls logged as WARNING: the service's own failures, not the caller's.
SERVER_FAULTS = frozenset(
    {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DATA_LOSS}
)
# Health answers whatever the load and through a drain: it is how others learn of both.
HEALTH_METHODS = "/grpc.health."
# After the last call in flight returned, how long gRPC may take to write the answers out at
# shutdown; streams still open then (watchers) are ended with UNAVAILABLE.
ANSWER_FLUSH_SECONDS = 1.0


@dataclass
class Service:
    """What one service plugs into the shared server."""

    # The process, e.g. "token_service", as its messages name it.
    name: str
    # Full protobuf name, e.g. "blumpo.token.v1.TokenService".
    full_name: str
    # google.rpc.ErrorInfo domain, e.g. "blumpo.token".
    error_domain: str
    register: Callable[[grpc.aio.Server], None]
    # Long-running tasks (reconcilers, listeners) started with the server.
    background: Sequence[Callable[[], Coroutine[Any, Any, None]]] = field(default_factory=tuple)
    # Told that shutdown started, before calls in flight are waited for (e.g. to end open streams).
    on_shutdown: Sequence[Callable[[], None]] = field(default_factory=tuple)
    # Told to re-read certificates (SIGHUP, with TLS), after the server's own.
    on_reload: Sequence[Callable[[], object]] = field(default_factory=tuple)
    # The health probe (its queries.sql's `health_probe`): true when the service's schema and
    # functions are there for its login, so health is NOT_SERVING after a rollback too.
    probe: str = "SELECT true"


@dataclass(frozen=True)
class Security:
    """How a server knows its callers: mutual TLS (None: plaintext) and the policy (None:
    everything allowed); both None only in development."""

    tls: tls.TlsConfig | None = None
    policy: authz.Policy | None = None


def load_security(env: Mapping[str, str]) -> Security:
    return Security(tls.load(env), authz.load(env))


class CallInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Maps errors to statuses, sets the request id and deadline, logs and counts each call, and
    admits it: only a caller the policy allows the method, unary calls up to the admission's
    bound, none while draining."""

    def __init__(self, error_domain: str, admission: Admission, gate: authz.Gate | None = None) -> None:
        self.error_domain = error_domain
        self.admission = admission
        self.gate = gate or authz.Gate()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(handler_call_details)
        method: str = handler_call_details.method
        if handler is None or method.startswith("/grpc.reflection."):
            return handler
        deserialize = _tolerant(handler.request_deserializer)
        health_check = method.startswith(HEALTH_METHODS)
        admission = None if health_check else self.admission
        if handler.unary_unary:
            unary: Any = handler.unary_unary
            observed = metrics.SERVER_METHODS.get(method, metrics.UNARY)

            async def unary_call(request: Any, context: Context) -> Any:
                async with self._call(method, context, observed, health_check) as call:
                    call.check_allowed()
                    with admission.admit() if admission is not None else contextlib.nullcontext():
                        return await unary(_decoded(request), context)

            return grpc.unary_unary_rpc_method_handler(
                unary_call,
                request_deserializer=deserialize,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream:
            stream: Any = handler.unary_stream

            # Streams (watchers) hold no connection while they wait, so they do not count
            # against the bound; they have their own (MAX_WATCHERS).
            observed_stream = metrics.SERVER_METHODS.get(method, metrics.SERVER_STREAM)

            async def stream_call(request: Any, context: Context) -> AsyncIterator[Any]:
                async with self._call(method, context, observed_stream, health_check) as call:
                    call.check_allowed()
                    if admission is not None:
                        admission.check_open()
                    async for response in stream(_decoded(request), context):
                        observed_stream.sent.inc()
                        yield response

            # A handler that writes through its context (health's Watch) rather than yields.
            async def writing_stream_call(request: Any, context: Context) -> None:
                async with self._call(method, context, observed_stream, health_check) as call:
                    call.check_allowed()
                    if admission is not None:
                        admission.check_open()
                    await stream(_decoded(request), metrics.CountedWrites(context, observed_stream))

            return grpc.unary_stream_rpc_method_handler(
                stream_call if inspect.isasyncgenfunction(stream) else writing_stream_call,
                request_deserializer=deserialize,
                response_serializer=handler.response_serializer,
            )
        return handler

    def _call(self, method: str, context: Context, observed: metrics.MethodMetrics, open_to_all: bool) -> _Call:
        return _Call(self.error_domain, method, context, observed, None if open_to_all else self.gate)


@dataclass(frozen=True)
class _Undecodable:
    """A request whose bytes are not a valid message (gRPC would answer UNKNOWN for it)."""

    reason: str


def _tolerant(deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserialize is None:
        return None

    def decode(data: bytes) -> Any:
        try:
            return deserialize(data)
        except DecodeError as exc:
            return _Undecodable(str(exc))

    return decode


def _decoded(request: Any) -> Any:
    if isinstance(request, _Undecodable):
        raise ServiceError(
            grpc.StatusCode.INVALID_ARGUMENT,
            "UNDECODABLE_REQUEST",
            f"the request is not a valid message of this method: {request.reason}",
        )
    return request


class _Call:
    """The scope of one served call (an async context manager)."""

    def __init__(
        self,
        error_domain: str,
        method: str,
        context: Context,
        observed: metrics.MethodMetrics,
        gate: authz.Gate | None,
    ) -> None:
        self.error_domain = error_domain
        self.grant = None if gate is None else gate.admit(context, method)
        self.method = method
        self.context = context
        self.observed = observed
        self.code = grpc.StatusCode.OK
        self.reason = ""
        self.started = time.monotonic()
        metadata = dict(context.invocation_metadata() or ())
        # A caller's own request id is kept (bounded), so one id follows a request across services.
        self.request_id = str(metadata.get(REQUEST_ID) or uuid.uuid4())[:MAX_REQUEST_ID]
        remaining = context.time_remaining()
        self.deadline = None if remaining is None else self.started + remaining

    async def __aenter__(self) -> _Call:
        self.observed.started.inc()
        self.observed.received.inc()
        self.tokens = (logs.request_id.set(self.request_id), db.call_deadline.set(self.deadline))
        self.scope = None if self.grant is None else authz.enter(self.grant)
        # The caller learns the id to quote, whatever the outcome.
        await self.context.send_initial_metadata(((REQUEST_ID, self.request_id),))
        return self

    def check_allowed(self) -> None:
        """Raises the policy's refusal (in the call's body, so it is answered like any error)."""
        if self.grant is not None and self.grant.refusal is not None:
            raise self.grant.refusal

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: Any) -> bool:
        try:
            if exc is None:
                return False
            if isinstance(exc, asyncio.CancelledError):
                self.code = grpc.StatusCode.CANCELLED
                return False
            if isinstance(exc, grpc.aio.AbortError):  # the handler aborted by itself
                self.code = self.context.code() or grpc.StatusCode.UNKNOWN
                return False
            if isinstance(exc, ServiceError):
                error = exc
            else:
                mapped = from_exception(exc)
                if mapped is None:
                    log.error("unhandled error", exc_info=exc)
                    mapped = ServiceError(
                        grpc.StatusCode.INTERNAL,
                        "INTERNAL",
                        f"internal error; quote request id {self.request_id} when reporting it",
                    )
                else:
                    log.warning("%s: %s", mapped.reason, exc)
                error = mapped
            self.code, self.reason = error.code, error.reason
            status = rpc_status.to_status(to_status(error, self.error_domain))
            await self.context.abort(status.code, status.details, status.trailing_metadata)
            return False  # pragma: no cover - abort always raises
        finally:
            self._finish()

    def _finish(self) -> None:
        elapsed = time.monotonic() - self.started
        self.observed.handled(self.code, elapsed)
        if self.code is grpc.StatusCode.OK and self.observed.grpc_type == metrics.UNARY:
            self.observed.sent.inc()
        if self.code in SERVER_FAULTS:
            level = logging.WARNING
        else:  # probes come every few seconds from every balancer: not news
            level = logging.DEBUG if self.method.startswith(HEALTH_METHODS) else logging.INFO
        if log.isEnabledFor(level):
            fields = {
                "method": self.method,
                "code": self.code.name,
                "duration_ms": round(elapsed * 1000, 2),
                "request_id": self.request_id,
                "caller": "" if self.grant is None else self.grant.caller,
            }
            if self.reason:
                fields["reason"] = self.reason
            log.log(level, "call", extra=fields)
        logs.request_id.reset(self.tokens[0])
        db.call_deadline.reset(self.tokens[1])
        if self.scope is not None:
            authz.leave(self.scope)


async def watch_database(
    pool: asyncpg.Pool, health_servicer: HealthServicer, names: Sequence[str], probe: str = "SELECT true"
) -> None:
    """Reports NOT_SERVING while the database is unreachable or the probe finds the schema missing."""
    serving: bool | None = None
    while True:
        try:
            async with pool.acquire(timeout=HEALTH_PROBE_SECONDS) as conn:
                now = bool(await conn.fetchval(probe, timeout=HEALTH_PROBE_SECONDS))
            if not now and serving is not False:
                log.warning("database answers, but the service's schema or functions are missing")
        except Exception as exc:  # any failure to answer means not serving
            if serving is not False:
                log.warning("database unreachable: %s", exc)
            now = False
        if now != serving:
            state = health_pb2.HealthCheckResponse.SERVING if now else health_pb2.HealthCheckResponse.NOT_SERVING
            for name in names:
                await health_servicer.set(name, state)
            serving = now
        await asyncio.sleep(HEALTH_PROBE_SECONDS)


@dataclass
class RunningServer:
    server: grpc.aio.Server
    port: int
    health: HealthServicer
    admission: Admission
    tasks: list[asyncio.Task[None]]
    on_shutdown: Sequence[Callable[[], None]] = ()
    # None when serving plaintext (development).
    certificates: tls.ServerCertificates | None = None

    async def stop(self, grace_seconds: float) -> None:
        """Drains, then stops: health says NOT_SERVING first; new calls are refused with
        UNAVAILABLE while the calls in flight get grace_seconds to finish; then the server stops
        listening (cutting what still runs) and background work is stopped."""
        started = time.monotonic()
        await self.health.enter_graceful_shutdown()
        # Streams that would otherwise run on (watchers) end now, so the drain waits only for calls.
        for hook in self.on_shutdown:
            hook()
        if not await self.admission.drain(grace_seconds):
            log.warning(
                "calls still in flight after the grace period are cut", extra={"calls": self.admission.in_flight}
            )
        left = max(0.0, grace_seconds - (time.monotonic() - started))
        await self.server.stop(min(left, ANSWER_FLUSH_SECONDS))
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


def check_bindable(address: str, share_port: bool) -> None:
    """OSError unless a server could listen on address (checked here, so gRPC has no failure to log)."""
    host, _, port = address.rpartition(":")
    family, kind, proto, _, sockaddr = socket.getaddrinfo(
        host.strip("[]"), int(port), type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, int(share_port))
        sock.bind(sockaddr)


async def start(
    service: Service,
    pool: asyncpg.Pool,
    listen_addr: str,
    max_concurrent_calls: int = DEFAULT_MAX_CONCURRENT_CALLS,
    security: Security | None = None,
    *,
    share_port: bool = False,
) -> RunningServer:
    """Serves the service on listen_addr, with mutual TLS and the policy of security (without:
    plaintext, everything allowed); OSError when that address cannot be used. With share_port,
    the other workers of the service listen on it too (SO_REUSEPORT)."""
    security = security or Security()
    certificates = None if security.tls is None else tls.ServerCertificates(security.tls)
    admission = Admission(max_concurrent_calls)
    gate = authz.Gate(security.policy, mutual_tls=certificates is not None)
    interceptors = [*tracing.server_interceptors(), CallInterceptor(service.error_domain, admission, gate)]
    server = grpc.aio.server(interceptors=interceptors, options=[("grpc.so_reuseport", int(share_port))])
    service.register(server)
    health_servicer = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = ("", service.full_name)
    for name in names:  # until the database has answered once
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    reflection.enable_server_reflection((service.full_name, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    check_bindable(listen_addr, share_port)
    if certificates is None:
        port = server.add_insecure_port(listen_addr)
    else:
        port = server.add_secure_port(listen_addr, certificates.credentials())
    await server.start()
    tasks = [asyncio.create_task(watch_database(pool, health_servicer, names, service.probe))]
    tasks += [asyncio.create_task(job()) for job in service.background]
    return RunningServer(server, port, health_servicer, admission, tasks, service.on_shutdown, certificates)


def configure_process(name: str, log_level: str) -> None:
    """Logs and (when OTEL_* ask for it) tracing of one process of a service: the one started,
    and each worker it spawns."""
    logs.configure(name, log_level)
    load_or_exit(name, functools.partial(tracing.configure, name), os.environ)


async def serve(
    service: Service, pool: asyncpg.Pool, config: ServerConfig, security: Security, *, worker: bool = False
) -> None:
    """Runs until SIGTERM or SIGINT, then shuts down gracefully; SIGHUP re-reads the certificates.
    A worker (one of several processes, workers.py) shares the listening port with the others,
    and leaves the metrics to its supervisor.

    An address that cannot be used stops start-up with one line naming its setting (exit 2)."""
    host, _, port = config.metrics_addr.rpartition(":")
    try:
        if not worker:
            prometheus_client.start_http_server(int(port), host)
    except OSError as exc:
        exit_on(service.name, ConfigError(f"{config.metrics_setting} {config.metrics_addr} cannot be used: {exc}"))
    try:
        running = await start(
            service, pool, config.listen_addr, config.max_concurrent_calls, security, share_port=worker
        )
    except OSError as exc:
        exit_on(service.name, ConfigError(f"{config.listen_setting} {config.listen_addr} cannot be used: {exc}"))
    if worker:
        # The supervisor serves the metrics; what is read at scrape time here is copied out for it.
        running.tasks.append(asyncio.create_task(metrics.publish_scraped()))
    # What start-up made (modules, descriptors, the policy) lives as long as the process: kept out
    # of the collector's sight, a full collection no longer walks it (a pause of 60-100 ms, each
    # a few seconds under load, against about 1 ms). Start-up's garbage is collected first, not kept.
    gc.collect()
    gc.freeze()
    log.info(
        "serving",
        extra={
            "grpc_service": service.full_name,
            "listen": config.listen_addr,
            "port": running.port,
            "mutual_tls": running.certificates is not None,
            "policy": security.policy is not None,
        },
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if running.certificates is not None:
        reloads = (running.certificates.reload, *service.on_reload)
        loop.add_signal_handler(signal.SIGHUP, lambda: [reload() for reload in reloads])
    await stop.wait()
    log.info("shutting down", extra={"grace_seconds": config.shutdown_grace_seconds})
    await running.stop(config.shutdown_grace_seconds)
    try:
        # A database that stopped answering must not hold the exit forever.
        await asyncio.wait_for(pool.close(), timeout=max(config.shutdown_grace_seconds, 1.0))
    except TimeoutError:
        pool.terminate()
    log.info("stopped")
