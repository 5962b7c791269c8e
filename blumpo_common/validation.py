"""Request checks that collect every bad field before answering INVALID_ARGUMENT."""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping
from typing import TypeVar

from blumpo_common.errors import ServiceError, invalid_argument

_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
MAX_PAGE_SIZE = 500

T = TypeVar("T")


class Checker:
    """Accumulates (field, description) violations; done() raises them all at once."""

    def __init__(self, prefix: str = "") -> None:
        self.prefix = prefix
        self.violations: list[tuple[str, str]] = []

    def add(self, field: str, why: str) -> None:
        self.violations.append((self.prefix + field, why))

    def uuid(self, field: str, value: str) -> uuid.UUID:
        """A required id; returns the nil UUID when bad (the call fails at done())."""
        if not value:
            self.add(field, "is required")
        elif not _UUID.match(value):
            self.add(field, "must be a UUID in canonical lowercase form with hyphens")
        else:
            return uuid.UUID(value)
        return uuid.UUID(int=0)

    def text(self, field: str, value: str, max_len: int, min_len: int = 1, printable: bool = True) -> str:
        if len(value) < min_len:
            self.add(field, "is required" if min_len == 1 else f"must be at least {min_len} characters")
        elif len(value) > max_len:
            self.add(field, f"must be at most {max_len} characters, got {len(value)}")
        elif printable and not value.isprintable():
            self.add(field, "must contain only printable characters")
        return value

    def in_range(self, field: str, value: int, low: int, high: int) -> int:
        if not low <= value <= high:
            self.add(field, f"must be between {low} and {high}, got {value}")
        return value

    def choice(self, field: str, value: int, names: Mapping[int, T]) -> T | None:
        """An enum value; UNSPECIFIED (absent from names) is rejected."""
        if value not in names:
            self.add(field, "must be set to a known value (UNSPECIFIED is not allowed)")
            return None
        return names[value]

    def page_size(self, field: str, value: int, default: int) -> int:
        if value == 0:
            return default
        return self.in_range(field, value, 1, MAX_PAGE_SIZE)

    def error(self) -> ServiceError | None:
        return invalid_argument(self.violations) if self.violations else None

    def done(self) -> None:
        error = self.error()
        if error is not None:
            raise error
