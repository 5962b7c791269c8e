"""Conversions between datetimes and google.protobuf.Timestamp."""

from __future__ import annotations

from datetime import UTC, datetime

from google.protobuf.timestamp_pb2 import Timestamp


def to_proto(value: datetime | None) -> Timestamp | None:
    if value is None:
        return None
    stamp = Timestamp()
    stamp.FromDatetime(value)
    return stamp


def from_proto(value: Timestamp) -> datetime:
    return value.ToDatetime(tzinfo=UTC)
