"""Who a call comes from: the name permissions, limits and the ledger's audit trail use.

With mutual TLS the caller is the name its verified certificate holds (tls.identity); any
header naming a caller is then ignored. In development without TLS the caller is what
`x-blumpo-caller` says, and `development` without it. The server's interceptor works the
name out once per call and keeps it in `current` for everything the call runs.
"""

from __future__ import annotations

import contextvars
from typing import Any
from urllib.parse import unquote

import grpc

from blumpo_common import tls

CALLER_HEADER = "x-blumpo-caller"
MAX_CALLER = 128
DEVELOPMENT_CALLER = "development"
# A verified certificate that names nobody: no policy grants it anything.
UNNAMED = "(unnamed)"

current: contextvars.ContextVar[str | None] = contextvars.ContextVar("caller", default=None)


def identify(context: grpc.aio.ServicerContext[Any, Any], mutual_tls: bool) -> str:
    """The caller of the call being served (see the module's docstring)."""
    if mutual_tls:
        pems = list((context.auth_context() or {}).get("x509_pem_cert") or ())
        name = tls.identity(pems[0]) if pems else None
        return (name or UNNAMED)[:MAX_CALLER]
    for key, value in context.invocation_metadata() or ():
        if key == CALLER_HEADER and isinstance(value, str) and value:
            return value[:MAX_CALLER]
    return DEVELOPMENT_CALLER


def caller_of(context: grpc.aio.ServicerContext[Any, Any]) -> str:
    """The caller as the interceptor identified it (without one: from the plaintext header)."""
    return current.get() or identify(context, mutual_tls=False)


def metadata_value(context: grpc.aio.ServicerContext[Any, Any], key: str, max_len: int) -> str:
    """A metadata value as sent (the first, bounded), or ""."""
    for name, value in context.invocation_metadata() or ():
        if name == key and isinstance(value, str):
            return value[:max_len]
    return ""


def peer_host(peer: str) -> str:
    """The host of a gRPC peer: "ipv4:10.0.0.7:50312" and "ipv6:[::1]:50312" lose the port."""
    kind, _, address = unquote(peer).partition(":")
    if kind in ("ipv4", "ipv6"):
        return address.rpartition(":")[0].strip("[]")
    return peer
