"""Faults under load, checked the way Jepsen's bank test checks a database: both services run
as processes on a private PostgreSQL; for 30 s many clients make charges, credits, debits and
job moves, retrying carefully with the same ids, while the services are SIGKILLed, database
backends are cut and PostgreSQL is restarted once. Afterwards, once the reconciler has caught
up, the money and every acknowledged write are checked in the database itself.

Run by `make test-faults` (and `.ci/run`); `make test` leaves it out.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest

from blumpo.generation.v1 import generation_pb2 as gpb
from blumpo.generation.v1 import generation_pb2_grpc
from blumpo.token.v1 import token_pb2 as tpb
from blumpo.token.v1 import token_pb2_grpc
from harness import databases
from harness.cluster import PrivateCluster
from harness.processes import ServiceProcess, free_port
from tests.generation_support import add_test_prices, params_costing
from tests.support import GenerationStub, TokenStub

pytestmark = pytest.mark.faults

LOAD_SECONDS = 30.0
CLIENTS = 16
USERS = 8
START_BALANCE = 1_000
FAULT_EVERY_SECONDS = (2.0, 3.5)
# Codes after which a careful client asks again with the same ids: the outcome is unknown.
RETRY = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}
NEVER = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}
CALL_TIMEOUT = 5.0
RETRY_FOR_SECONDS = 40.0


@dataclass
class History:
    """What the clients were told: every answer's code, and each acknowledged write."""

    codes: Counter[str] = field(default_factory=Counter)
    never: list[str] = field(default_factory=list)
    entries: dict[str, tuple[str, int]] = field(default_factory=dict)  # reference -> (user, delta)
    jobs: dict[str, str] = field(default_factory=dict)  # acknowledged job id -> user
    failed: set[str] = field(default_factory=set)  # jobs acknowledged FAILED
    succeeded: set[str] = field(default_factory=set)
    faults: Counter[str] = field(default_factory=Counter)

    async def call(self, name: str, call: Callable[[], Awaitable[Any]]) -> Any | None:
        """Asks until a definite answer; None for a refusal (nothing written)."""
        give_up = time.monotonic() + RETRY_FOR_SECONDS
        pause = 0.05
        while True:
            try:
                answer = await call()
            except grpc.aio.AioRpcError as error:
                self.codes[error.code().name] += 1
                if error.code() in NEVER:
                    self.never.append(f"{name}: {error.code().name} {error.details()}")
                if error.code() not in RETRY:
                    return None
                if time.monotonic() > give_up:
                    raise AssertionError(f"{name} got no definite answer in {RETRY_FOR_SECONDS}s") from error
                await asyncio.sleep(pause * random.uniform(0.5, 1.5))
                pause = min(pause * 2, 1.0)
            else:
                self.codes["OK"] += 1
                return answer


class Services:
    def __init__(self, database_url: str, directory: Path) -> None:
        token_port, generation_port = free_port(), free_port()
        common = {"DATABASE_URL": database_url, "LOG_LEVEL": "WARNING", "SHUTDOWN_GRACE_SECONDS": "1"}
        self.token = ServiceProcess(
            "token_service",
            {
                **common,
                "TOKEN_LISTEN_ADDR": f"127.0.0.1:{token_port}",
                "TOKEN_METRICS_ADDR": f"127.0.0.1:{free_port()}",
            },
            token_port,
            directory / "token.log",
        )
        self.generation = ServiceProcess(
            "generation_service",
            {
                **common,
                "GENERATION_LISTEN_ADDR": f"127.0.0.1:{generation_port}",
                "GENERATION_METRICS_ADDR": f"127.0.0.1:{free_port()}",
                "TOKEN_SERVICE_TARGET": f"127.0.0.1:{token_port}",
                "TOKEN_CALL_BUDGET_MS": "1500",
                "CHARGE_CLAIM_MS": "4000",
                "RECONCILE_INTERVAL_MS": "200",
            },
            generation_port,
            directory / "generation.log",
        )


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[tuple[PrivateCluster, str, Services]]:
    server = PrivateCluster()
    server.start()
    url = server.url("blumpo_faults")
    databases.dbmate(url, "up")
    await add_test_prices(url)
    services = Services(url, tmp_path)
    await services.token.start()
    await services.generation.start()
    try:
        yield server, url, services
    finally:
        services.generation.stop()
        services.token.stop()
        server.destroy()


async def restart(process: ServiceProcess) -> None:
    if process.process is not None:
        process.kill()
    await process.start()


