"""Datetimes into google.protobuf.Timestamp: the same seconds and nanos as FromDatetime."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

from google.protobuf.timestamp_pb2 import Timestamp

from blumpo_common.timestamps import from_proto, to_proto


def test_to_proto_agrees_with_from_datetime() -> None:
    values = [
        datetime(2026, 11, 28, 10, 0, 0, 123456, tzinfo=UTC),
        datetime(2026, 11, 28, 10, 0, 0, 999999, tzinfo=timezone(timedelta(hours=-5))),
        datetime(1969, 12, 31, 23, 59, 59, 500000, tzinfo=UTC),  # before the epoch: nanos stay >= 0
        datetime(1, 1, 1, tzinfo=UTC),
        datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
        datetime(2026, 3, 1, 12, 30),  # naive: taken as UTC
    ]
    for value in values:
        expected = Timestamp()
        expected.FromDatetime(value)
        assert to_proto(value) == expected, value
        aware = value if value.tzinfo else value.replace(tzinfo=UTC)
        assert from_proto(expected) == aware


def test_to_proto_of_none_is_none() -> None:
    assert to_proto(None) is None
