"""One vocabulary: each state kind is named alike by the proto enum, the Python enum and the
migration's CHECK constraint (read from the database catalog, not from the migration's text)."""

from __future__ import annotations

import enum
import re
from typing import Any

import asyncpg
import pytest

from blumpo.generation.v1 import generation_pb2 as gpb
from blumpo.token.v1 import token_pb2 as tpb
from blumpo_common.enums import ProtoEnum
from generation_service import rules
from generation_service.model import ImageFormat, JobState, RefundState, VariantKind
from token_service.model import LedgerReason

CHECK_VALUES = """
SELECT pg_get_constraintdef(c.oid)
FROM pg_constraint c
JOIN pg_class t ON t.oid = c.conrelid
JOIN pg_namespace n ON n.oid = t.relnamespace
WHERE c.contype = 'c' AND n.nspname = $1 AND t.relname = $2
  AND c.conkey = ARRAY[(SELECT attnum FROM pg_attribute WHERE attrelid = t.oid AND attname = $3)]
"""


async def allowed_by_check(admin: asyncpg.Connection, schema: str, table: str, column: str) -> set[str]:
    """The values the single-column CHECK constraint of that column lists."""
    [definition] = [r[0] for r in await admin.fetch(CHECK_VALUES, schema, table, column)]
    return set(re.findall(r"'([^']*)'::text", definition))


def names(domain: type[enum.StrEnum]) -> set[str]:
    return {member.value for member in domain}


def proto_names(proto: Any, domain: type[enum.StrEnum]) -> set[str]:
    return {member.value for member in ProtoEnum(proto, domain).by_member}


@pytest.mark.parametrize(
    ("schema", "table", "column", "domain"),
    [
        ("generation", "generation_job", "status", JobState),
        ("generation", "generation_job", "refund_state", RefundState),
        ("generation", "asset_image_variant", "kind", VariantKind),
        ("token", "token_ledger", "reason", LedgerReason),
    ],
)
async def test_python_enum_is_the_check_constraint(
    admin: asyncpg.Connection, schema: str, table: str, column: str, domain: type[enum.StrEnum]
) -> None:
    assert names(domain) == await allowed_by_check(admin, schema, table, column)


async def test_image_formats_and_their_mime_types_are_the_check_constraint(admin: asyncpg.Connection) -> None:
    for table in ("asset_image", "asset_image_variant"):
        definition = await admin.fetchval(
            "SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE conname = $1", f"{table}_format_mime"
        )
        pairs = set(re.findall(r"format = '([A-Z]+)'::text\) AND \(mime_type = '(image/[a-z]+)'::text", definition))
        assert pairs == {(f.value, f.mime_type) for f in ImageFormat}


@pytest.mark.parametrize(
    ("proto", "domain", "expected"),
    [
        # Jobs being charged or refused are never shown: the proto names the visible states only.
        (gpb.JobStatus, JobState, {s.value for s in rules.VISIBLE}),
        (gpb.ImageFormat, ImageFormat, names(ImageFormat)),
        (gpb.VariantKind, VariantKind, names(VariantKind)),
        (tpb.LedgerReason, LedgerReason, names(LedgerReason)),
    ],
)
def test_proto_enum_is_the_python_enum(proto: Any, domain: type[enum.StrEnum], expected: set[str]) -> None:
    assert proto_names(proto, domain) == expected
    # Every proto value but UNSPECIFIED maps, both ways.
    mapping = ProtoEnum(proto, domain)
    assert set(mapping.by_number) == {n for _, n in proto.items() if n != 0}
    assert all(mapping.from_proto(mapping.to_proto(m)) is m for m in mapping.by_member)
