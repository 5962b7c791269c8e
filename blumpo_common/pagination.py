"""Opaque keyset page tokens.

A token carries the sort key of the last row of a page and a keyed digest of that
key and of the query it belongs to, so an edited token or one reused for another
query is refused. Tokens hold no secret: the digest guards integrity only.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar

from google.protobuf.message import Message

from blumpo_common.errors import invalid_argument

T = TypeVar("T")

# A page stays under gRPC's default 4 MiB limit on a received message, whatever its rows hold.
MAX_PAGE_BYTES = 3 * 1024 * 1024

_KEY = b"blumpo-page-token-v1"
_DIGEST_BYTES = 16


def _digest(scope: str, payload: bytes) -> bytes:
    return hashlib.blake2b(scope.encode() + b"\0" + payload, key=_KEY, digest_size=_DIGEST_BYTES).digest()


def encode(scope: str, key: Sequence[Any]) -> str:
    payload = json.dumps(list(key), separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(_digest(scope, payload) + payload).decode().rstrip("=")


def decode(scope: str, token: str, field: str = "page_token") -> list[Any] | None:
    """The key of an encoded token, None for an empty one; INVALID_ARGUMENT if tampered."""
    if not token:
        return None
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        digest, payload = raw[:_DIGEST_BYTES], raw[_DIGEST_BYTES:]
        if hmac.compare_digest(digest, _digest(scope, payload)):
            key = json.loads(payload)
            if isinstance(key, list):
                return key
    except (binascii.Error, ValueError):
        pass
    raise invalid_argument([(field, "is not a page token issued for this query")])


def encode_after(scope: str, moment: datetime, tiebreak: str | int) -> str:
    """A token for the rows after (moment, tiebreak) in a newest-first keyset list."""
    return encode(scope, [moment.isoformat(), tiebreak])


def next_page_token(scope: str, keys: Sequence[tuple[datetime, str | int]], page_size: int) -> str:
    """For rows fetched one beyond the page (given by their keys): the next page's token, empty at the end."""
    if len(keys) <= page_size:
        return ""
    return encode_after(scope, *keys[page_size - 1])


def fitting(messages: Sequence[Message], budget: int = MAX_PAGE_BYTES) -> int:
    """How many of the messages, from the first, one page carries (always at least one)."""
    total = 0
    for count, message in enumerate(messages):
        total += message.ByteSize() + 8  # with its field tag and length
        if total > budget and count > 0:
            return count
    return len(messages)


M = TypeVar("M", bound=Message)


def page(
    scope: str,
    found: Sequence[T],
    page_size: int,
    message: Callable[[T], M],
    key: Callable[[T], tuple[datetime, str | int]],
) -> tuple[list[M], str]:
    """A page of messages from rows fetched one beyond page_size, and the next page's token."""
    messages = [message(item) for item in found[:page_size]]
    size = fitting(messages)
    return messages[:size], next_page_token(scope, [key(item) for item in found], size)


def decode_after(scope: str, token: str, tiebreak: Callable[[Any], T]) -> tuple[datetime, T] | None:
    """The (moment, tiebreak) of a token from encode_after; None for an empty token."""
    key = decode(scope, token)
    if key is None:
        return None
    try:
        moment, after = datetime.fromisoformat(key[0]), tiebreak(key[1])
        # Anyone can sign a key (the digest holds no secret): check it is one the query can take.
        if moment.tzinfo is not None and not (isinstance(after, int) and not -(2**63) <= after < 2**63):
            moment.astimezone(UTC)  # OverflowError at the ends of the calendar
            return moment, after
    except (IndexError, TypeError, ValueError, OverflowError):
        pass
    raise invalid_argument([("page_token", "is not a page token issued for this query")])