async def inject_faults(server: PrivateCluster, url: str, services: Services, history: History, until: float) -> None:
    """Kills, cuts and restarts on a random beat; PostgreSQL is restarted once, mid-run."""
    kinds = ["kill token", "kill generation", "cut backends"]
    restarted = False
    while time.monotonic() < until - 3:
        await asyncio.sleep(random.uniform(*FAULT_EVERY_SECONDS))
        if not restarted and time.monotonic() > until - LOAD_SECONDS / 2:
            kind, restarted = "restart postgres", True
        else:
            kind = random.choice(kinds)
        history.faults[kind] += 1
        if kind == "kill token":
            await restart(services.token)
        elif kind == "kill generation":
            await restart(services.generation)
        elif kind == "cut backends":
            conn = await asyncpg.connect(url)
            try:
                await conn.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                    " WHERE datname = current_database() AND pid <> pg_backend_pid()"
                )
            finally:
                await conn.close()
        else:
            await asyncio.to_thread(server.restart)


async def client(
    token: TokenStub, generation: GenerationStub, users: list[str], history: History, until: float
) -> None:
    """Mixed work; each write is asked for again with the same ids until it is answered."""
    while time.monotonic() < until:
        user = random.choice(users)
        roll = random.random()
        if roll < 0.3:
            reference, delta = f"fault-{uuid.uuid4()}", random.choice([-7, -3, 5, 11])
            append = tpb.AppendLedgerEntryRequest(
                user_id=user, delta=delta, reason=tpb.LEDGER_REASON_ADJUSTMENT, reference_id=reference
            )
            if await history.call("AppendLedgerEntry", partial(token.AppendLedgerEntry, append, timeout=CALL_TIMEOUT)):
                history.entries[reference] = (user, delta)
        elif roll < 0.7:
            create = gpb.CreateGenerationJobRequest(
                user_id=user,
                job_id=str(uuid.uuid4()),
                prompt="a lighthouse under faults",
                params=params_costing(cost := random.choice([1, 2, 5])),
                tokens_cost=cost,
            )
            answer = await history.call(
                "CreateGenerationJob", partial(generation.CreateGenerationJob, create, timeout=CALL_TIMEOUT)
            )
            if answer is not None:
                history.jobs[create.job_id] = user
        else:
            await work_one_job(generation, history)


async def work_one_job(generation: GenerationStub, history: History) -> None:
    claim = await history.call(
        "ClaimNextJob",
        lambda: generation.ClaimNextJob(
            gpb.ClaimNextJobRequest(worker_id="fault-worker", lease_seconds=30), timeout=CALL_TIMEOUT
        ),
    )
    if claim is None or not claim.HasField("job"):
        return
    target = random.choice([gpb.JOB_STATUS_SUCCEEDED, gpb.JOB_STATUS_FAILED])
    request = gpb.UpdateGenerationJobStatusRequest(
        job_id=claim.job.job_id, status=target, error_message="fault", lease_id=claim.job.lease_id
    )
    moved = await history.call(
        "UpdateGenerationJobStatus", lambda: generation.UpdateGenerationJobStatus(request, timeout=CALL_TIMEOUT)
    )
    if moved is not None:
        (history.failed if target == gpb.JOB_STATUS_FAILED else history.succeeded).add(claim.job.job_id)


async def caught_up(url: str, seconds: float = 60.0) -> None:
    """Until no charge and no refund is left unsettled."""
    conn = await asyncpg.connect(url)
    try:
        deadline = time.monotonic() + seconds
        while True:
            left = await conn.fetchval(
                "SELECT count(*) FROM generation.generation_job WHERE status = 'CHARGING' OR refund_state = 'PENDING'"
            )
            if left == 0:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"{left} charges or refunds still unsettled after {seconds}s")
            await asyncio.sleep(0.5)
    finally:
        await conn.close()


