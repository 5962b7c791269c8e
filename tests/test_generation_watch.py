"""WatchGenerationJob over real streams, woken by LISTEN/NOTIFY: one read per change for all
watchers of a job, limits per caller and per process, idle streams, shutdown."""

from __future__ import annotations

import asyncio
import dataclasses
import signal
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import pytest

from blumpo.generation.v1 import generation_pb2 as gpb
from blumpo.generation.v1 import generation_pb2_grpc
from blumpo_common import server
from blumpo_common.callers import peer_host
from blumpo_common.config import ConfigError
from generation_service import config as generation_config
from generation_service.model import Job
from generation_service.server import Parts, service
from generation_service.watch import Hub, ReadJob, WatchSettings
from harness.processes import ServiceProcess, free_port
from tests import support
from tests.certificates import production_security
from tests.generation_support import GenerationStub, TokenStub, claim_this
from tests.generation_support import lane_job as create_job

STEP_SECONDS = 5.0
# Watch streams are long-lived; their calls get a deadline well past every wait below.
STREAM_TIMEOUT = 60.0


async def _move(generation: GenerationStub, job_id: str, status: int) -> None:
    """RUNNING: claimed by a worker (the jobs here are each in a lane of their own); other
    statuses: asked for under the job's current lease."""
    job = (await generation.GetGenerationJob(gpb.GetGenerationJobRequest(job_id=job_id))).job
    if status == gpb.JOB_STATUS_RUNNING:
        await claim_this(generation, job)
        return
    request = gpb.UpdateGenerationJobStatusRequest(job_id=job_id, status=status, lease_id=job.lease_id)  # type: ignore[arg-type]
    await generation.UpdateGenerationJobStatus(request)


async def test_watcher_sees_each_status_in_order_and_the_stream_ends(
    generation: GenerationStub, token: TokenStub, generation_parts: Parts
) -> None:
    await asyncio.wait_for(generation_parts.hub.listening.wait(), STEP_SECONDS)
    user_id = await support.user_with_balance(token, 10)
    job = await create_job(generation, user_id)
    stream = generation.WatchGenerationJob(gpb.WatchGenerationJobRequest(job_id=job.job_id), timeout=30)
    seen = []
    moves = iter([gpb.JOB_STATUS_RUNNING, gpb.JOB_STATUS_SUCCEEDED])
    started = asyncio.get_running_loop().time()
    async for response in stream:
        seen.append(response.job.status)
        next_status = next(moves, None)
        if next_status is not None:
            await _move(generation, job.job_id, next_status)
    elapsed = asyncio.get_running_loop().time() - started
    assert seen == [gpb.JOB_STATUS_QUEUED, gpb.JOB_STATUS_RUNNING, gpb.JOB_STATUS_SUCCEEDED]
    assert await stream.code() == grpc.StatusCode.OK
    # Woken by notifications, not by the fallback poll.
    assert elapsed < 2.0, elapsed
    assert generation_parts.hub.count == 0


async def test_many_watchers_share_one_listener(
    generation: GenerationStub, token: TokenStub, generation_parts: Parts
) -> None:
    user_id = await support.user_with_balance(token, 10)
    job = await create_job(generation, user_id)
    await _move(generation, job.job_id, gpb.JOB_STATUS_RUNNING)

    async def watch() -> list[int]:
        call = generation.WatchGenerationJob(gpb.WatchGenerationJobRequest(job_id=job.job_id), timeout=30)
        return [r.job.status async for r in call]

    watchers = [asyncio.create_task(watch()) for _ in range(25)]
    for _ in range(100):
        if generation_parts.hub.count >= 25:
            break
        await asyncio.sleep(0.02)
    assert generation_parts.hub.count >= 25
    await _move(generation, job.job_id, gpb.JOB_STATUS_FAILED)
    results = await asyncio.wait_for(asyncio.gather(*watchers), STEP_SECONDS)
    assert all(r == [gpb.JOB_STATUS_RUNNING, gpb.JOB_STATUS_FAILED] for r in results)


async def test_terminal_job_sends_once_and_ends(generation: GenerationStub, token: TokenStub) -> None:
    user_id = await support.user_with_balance(token, 10)
    job = await create_job(generation, user_id)
    await _move(generation, job.job_id, gpb.JOB_STATUS_FAILED)
    call = generation.WatchGenerationJob(gpb.WatchGenerationJobRequest(job_id=job.job_id), timeout=10)
    assert [r.job.status async for r in call] == [gpb.JOB_STATUS_FAILED]


