"""Every setting a service reads is in the one settings table of docs/operations.md."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import pytest

from generation_service import config as generation_config
from harness import ROOT
from token_service import config as token_config


class Asked(dict[str, str]):
    """An environment that remembers every name looked up in it."""

    def __init__(self, values: Mapping[str, str]) -> None:
        super().__init__(values)
        self.asked: set[str] = set()

    def get(self, key: str, default: Any = None) -> Any:
        self.asked.add(key)
        return super().get(key, default)

    def __getitem__(self, key: str) -> str:
        self.asked.add(key)
        return super().__getitem__(key)

    def __contains__(self, key: object) -> bool:
        if isinstance(key, str):
            self.asked.add(key)
        return super().__contains__(key)


DEVELOPMENT = {"BLUMPO_ENV": "development", "DATABASE_URL": "postgresql://owner@127.0.0.1:5432/blumpo"}
# With a relay and a password set, the settings that only matter then are read too.
WITH_MAIL = DEVELOPMENT | {
    "OTP_SMTP_HOST": "mail.example.com",
    "OTP_SMTP_FROM": "login@example.com",
    "OTP_SMTP_USER": "blumpo",
    "OTP_SMTP_PASSWORD": "x" * 16,
}


def documented() -> tuple[set[str], list[str]]:
    """The names in the settings table, and its wildcard prefixes (`OTEL_*`)."""
    text = (ROOT / "docs/operations.md").read_text()
    table = text.split("## Settings", 1)[1].split("\n## ", 1)[0]
    names: set[str] = set()
    prefixes: list[str] = []
    for row in table.splitlines():
        if not row.startswith("| `"):
            continue
        first_cell = row.split("|")[1]
        for name in re.findall(r"`([A-Z][A-Z0-9_]*\*?)`", first_cell):
            if name.endswith("*"):
                prefixes.append(name[:-1])
            else:
                names.add(name)
    return names, prefixes


def asked_by(load: Callable[[Mapping[str, str]], object]) -> Iterator[str]:
    for values in (DEVELOPMENT, WITH_MAIL):
        env = Asked(values)
        load(env)
        yield from env.asked


@pytest.mark.parametrize("load", [token_config.load, generation_config.load], ids=["token", "generation"])
def test_every_setting_read_is_in_the_table(load: Callable[[Mapping[str, str]], object]) -> None:
    names, prefixes = documented()
    asked = set(asked_by(load))
    assert len(asked) > 20, asked  # the recording sees the loaders' lookups
    missing = {n for n in asked if n not in names and not any(n.startswith(p) for p in prefixes)}
    assert not missing, f"settings read but not in docs/operations.md's table: {sorted(missing)}"