async def violations(url: str, history: History) -> dict[str, list[Any]]:
    """Every broken invariant, by name (empty lists when all hold)."""
    conn = await asyncpg.connect(url)
    try:
        found: dict[str, list[Any]] = {}
        found["balance differs from its ledger"] = await conn.fetch(
            "SELECT a.user_id, a.balance, coalesce(sum(l.delta), 0) AS ledger FROM token.token_account a"
            " LEFT JOIN token.token_ledger l USING (user_id) GROUP BY a.user_id, a.balance"
            " HAVING a.balance <> coalesce(sum(l.delta), 0) OR a.balance < 0"
        )
        found["reference with several entries"] = await conn.fetch(
            "SELECT user_id, reference_id FROM token.token_ledger GROUP BY 1, 2 HAVING count(*) > 1"
        )
        jobs = {
            str(r["id"]): r
            for r in await conn.fetch("SELECT id, status, refund_state, tokens_cost FROM generation.generation_job")
        }
        entries: Counter[str] = Counter()
        amounts: dict[str, int] = {}
        for r in await conn.fetch("SELECT reference_id, delta FROM token.token_ledger WHERE reason LIKE 'GENERATION%'"):
            entries[r["reference_id"]] += 1
            amounts[r["reference_id"]] = r["delta"]
        visible = {i for i, j in jobs.items() if j["status"] not in ("CHARGING", "REJECTED")}
        found["visible job without exactly one debit"] = [
            i for i in visible if entries[i] != 1 or amounts.get(i) != -jobs[i]["tokens_cost"]
        ]
        found["FAILED or CANCELLED job without exactly one refund"] = [
            i for i, j in jobs.items() if j["status"] in ("FAILED", "CANCELLED") and entries[f"{i}:refund"] != 1
        ]
        found["refund of a job that did not fail nor was cancelled"] = [
            i
            for i, j in jobs.items()
            if entries[f"{i}:refund"] and j["status"] not in ("FAILED", "CANCELLED", "REJECTED")
        ]
        found["debit without a visible job (or its refund)"] = [
            ref
            for ref in entries
            if not ref.endswith(":refund") and ref not in visible and entries[f"{ref}:refund"] != 1
        ]
        ledger = {
            r["reference_id"]: (str(r["user_id"]), r["delta"])
            for r in await conn.fetch("SELECT user_id, reference_id, delta FROM token.token_ledger")
        }
        found["acknowledged entry lost"] = [ref for ref, entry in history.entries.items() if ledger.get(ref) != entry]
        found["acknowledged job lost"] = [i for i in history.jobs if i not in visible]
        found["acknowledged FAILED job not FAILED"] = [i for i in history.failed if jobs[i]["status"] != "FAILED"]
        found["acknowledged SUCCEEDED job not SUCCEEDED"] = [
            i for i in history.succeeded if jobs[i]["status"] != "SUCCEEDED"
        ]
        found["answered INTERNAL or UNKNOWN"] = history.never
        return found
    finally:
        await conn.close()


async def test_money_and_acknowledged_writes_survive_kills_cuts_and_a_restart(
    world: tuple[PrivateCluster, str, Services],
) -> None:
    server, url, services = world
    history = History()
    async with (
        grpc.aio.insecure_channel(services.token.address) as token_channel,
        grpc.aio.insecure_channel(services.generation.address) as generation_channel,
    ):
        token: TokenStub = token_pb2_grpc.TokenServiceStub(token_channel)
        generation: GenerationStub = generation_pb2_grpc.GenerationServiceStub(generation_channel)
        users = []
        for n in range(USERS):
            user = (await token.CreateUser(tpb.CreateUserRequest(email=f"faults-{n}@example.com"))).user
            await token.AppendLedgerEntry(
                tpb.AppendLedgerEntryRequest(
                    user_id=user.user_id,
                    delta=START_BALANCE,
                    reason=tpb.LEDGER_REASON_PURCHASE,
                    reference_id="faults-start",
                )
            )
            users.append(user.user_id)
        until = time.monotonic() + LOAD_SECONDS
        await asyncio.gather(
            inject_faults(server, url, services, history, until),
            *(client(token, generation, users, history, until) for _ in range(CLIENTS)),
        )
        # Both services up again (a kill may have been the last fault), then the reconciler's turn.
        for process in (services.token, services.generation):
            if process.process is None or process.process.poll() is not None:
                await process.start()
    await caught_up(url)
    broken = await violations(url, history)
    calls = sum(history.codes.values())
    print(
        f"\nfaults: {dict(history.faults)}; calls: {calls} {dict(history.codes)}; "
        f"acknowledged: {len(history.entries)} entries, {len(history.jobs)} jobs, "
        f"{len(history.failed)} failed, {len(history.succeeded)} succeeded; "
        f"violations: {sum(len(v) for v in broken.values())}"
    )
    assert sum(history.faults.values()) >= 5 and history.faults["restart postgres"] == 1
    assert len(history.jobs) > 0 and len(history.entries) > 0
    assert {name: found for name, found in broken.items() if found} == {}