async def test_cancelled_watch_releases_its_subscription(
    generation: GenerationStub, token: TokenStub, generation_parts: Parts
) -> None:
    user_id = await support.user_with_balance(token, 10)
    job = await create_job(generation, user_id)
    before = generation_parts.hub.count
    call = generation.WatchGenerationJob(gpb.WatchGenerationJobRequest(job_id=job.job_id), timeout=30)
    first = await call.read()
    assert isinstance(first, gpb.WatchGenerationJobResponse) and first.job.status == gpb.JOB_STATUS_QUEUED
    assert generation_parts.hub.count == before + 1
    call.cancel()
    for _ in range(100):
        if generation_parts.hub.count == before:
            break
        await asyncio.sleep(0.02)
    assert generation_parts.hub.count == before


@pytest.mark.parametrize(
    ("job_id", "code"),
    [(str(uuid.uuid4()), grpc.StatusCode.NOT_FOUND), ("nope", grpc.StatusCode.INVALID_ARGUMENT)],
    ids=["unknown", "malformed"],
)
async def test_watch_errors(generation: GenerationStub, job_id: str, code: grpc.StatusCode) -> None:
    call = generation.WatchGenerationJob(gpb.WatchGenerationJobRequest(job_id=job_id), timeout=10)
    error = await support.expect_error(call.read(), code)
    assert support.error_info(error).domain == "blumpo.generation"


# A server of its own per test below: its hub has the test's settings and read, and is fresh,
# so its safety poll (once a minute) does not fire while the test counts reads.


@dataclasses.dataclass
class WatchServer:
    generation: GenerationStub
    running: server.RunningServer
    hub: Hub


@asynccontextmanager
async def watch_server(
    generation_parts: Parts, settings: WatchSettings, read: ReadJob | None = None
) -> AsyncIterator[WatchServer]:
    hub = Hub(generation_parts.hub.config, read or generation_parts.store.get_job, settings)
    wired = dataclasses.replace(generation_parts, hub=hub)
    running = await server.start(service(wired), generation_parts.store.pool, "127.0.0.1:0")
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            await asyncio.wait_for(hub.listening.wait(), STEP_SECONDS)
            yield WatchServer(generation_pb2_grpc.GenerationServiceStub(channel), running, hub)
    finally:
        await running.stop(1)


def _watch(generation: GenerationStub, job_id: str, caller: str | None = None) -> grpc.aio.UnaryStreamCall:  # type: ignore[type-arg]
    metadata = () if caller is None else (("x-blumpo-caller", caller),)
    call: grpc.aio.UnaryStreamCall = generation.WatchGenerationJob(  # type: ignore[type-arg]
        gpb.WatchGenerationJobRequest(job_id=job_id), timeout=STREAM_TIMEOUT, metadata=metadata
    )
    return call


async def _next_status(call: grpc.aio.UnaryStreamCall) -> int:  # type: ignore[type-arg]
    response = await asyncio.wait_for(call.read(), STEP_SECONDS)
    assert isinstance(response, gpb.WatchGenerationJobResponse), response
    return int(response.job.status)


async def _rest(call: grpc.aio.UnaryStreamCall, seconds: float = STEP_SECONDS) -> list[int]:  # type: ignore[type-arg]
    """The statuses a stream still sends until it ends (which it must within seconds)."""

    async def drain() -> list[int]:
        statuses = []
        # Anything else read is grpc.aio.EOF (which the stubs do not name).
        while isinstance(response := await call.read(), gpb.WatchGenerationJobResponse):
            statuses.append(int(response.job.status))
        return statuses

    return await asyncio.wait_for(drain(), seconds)


WATCHERS = 200


async def test_a_change_is_read_once_for_all_watchers_of_the_job(generation_parts: Parts, token: TokenStub) -> None:
    reads: Counter[uuid.UUID] = Counter()

    async def counted_read(job_id: uuid.UUID) -> Job | None:
        reads[job_id] += 1
        return await generation_parts.store.get_job(job_id)

    settings = WatchSettings(max_per_caller=WATCHERS)
    async with watch_server(generation_parts, settings, counted_read) as ws:
        user_id = await support.user_with_balance(token, 10)
        job = await create_job(ws.generation, user_id)
        job_id = uuid.UUID(job.job_id)
        calls = [_watch(ws.generation, job.job_id) for _ in range(WATCHERS)]
        firsts = await asyncio.gather(*(_next_status(c) for c in calls))
        assert firsts == [gpb.JOB_STATUS_QUEUED] * WATCHERS
        assert ws.hub.count == WATCHERS
        # Connecting watchers share reads too: a fresh one only after a notification.
        connect_reads = reads[job_id]
        assert 1 <= connect_reads <= 3, connect_reads

        for step, status in enumerate((gpb.JOB_STATUS_RUNNING, gpb.JOB_STATUS_SUCCEEDED), start=1):
            await _move(ws.generation, job.job_id, status)
            seen = await asyncio.gather(*(_next_status(c) for c in calls))
            assert seen == [status] * WATCHERS
            assert reads[job_id] == connect_reads + step, (step, reads[job_id], connect_reads)
        ends = await asyncio.gather(*(_rest(c) for c in calls))
        assert ends == [[]] * WATCHERS
        assert {await c.code() for c in calls} == {grpc.StatusCode.OK}
        assert ws.hub.count == 0 and ws.hub.feeds == {}


