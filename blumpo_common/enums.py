"""Python enums of domain states and the proto enums that carry them on the wire.

A proto enum's values are `<PREFIX>_<NAME>` with `<PREFIX>_UNSPECIFIED` = 0; the domain
enum's values are the `<NAME>`s. The map between them is read from the descriptor, so
a state is spelled once in the proto and once in Python, and a test compares the two.
"""

from __future__ import annotations

import enum
from typing import Any, Generic, TypeVar

E = TypeVar("E", bound=enum.StrEnum)


class ProtoEnum(Generic[E]):
    """The two-way map between a proto enum (by number) and a domain StrEnum."""

    def __init__(self, proto: Any, domain: type[E]) -> None:
        """proto: the generated enum wrapper (e.g. generation_pb2.JobStatus)."""
        unspecified = proto.Name(0)
        assert unspecified.endswith("_UNSPECIFIED"), unspecified
        prefix = unspecified.removesuffix("UNSPECIFIED")
        self.domain = domain
        self.by_number: dict[int, E] = {
            number: domain(name.removeprefix(prefix)) for name, number in proto.items() if number != 0
        }
        self.by_member: dict[E, int] = {member: number for number, member in self.by_number.items()}

    def to_proto(self, member: E) -> Any:
        """The proto value of a member (typed Any: each generated enum has its own ValueType)."""
        return self.by_member[member]

    def from_proto(self, number: int) -> E | None:
        return self.by_number.get(number)
