"""Who a call comes from, for limits kept per caller.

Callers do not authenticate yet: until they do (the authenticated identity belongs here),
a caller is what it says in `x-blumpo-caller` (a gateway serving many users names each),
else the host it connects from. The header is taken as sent, so it spreads one client's
calls over names it chooses; process-wide limits still bound them all.
"""

from __future__ import annotations

from urllib.parse import unquote

from blumpo_common.server import Context

CALLER_HEADER = "x-blumpo-caller"
MAX_CALLER = 128


def caller_of(context: Context) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == CALLER_HEADER and isinstance(value, str) and value:
            return value[:MAX_CALLER]
    return peer_host(context.peer())


def peer_host(peer: str) -> str:
    """The host of a gRPC peer: "ipv4:10.0.0.7:50312" and "ipv6:[::1]:50312" lose the port."""
    kind, _, address = unquote(peer).partition(":")
    if kind in ("ipv4", "ipv6"):
        return address.rpartition(":")[0].strip("[]")
    return peer