async def test_a_caller_at_its_limit_is_refused_while_others_still_watch(
    generation_parts: Parts, token: TokenStub
) -> None:
    async with watch_server(generation_parts, WatchSettings(max_per_caller=3)) as ws:
        job = await create_job(ws.generation, await support.user_with_balance(token, 10))
        alice = [_watch(ws.generation, job.job_id, "alice") for _ in range(3)]
        assert [await _next_status(c) for c in alice] == [gpb.JOB_STATUS_QUEUED] * 3

        refused = await support.expect_error(
            _watch(ws.generation, job.job_id, "alice").read(), grpc.StatusCode.RESOURCE_EXHAUSTED, "TOO_MANY_WATCHERS"
        )
        assert support.error_info(refused).metadata["limit"] == "caller"
        assert support.retry_delay_seconds(refused) > 0
        # Another caller, named or not, still watches the same job.
        bob = _watch(ws.generation, job.job_id, "bob")
        unnamed = [_watch(ws.generation, job.job_id) for _ in range(3)]
        assert [await _next_status(c) for c in [bob, *unnamed]] == [gpb.JOB_STATUS_QUEUED] * 4
        # Unnamed calls (development without TLS) are all the caller `development`, with a limit of its own.
        await support.expect_error(
            _watch(ws.generation, job.job_id).read(), grpc.StatusCode.RESOURCE_EXHAUSTED, "TOO_MANY_WATCHERS"
        )
        assert ws.hub.per_caller == {"alice": 3, "bob": 1, "development": 3}

        # A stream that ends gives its place back.
        alice[0].cancel()
        for _ in range(100):
            if ws.hub.per_caller["alice"] == 2:
                break
            await asyncio.sleep(0.02)
        again = _watch(ws.generation, job.job_id, "alice")
        assert await _next_status(again) == gpb.JOB_STATUS_QUEUED
        for call in [*alice, bob, *unnamed, again]:
            call.cancel()


async def test_the_process_cap_holds_across_callers(generation_parts: Parts, token: TokenStub) -> None:
    async with watch_server(generation_parts, WatchSettings(max_per_caller=10, max_total=2)) as ws:
        job = await create_job(ws.generation, await support.user_with_balance(token, 10))
        held = [_watch(ws.generation, job.job_id, caller) for caller in ("a", "b")]
        assert [await _next_status(c) for c in held] == [gpb.JOB_STATUS_QUEUED] * 2
        refused = await support.expect_error(
            _watch(ws.generation, job.job_id, "c").read(), grpc.StatusCode.RESOURCE_EXHAUSTED, "TOO_MANY_WATCHERS"
        )
        assert support.error_info(refused).metadata["limit"] == "process"
        assert support.retry_delay_seconds(refused) > 0
        for call in held:
            call.cancel()


IDLE_SECONDS = 1.0


@pytest.mark.parametrize("status", [gpb.JOB_STATUS_RUNNING, gpb.JOB_STATUS_PAUSED], ids=["running", "paused"])
async def test_an_idle_stream_ends_with_its_last_state(generation_parts: Parts, token: TokenStub, status: int) -> None:
    async with watch_server(generation_parts, WatchSettings(idle_seconds=IDLE_SECONDS)) as ws:
        job = await create_job(ws.generation, await support.user_with_balance(token, 10))
        await _move(ws.generation, job.job_id, status)
        loop = asyncio.get_running_loop()
        started = loop.time()
        call = _watch(ws.generation, job.job_id)
        assert await _rest(call, IDLE_SECONDS + 10) == [status]
        assert await call.code() == grpc.StatusCode.OK
        assert loop.time() - started >= IDLE_SECONDS
        assert ws.hub.count == 0


async def test_a_change_restarts_the_idle_time(generation_parts: Parts, token: TokenStub) -> None:
    idle = 2.0
    async with watch_server(generation_parts, WatchSettings(idle_seconds=idle)) as ws:
        job = await create_job(ws.generation, await support.user_with_balance(token, 10))
        call = _watch(ws.generation, job.job_id)
        assert await _next_status(call) == gpb.JOB_STATUS_QUEUED
        await asyncio.sleep(idle / 2)
        loop = asyncio.get_running_loop()
        moved = loop.time()
        await _move(ws.generation, job.job_id, gpb.JOB_STATUS_PAUSED)
        assert await _rest(call, idle + 10) == [gpb.JOB_STATUS_PAUSED]
        assert await call.code() == grpc.StatusCode.OK
        # Idle time counts from the last change sent, which came after the move was asked.
        assert loop.time() - moved >= idle


