"""Mixed calls on both services from many clients, for the tests that break things under load,
and the rule every answer must keep: success, or a retryable code (UNAVAILABLE, ABORTED,
DEADLINE_EXCEEDED) that carries google.rpc.RetryInfo. A client retries such an answer with the
same idempotency key, as a real one would, and notes what it got acknowledged."""

from __future__ import annotations

import asyncio
import random
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

import asyncpg
import grpc
from google.rpc import error_details_pb2

from blumpo.generation.v1 import generation_pb2 as gpb
from blumpo.token.v1 import token_pb2 as tpb
from blumpo_common.errors import detail_of
from tests.generation_support import GenerationStub, TokenStub, job_request

T = TypeVar("T")

RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED, grpc.StatusCode.DEADLINE_EXCEEDED})
# Far above any answer a sound service gives here: a call that hits it has hung.
CALL_TIMEOUT_SECONDS = 10.0
ATTEMPTS = 30
RETRY_PAUSE_SECONDS = 0.05


@dataclass
class MixedLoad:
    token: TokenStub
    generation: GenerationStub
    users: list[str]
    # Answers by code name; retryable ones are counted once per attempt.
    codes: Counter[str] = field(default_factory=Counter)
    # Answers that broke the rule, described.
    broken: list[str] = field(default_factory=list)
    # Ledger entries acknowledged (reference -> delta) and jobs acknowledged as created.
    appended: dict[str, int] = field(default_factory=dict)
    jobs: set[str] = field(default_factory=set)

    async def run(self, clients: int, stop: asyncio.Event) -> None:
        await asyncio.gather(*(self._client(random.Random(n), stop) for n in range(clients)))

    async def _client(self, rng: random.Random, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self._one(rng.choice(self.users), rng.random(), rng.random() < 0.5)

    async def _one(self, user_id: str, pick: float, heads: bool) -> None:
        if pick < 0.3:
            await self._append(user_id, 1 if heads else -1)
        elif pick < 0.5:
            await self._job(user_id, fail=heads)
        elif pick < 0.7:
            balance = tpb.GetTokenBalanceRequest(user_id=user_id)
            await self.call(lambda t: self.token.GetTokenBalance(balance, timeout=t))
        elif pick < 0.8:
            entries = tpb.ListLedgerEntriesRequest(user_id=user_id, page_size=20)
            await self.call(lambda t: self.token.ListLedgerEntries(entries, timeout=t))
        elif pick < 0.9:
            jobs = gpb.ListGenerationJobsRequest(user_id=user_id, page_size=20)
            await self.call(lambda t: self.generation.ListGenerationJobs(jobs, timeout=t))
        else:
            check = tpb.CheckBalancesRequest(user_id=user_id)
            await self.call(lambda t: self.token.CheckBalances(check, timeout=t))

    async def _append(self, user_id: str, delta: int) -> None:
        request = tpb.AppendLedgerEntryRequest(
            user_id=user_id, delta=delta, reason=tpb.LEDGER_REASON_ADJUSTMENT, reference_id=f"load-{uuid.uuid4()}"
        )
        if await self.call(lambda t: self.token.AppendLedgerEntry(request, timeout=t)) is not None:
            self.appended[request.reference_id] = delta

    async def _job(self, user_id: str, fail: bool) -> None:
        request = job_request(user_id, cost=3)
        if await self.call(lambda t: self.generation.CreateGenerationJob(request, timeout=t)) is None:
            return
        self.jobs.add(request.job_id)
        if fail:
            move = gpb.UpdateGenerationJobStatusRequest(job_id=request.job_id, status=gpb.JOB_STATUS_FAILED)
            await self.call(lambda t: self.generation.UpdateGenerationJobStatus(move, timeout=t))

    async def call(self, attempt: Callable[[float], Awaitable[T]]) -> T | None:
        """The answer, retried while it is retryable; None when the attempts ran out or the answer
        broke the rule (noted)."""
        for _ in range(ATTEMPTS):
            try:
                answer = await attempt(CALL_TIMEOUT_SECONDS)
            except grpc.aio.AioRpcError as exc:
                self.codes[exc.code().name] += 1
                if exc.code() not in RETRYABLE or detail_of(exc, error_details_pb2.RetryInfo) is None:
                    self.broken.append(f"{exc.code().name}: {exc.details()}")
                    return None
                await asyncio.sleep(RETRY_PAUSE_SECONDS)
                continue
            self.codes["OK"] += 1
            return answer
        return None

    async def check_every_call_works(self) -> None:
        """One call of each kind, each answered on its first attempt."""
        user_id = self.users[0]
        entry = tpb.AppendLedgerEntryRequest(
            user_id=user_id, delta=1, reason=tpb.LEDGER_REASON_ADJUSTMENT, reference_id=f"load-{uuid.uuid4()}"
        )
        await self.token.AppendLedgerEntry(entry, timeout=CALL_TIMEOUT_SECONDS)
        self.appended[entry.reference_id] = 1
        job = job_request(user_id, cost=3)
        created = await self.generation.CreateGenerationJob(job, timeout=CALL_TIMEOUT_SECONDS)
        self.jobs.add(created.job.job_id)
        await self.generation.UpdateGenerationJobStatus(
            gpb.UpdateGenerationJobStatusRequest(job_id=job.job_id, status=gpb.JOB_STATUS_FAILED),
            timeout=CALL_TIMEOUT_SECONDS,
        )
        await self.token.GetTokenBalance(tpb.GetTokenBalanceRequest(user_id=user_id), timeout=CALL_TIMEOUT_SECONDS)
        await self.token.ListLedgerEntries(tpb.ListLedgerEntriesRequest(user_id=user_id), timeout=CALL_TIMEOUT_SECONDS)
        await self.generation.ListGenerationJobs(
            gpb.ListGenerationJobsRequest(user_id=user_id), timeout=CALL_TIMEOUT_SECONDS
        )


async def acknowledged_entries_kept(admin: asyncpg.Connection, appended: dict[str, int]) -> None:
    """Every ledger entry a client was told was written is in the ledger, once, as asked."""
    rows = await admin.fetch(
        "SELECT reference_id, delta FROM token.token_ledger WHERE reference_id = ANY($1::text[])", list(appended)
    )
    found = Counter(row["reference_id"] for row in rows)
    assert [ref for ref in appended if found[ref] != 1] == [], "acknowledged entries missing or doubled"
    assert {row["reference_id"]: row["delta"] for row in rows} == appended
