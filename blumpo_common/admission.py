"""Which calls a server takes: a bounded number at once, and none once it drains for shutdown.

Beyond the bound a call is refused at once (RESOURCE_EXHAUSTED with RetryInfo) rather than
queued: a queue longer than the pool can work through only makes every call late, until all
of them miss their deadlines.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager

from blumpo_common.errors import overloaded, shutting_down


class Admission:
    def __init__(self, max_calls: int) -> None:
        self.max_calls = max_calls
        self.in_flight = 0
        self.draining = False
        self._idle = asyncio.Event()
        self._idle.set()

    def check_open(self) -> None:
        """Raises the refusal of a new call while draining."""
        if self.draining:
            raise shutting_down()

    @contextmanager
    def admit(self) -> Iterator[None]:
        """Holds one of the places for a call while it runs; raises the refusal when there is none."""
        self.check_open()
        if self.in_flight >= self.max_calls:
            raise overloaded(self.max_calls)
        self.in_flight += 1
        self._idle.clear()
        try:
            yield
        finally:
            self.in_flight -= 1
            if self.in_flight == 0:
                self._idle.set()

    async def drain(self, seconds: float) -> bool:
        """Refuses new calls from now on and waits (at most seconds) until the admitted ones are
        done; False when some are still running."""
        self.draining = True
        try:
            await asyncio.wait_for(self._idle.wait(), seconds)
        except TimeoutError:
            return False
        return True
