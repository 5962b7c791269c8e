"""Structured (JSON lines) logging, with the request id of the call being served (and its trace
id when traced) and RFC 3339 UTC times to the millisecond (2026-11-26T11:02:03.123Z)."""

from __future__ import annotations

import contextvars
import logging
import sys
import time
from typing import TextIO

from opentelemetry import trace
from pythonjsonlogger.json import JsonFormatter

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")


class CallFields(logging.Filter):
    """Adds the request id of the call being served, and its trace id when it is traced."""

    def filter(self, record: logging.LogRecord) -> bool:
        rid = request_id.get()
        if rid and not hasattr(record, "request_id"):
            record.request_id = rid
        span = trace.get_current_span().get_span_context()
        if span.is_valid:
            record.trace_id = format(span.trace_id, "032x")
        return True


class _Formatter(JsonFormatter):
    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return f"{time.strftime('%Y-%m-%dT%H:%M:%S', time.gmtime(record.created))}.{int(record.msecs):03d}Z"


def handler(service: str, stream: TextIO = sys.stderr) -> logging.Handler:
    """Writes a service's records to stream as JSON lines."""
    made = logging.StreamHandler(stream)
    made.setFormatter(
        _Formatter(
            "{asctime}{levelname}{name}{message}",
            style="{",
            rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
            static_fields={"service": service},
        )
    )
    made.addFilter(CallFields())
    return made


def configure(service: str, level: str) -> None:
    root = logging.getLogger()
    root.handlers[:] = [handler(service)]
    root.setLevel(level)
