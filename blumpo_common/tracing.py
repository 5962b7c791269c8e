"""OpenTelemetry tracing: server and client spans of gRPC calls, and a span per database statement.

Off unless the standard OTEL_* variables ask for it (docs/observability.md): then spans go to
an OTLP collector over gRPC, and the W3C traceparent travels with every call a service makes.
Off, nothing is wrapped: the calls pay nothing for it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.instrumentation.asyncpg import AsyncPGInstrumentor
from opentelemetry.instrumentation.grpc import aio_client_interceptors, aio_server_interceptor, filters
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.sdk.trace.sampling import Decision, Sampler, SamplingResult
from opentelemetry.trace import Link, SpanKind
from opentelemetry.trace.span import TraceState
from opentelemetry.util.types import Attributes

from blumpo_common.config import ConfigError

# Probes and reflection are not traced: they would bury the calls that matter.
_TRACED = filters.negate(
    filters.any_of(filters.service_prefix("grpc.health."), filters.service_prefix("grpc.reflection."))
)

_provider: TracerProvider | None = None


def requested(env: Mapping[str, str]) -> bool:
    """Whether the environment asks for traces: an exporter named, or an OTLP endpoint given;
    OTEL_SDK_DISABLED=true or OTEL_TRACES_EXPORTER=none turn them off whatever else is set."""
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporter = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporter:
        return exporter != "none"
    return bool(env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))


def exporter_for(env: Mapping[str, str]) -> SpanExporter:
    """The exporter OTEL_TRACES_EXPORTER names: otlp (the default; over gRPC, its settings the
    OTEL_EXPORTER_OTLP_* variables) or console."""
    name = env.get("OTEL_TRACES_EXPORTER", "").strip().lower() or "otlp"
    protocol = env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "grpc"
    if name == "otlp" and protocol != "grpc":
        raise ConfigError(f"OTEL_EXPORTER_OTLP_PROTOCOL must be grpc (OTLP over gRPC), not {protocol!r}")
    if name == "otlp":
        # Loaded only when tracing is on: it brings the OTLP protos along.
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter()
    if name == "console":
        return ConsoleSpanExporter()
    raise ConfigError(f"OTEL_TRACES_EXPORTER must be otlp, console or none, not {name!r}")


def configure(service: str, env: Mapping[str, str]) -> None:
    """Traces the process when the environment asks for it; ConfigError for an exporter it
    does not know. OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES add to the resource."""
    if not requested(env):
        return
    exporter = exporter_for(env)
    provider = TracerProvider(resource=Resource.create({SERVICE_NAME: service}), sampler=sampler())
    provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    install(provider)


class CallsOnly(Sampler):
    """Leaves out statements run outside any traced call (reconciler passes, listeners): each
    would be a trace of its own, every few seconds. The rest is up to the inner sampler."""

    def __init__(self, inner: Sampler) -> None:
        self.inner = inner

    def should_sample(
        self,
        parent_context: Context | None,
        trace_id: int,
        name: str,
        kind: SpanKind | None = None,
        attributes: Attributes = None,
        links: Sequence[Link] | None = None,
        trace_state: TraceState | None = None,
    ) -> SamplingResult:
        orphan = not trace.get_current_span(parent_context).get_span_context().is_valid
        if orphan and kind is SpanKind.CLIENT and attributes and "db.system" in attributes:
            return SamplingResult(Decision.DROP)
        return self.inner.should_sample(parent_context, trace_id, name, kind, attributes, links, trace_state)

    def get_description(self) -> str:
        return f"CallsOnly{{{self.inner.get_description()}}}"


def sampler() -> Sampler:
    """The sampler OTEL_TRACES_SAMPLER (and _ARG) name, within CallsOnly."""
    return CallsOnly(TracerProvider(shutdown_on_exit=False).sampler)


def install(provider: TracerProvider) -> None:
    """Traces what follows with provider: servers started and channels opened from now on, and
    every asyncpg statement."""
    global _provider
    _provider = provider
    AsyncPGInstrumentor().instrument(tracer_provider=provider)  # type: ignore[no-untyped-call]


def uninstall() -> None:
    global _provider
    if _provider is not None:
        AsyncPGInstrumentor().uninstrument()  # type: ignore[no-untyped-call]
        _provider = None


def server_interceptors() -> list[Any]:
    """For grpc.aio.server, first in the list: the server span encloses everything else."""
    if _provider is None:
        return []
    return [aio_server_interceptor(tracer_provider=_provider, filter_=_TRACED)]  # type: ignore[no-untyped-call]


def client_interceptors() -> list[Any]:
    """For a channel's interceptors: a client span per call, its context sent as traceparent."""
    if _provider is None:
        return []
    return list(aio_client_interceptors(tracer_provider=_provider))  # type: ignore[no-untyped-call]
