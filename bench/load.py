"""A load generator that runs in processes of its own, so its CPU is counted and reported.

Each process opens its own channel and runs its share of the clients for a fixed time, all
processes starting at the same instant; it reports its calls, their latencies and the CPU it
used. Closed loop (each client sends its next call when the last returns) unless a rate is
given: then each client sends on a fixed schedule, so the latencies are those of a service
not pushed to its peak.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import random
import resource
import statistics
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import grpc

from bench import common
from blumpo.token.v1 import token_pb2 as tpb
from blumpo.token.v1 import token_pb2_grpc

# What each call does: "spread" a debit of 1 on a random account, "hot" the same on one
# account, "batch" AppendLedgerEntries of a debit on each of the accounts (in random order).
KINDS = ("spread", "hot", "batch")
CLIENTS_PER_CONNECTION = 4


@dataclass
class Share:
    address: str
    kind: str
    clients: int
    start_at: float
    seconds: float
    # Calls per second for each client (0: closed loop).
    rate_per_client: float
    label: str


@dataclass
class Load:
    calls: int
    seconds: float
    latencies_ms: list[float]
    client_cpu_seconds: float
    errors: int

    @property
    def rate(self) -> float:
        return self.calls / self.seconds

    def percentile(self, q: int) -> float:
        if len(self.latencies_ms) < 2:
            return self.latencies_ms[0] if self.latencies_ms else float("nan")
        return statistics.quantiles(self.latencies_ms, n=100)[q - 1]


_ACCOUNT_IDS = [common.account_id(n) for n in range(1, common.ACCOUNTS + 1)]


def _request(kind: str, label: str, client: int, call: int, rng: random.Random) -> Any:
    reference = f"{label}-{os.getpid()}-{client}-{call}"
    if kind == "batch":
        return tpb.AppendLedgerEntriesRequest(
            entries=[
                tpb.AppendLedgerEntryRequest(
                    user_id=user_id, delta=-1, reason=tpb.LEDGER_REASON_GENERATION, reference_id=reference
                )
                for user_id in rng.sample(_ACCOUNT_IDS, len(_ACCOUNT_IDS))
            ]
        )
    user_id = _ACCOUNT_IDS[0] if kind == "hot" else rng.choice(_ACCOUNT_IDS)
    return tpb.AppendLedgerEntryRequest(
        user_id=user_id, delta=-1, reason=tpb.LEDGER_REASON_GENERATION, reference_id=reference
    )


async def _share(share: Share) -> tuple[int, list[float], int]:
    latencies: list[float] = []
    errors = 0

    async def client(stub: token_pb2_grpc.TokenServiceAsyncStub, number: int) -> None:
        nonlocal errors
        rng = random.Random(number * 7919 + os.getpid())
        call = 0
        next_at = share.start_at + (rng.random() / share.rate_per_client if share.rate_per_client else 0)
        end = share.start_at + share.seconds
        method = stub.AppendLedgerEntries if share.kind == "batch" else stub.AppendLedgerEntry
        while True:
            if share.rate_per_client:
                await asyncio.sleep(max(0.0, next_at - time.time()))
                next_at += 1 / share.rate_per_client
            if time.time() >= end:
                return
            request = _request(share.kind, share.label, number, call, rng)
            call += 1
            started = time.perf_counter()
            try:
                await method(request, timeout=30)
            except grpc.aio.AioRpcError:
                errors += 1
                continue
            latencies.append((time.perf_counter() - started) * 1000)

    # A connection per CLIENTS_PER_CONNECTION clients (gRPC would share one otherwise), so that
    # the kernel spreads them over the service's worker processes.
    channels = [
        grpc.aio.insecure_channel(share.address, options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(max(1, share.clients // CLIENTS_PER_CONNECTION))
    ]
    try:
        stubs = [token_pb2_grpc.TokenServiceStub(channel) for channel in channels]
        for stub in stubs:
            await stub.GetTokenBalance(tpb.GetTokenBalanceRequest(user_id=common.account_id(1)), timeout=10)
        await asyncio.sleep(max(0.0, share.start_at - time.time()))
        await asyncio.gather(*(client(stubs[n % len(stubs)], n) for n in range(share.clients)))
    finally:
        for channel in channels:
            await channel.close(None)
    return len(latencies), latencies, errors


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _run_share(share: Share, answer: Connection) -> None:
    """In a process of its own: runs the share, sends (calls, latencies, errors, CPU seconds)."""
    before = _cpu_seconds()
    calls, latencies, errors = asyncio.run(_share(share))
    answer.send((calls, latencies, errors, _cpu_seconds() - before))
    answer.close()


def run(
    address: str, kind: str, clients: int, seconds: float, *, rate: float = 0.0, processes: int = 0, label: str = "load"
) -> Load:
    """clients spread over `processes` processes (default: as many as CPUs, at most clients);
    rate is the total calls per second to aim at (0: as fast as answered)."""
    assert kind in KINDS
    processes = min(clients, processes or os.cpu_count() or 1)
    start_at = time.time() + 1.5  # time for every process to start and connect
    shares = [
        Share(
            address,
            kind,
            clients // processes + (1 if n < clients % processes else 0),
            start_at,
            seconds,
            rate / clients if rate else 0.0,
            f"{label}-{n}",
        )
        for n in range(processes)
    ]
    context = multiprocessing.get_context("spawn")
    running = []
    for share in shares:
        receive, send = context.Pipe(duplex=False)
        process = context.Process(target=_run_share, args=(share, send), daemon=True)
        process.start()
        running.append((process, receive))
    results = []
    for process, receive in running:
        results.append(receive.recv())
        process.join()
    latencies = [ms for _, lat, _, _ in results for ms in lat]
    return Load(
        calls=sum(r[0] for r in results),
        seconds=seconds,
        latencies_ms=latencies,
        client_cpu_seconds=sum(r[3] for r in results),
        errors=sum(r[2] for r in results),
    )