async def test_shutdown_ends_open_streams_at_once(generation_parts: Parts, token: TokenStub) -> None:
    grace = 10.0
    async with watch_server(generation_parts, WatchSettings()) as ws:
        user_id = await support.user_with_balance(token, 10)
        jobs = [await create_job(ws.generation, user_id) for _ in range(4)]
        calls = [_watch(ws.generation, job.job_id) for job in jobs for _ in range(5)]
        assert await asyncio.gather(*(_next_status(c) for c in calls)) == [gpb.JOB_STATUS_QUEUED] * len(calls)
        loop = asyncio.get_running_loop()
        started = loop.time()
        await ws.running.stop(grace)
        elapsed = loop.time() - started
        # Each stream ends cleanly with the state it last had, and stop does not wait out the grace.
        assert await asyncio.gather(*(_rest(c) for c in calls)) == [[]] * len(calls)
        assert {await c.code() for c in calls} == {grpc.StatusCode.OK}
        assert elapsed < grace / 2, elapsed
        assert ws.hub.count == 0


@pytest.mark.slow
async def test_sigterm_with_open_streams_exits_well_within_the_grace(
    database_url: str, token_address: str, token: TokenStub, tmp_path: Path
) -> None:
    grace = 20
    port = free_port()
    env = {
        "DATABASE_URL": database_url,
        "LOG_LEVEL": "WARNING",
        "GENERATION_LISTEN_ADDR": f"127.0.0.1:{port}",
        "GENERATION_METRICS_ADDR": f"127.0.0.1:{free_port()}",
        "TOKEN_SERVICE_TARGET": token_address,
        "SHUTDOWN_GRACE_SECONDS": str(grace),
    }
    process = ServiceProcess("generation_service", env, port, tmp_path / "generation.log")
    await process.start()
    loop = asyncio.get_running_loop()
    try:
        async with grpc.aio.insecure_channel(process.address) as channel:
            generation: GenerationStub = generation_pb2_grpc.GenerationServiceStub(channel)
            job = await create_job(generation, await support.user_with_balance(token, 10))
            calls = [_watch(generation, job.job_id) for _ in range(3)]
            assert [await _next_status(c) for c in calls] == [gpb.JOB_STATUS_QUEUED] * 3
            assert process.process is not None
            started = time.monotonic()
            process.process.send_signal(signal.SIGTERM)
            assert await asyncio.gather(*(_rest(c) for c in calls)) == [[]] * 3
            assert {await c.code() for c in calls} == {grpc.StatusCode.OK}
            code = await loop.run_in_executor(None, process.process.wait, grace + 10)
            elapsed = time.monotonic() - started
        assert code == 0 and elapsed < grace / 4, f"exit {code} after {elapsed:.1f}s\n{process.logs()[-1500:]}"
        process.process = None
    finally:
        process.stop()


@pytest.mark.parametrize(
    ("peer", "host"),
    [
        ("ipv4:10.0.0.7:50312", "10.0.0.7"),
        ("ipv6:[::1]:50312", "::1"),
        ("ipv6:%5B2001:db8::1%5D:443", "2001:db8::1"),
        ("unix:/run/blumpo.sock", "unix:/run/blumpo.sock"),
    ],
)
def test_peer_host(peer: str, host: str) -> None:
    assert peer_host(peer) == host


BASE_ENV = {
    "GENERATION_DATABASE_URL": "postgresql://generation_service@127.0.0.1:5432/blumpo",
    "PAGE_TOKEN_SECRET": "s" * 32,
    **production_security(),
}


def test_watch_settings_defaults_and_overrides() -> None:
    defaults = WatchSettings(max_per_caller=100, max_total=10_000, idle_seconds=300)
    assert generation_config.load(BASE_ENV).watch == defaults
    loaded = generation_config.load(
        {**BASE_ENV, "WATCH_MAX_PER_CALLER": "5", "WATCH_MAX_TOTAL": "50", "WATCH_IDLE_SECONDS": "30"}
    )
    assert loaded.watch == WatchSettings(max_per_caller=5, max_total=50, idle_seconds=30)


@pytest.mark.parametrize(
    ("name", "value"),
    [("WATCH_MAX_PER_CALLER", "0"), ("WATCH_MAX_TOTAL", "many"), ("WATCH_IDLE_SECONDS", "0")],
)
def test_malformed_watch_settings_name_themselves(name: str, value: str) -> None:
    with pytest.raises(ConfigError, match=name):
        generation_config.load({**BASE_ENV, name: value})
