"""Opaque keyset page tokens, signed with the server's secret.

A token carries the sort key of the last row of a page, an instant and a tiebreak, and
HMAC-SHA256 under the service's PAGE_TOKEN_SECRET of that key and of the query it belongs to
(for example the user id), so an edited or forged token, or one reused for another query,
is refused. The key is still checked strictly once the signature holds: a token is a
canonical instant and a tiebreak of the exact expected type, or INVALID_ARGUMENT.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import secrets
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import TypeVar

from google.protobuf.message import Message

from blumpo_common.errors import ServiceError, invalid_argument

T = TypeVar("T")
M = TypeVar("M", bound=Message)

# A page stays under gRPC's default 4 MiB limit on a received message, whatever its rows hold.
MAX_PAGE_BYTES = 3 * 1024 * 1024
# Tokens this code issues are about 150 characters; nothing longer is even decoded, which also
# bounds how deeply a payload could nest.
MAX_TOKEN_CHARS = 512
SECRET_BYTES = 32

_CONTEXT = b"blumpo-page-token-v2\0"
_DIGEST_BYTES = hashlib.sha256().digest_size
_INT64 = range(-(2**63), 2**63)


def int64_tiebreak(value: object) -> int:
    """A tiebreak that is a JSON integer within int64 (not a bool, not a float)."""
    if type(value) is not int or value not in _INT64:
        raise ValueError("not an int64")
    return value


def uuid_tiebreak(value: object) -> uuid.UUID:
    """A tiebreak that is a canonical lowercase UUID string."""
    if type(value) is not str or len(value) != 36:
        raise ValueError("not a UUID")
    parsed = uuid.UUID(value)
    if str(parsed) != value:
        raise ValueError("not a canonical UUID")
    return parsed


def _moment(value: object) -> datetime:
    """An instant exactly as encode() writes it (isoformat with its UTC offset)."""
    if type(value) is not str or len(value) > 40:
        raise ValueError("not an instant")
    moment = datetime.fromisoformat(value)
    if moment.tzinfo is None or moment.isoformat() != value:
        raise ValueError("not an instant with an offset in canonical form")
    try:
        moment.astimezone(UTC)
    except OverflowError:  # past the ends of the calendar once in UTC
        raise ValueError("out of range") from None
    return moment


def _refused(field: str) -> ServiceError:
    return invalid_argument([(field, "is not a page token issued for this query")])


class PageTokens:
    """Issues and checks page tokens under one secret (the same on every replica of a service)."""

    def __init__(self, secret: bytes) -> None:
        self._secret = secret

    @classmethod
    def generated(cls) -> PageTokens:
        """Under a secret made up now: its tokens die with the process (development, tests)."""
        return cls(secrets.token_bytes(SECRET_BYTES))

    def __repr__(self) -> str:
        return "PageTokens(<secret>)"

    def _digest(self, scope: str, payload: bytes) -> bytes:
        return hmac.new(self._secret, _CONTEXT + scope.encode() + b"\0" + payload, hashlib.sha256).digest()

    def sign(self, scope: str, payload: bytes) -> str:
        """A token carrying payload (JSON bytes) for the query named by scope."""
        return base64.urlsafe_b64encode(self._digest(scope, payload) + payload).decode().rstrip("=")

    def encode(self, scope: str, moment: datetime, tiebreak: str | int) -> str:
        """A token for the rows after (moment, tiebreak) in a newest-first keyset list."""
        return self.sign(scope, json.dumps([moment.isoformat(), tiebreak], separators=(",", ":")).encode())

    def _payload(self, scope: str, token: str) -> object:
        """The signed JSON value of a token; ValueError for anything else."""
        if len(token) > MAX_TOKEN_CHARS or not token.isascii():
            raise ValueError("not a token")
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        except binascii.Error:
            raise ValueError("not base64") from None
        digest, payload = raw[:_DIGEST_BYTES], raw[_DIGEST_BYTES:]
        if not hmac.compare_digest(digest, self._digest(scope, payload)):
            raise ValueError("not signed for this query")
        return json.loads(payload)

    def decode(
        self, scope: str, token: str, tiebreak: Callable[[object], T], field: str = "page_token"
    ) -> tuple[datetime, T] | None:
        """The (moment, tiebreak) of a token from encode(); None for an empty token.
        Anything else is INVALID_ARGUMENT naming field. tiebreak raises ValueError for a
        value of the wrong type."""
        if not token:
            return None
        try:
            key = self._payload(scope, token)
            if type(key) is list and len(key) == 2:
                return _moment(key[0]), tiebreak(key[1])
        except ValueError:
            pass
        raise _refused(field)

    def next_page_token(self, scope: str, keys: Sequence[tuple[datetime, str | int]], page_size: int) -> str:
        """For rows fetched one beyond the page (given by their keys): the next page's token, empty at the end."""
        if len(keys) <= page_size:
            return ""
        return self.encode(scope, *keys[page_size - 1])

    def page(
        self,
        scope: str,
        found: Sequence[T],
        page_size: int,
        message: Callable[[T], M],
        key: Callable[[T], tuple[datetime, str | int]],
    ) -> tuple[list[M], str]:
        """A page of messages from rows fetched one beyond page_size, and the next page's token."""
        messages = [message(item) for item in found[:page_size]]
        size = fitting(messages)
        return messages[:size], self.next_page_token(scope, [key(item) for item in found], size)


def fitting(messages: Sequence[Message], budget: int = MAX_PAGE_BYTES) -> int:
    """How many of the messages, from the first, one page carries (always at least one)."""
    total = 0
    for count, message in enumerate(messages):
        total += message.ByteSize() + 8  # with its field tag and length
        if total > budget and count > 0:
            return count
    return len(messages)
