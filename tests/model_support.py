"""Running a Hypothesis state machine against the services the fixtures serve on the test's loop.

Hypothesis drives a state machine synchronously, while the servers, the stubs and the admin
connection live on pytest-asyncio's session loop. The machine runs in a worker thread and hands
each call to that loop, which keeps serving meanwhile (the test awaits the thread), so every call
goes over the fixtures' real channels to the real servers.
"""

from __future__ import annotations

import asyncio
import functools
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar, cast

import grpc
from google.rpc import error_details_pb2, status_pb2
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.errors import Flaky
from hypothesis.stateful import RuleBasedStateMachine, run_state_machine_as_test

from tests import support

T = TypeVar("T")
# One call from the machine may take this long before the step fails (the loop is shared).
CALL_TIMEOUT_SECONDS = 60.0


@dataclass(frozen=True)
class Refusal:
    """An error answer as a model predicts it: code, ErrorInfo reason and metadata."""

    code: grpc.StatusCode
    reason: str
    metadata: dict[str, str] = field(default_factory=dict)


def refusal_of_status(status: status_pb2.Status) -> Refusal:
    """The Refusal a per-entry google.rpc.Status of a batch carries."""
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            code = next(c for c in grpc.StatusCode if c.value[0] == status.code)
            return Refusal(code, info.reason, dict(info.metadata))
    raise AssertionError(f"no ErrorInfo in {status}")


async def answer(call: Awaitable[T]) -> T | Refusal:
    """The response of a call, or the Refusal it failed with."""
    try:
        return await call
    except grpc.aio.AioRpcError as error:
        info = support.error_info(error)
        return Refusal(error.code(), info.reason, dict(info.metadata))


@dataclass
class World:
    """What every example of a machine shares: the loop that serves the calls, and tallies."""

    loop: asyncio.AbstractEventLoop
    examples: int = 0
    steps: int = 0
    # What happened how often over all examples, so a run shows what it covered.
    seen: Counter[str] = field(default_factory=Counter)
    # Failures of steps whose outcome depends on timing (see `recorded`).
    failures: list[str] = field(default_factory=list)

    def run(self, call: Callable[[], Awaitable[T]]) -> T:
        """Makes the call on the test's loop and waits for its answer (a grpc.aio call must be
        made on the loop of its channel, not only awaited there)."""

        async def wait() -> T:
            return await call()

        return asyncio.run_coroutine_threadsafe(wait(), self.loop).result(CALL_TIMEOUT_SECONDS)

    def report(self, name: str) -> str:
        tally = ", ".join(f"{what} {count}" for what, count in sorted(self.seen.items()))
        return f"{name}: {self.examples} examples, {self.steps} steps; {tally}"


class InWorld(Protocol):
    world: World


def recorded(step: Callable[..., None]) -> Callable[..., None]:
    """Keeps a failure of the step in its world. A step whose outcome depends on timing (concurrent
    calls) may fail once and pass when Hypothesis replays it; Hypothesis then reports only that it
    is flaky, and run_machine shows the failure kept here."""

    @functools.wraps(step)
    def run(machine: InWorld, *args: Any, **kwargs: Any) -> None:
        try:
            step(machine, *args, **kwargs)
        except Exception as error:
            machine.world.failures.append(f"{step.__name__}: {error}")
            raise

    return run


def now_and_then(usual: st.SearchStrategy[T], rare: st.SearchStrategy[T], one_in: int) -> st.SearchStrategy[T]:
    """Draws from rare about once in one_in draws, else from usual (st.one_of weighs its branches
    by what they hold, not evenly)."""
    return st.sampled_from([False] * (one_in - 1) + [True]).flatmap(lambda rarely: rare if rarely else usual)


def machine_settings(max_examples: int, steps: int) -> settings:
    """Bounded for CI; no example database (nothing written under the work tree), no deadline
    (a call's time depends on the machine's load, not on what was drawn)."""
    return settings(
        max_examples=max_examples,
        stateful_step_count=steps,
        deadline=None,
        database=None,
        print_blob=True,
        suppress_health_check=[HealthCheck.too_slow],
    )


async def run_machine(world: World, factory: Callable[[], RuleBasedStateMachine], chosen: settings) -> None:
    """Runs the machine's examples in a worker thread while this loop serves its calls."""
    # Documented to take any callable that returns a machine, though typed as taking a class.
    machine = cast(type[RuleBasedStateMachine], factory)
    try:
        await asyncio.to_thread(run_state_machine_as_test, machine, settings=chosen)
    except Flaky as flaky:
        if not world.failures:
            raise
        raise AssertionError(
            f"a step failed, but not each time Hypothesis replayed it (a race?); the first failure: {world.failures[0]}"
        ) from flaky
