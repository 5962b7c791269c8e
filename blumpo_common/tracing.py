"""OpenTelemetry tracing: server and client spans of gRPC calls, and a span per database statement.

Off unless the standard OTEL_* variables ask for it (docs/observability.md): then spans go to
an OTLP collector over gRPC, and the W3C traceparent travels with every call a service makes.
Off, nothing is wrapped: the calls pay nothing for it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from opentelemetry import trace
from opentelemetry.instrumentation.asyncpg import AsyncPGInstrumentor
from opentelemetry.instrumentation.grpc import aio_client_interceptors, aio_server_interceptor, filters
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter

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
    """The exporter OTEL_TRACES_EXPORTER names: otlp (the default; its settings are the
    OTEL_EXPORTER_OTLP_* variables) or console."""
    name = env.get("OTEL_TRACES_EXPORTER", "").strip().lower() or "otlp"
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
    provider = TracerProvider(resource=Resource.create({SERVICE_NAME: service}))
    provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    install(provider)


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
