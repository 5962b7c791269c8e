"""The ledger reasons: the proto enum and the domain enum name the same ones."""

from __future__ import annotations

from token_service.api import REASONS
from token_service.model import LedgerReason


def test_every_ledger_reason_has_one_proto_value_and_back() -> None:
    # Building REASONS already fails on a proto value without a domain reason.
    assert set(REASONS.by_member) == set(LedgerReason)
    assert all(REASONS.from_proto(REASONS.to_proto(reason)) is reason for reason in LedgerReason)
