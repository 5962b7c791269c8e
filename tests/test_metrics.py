"""The metrics both services serve over HTTP, scraped from running processes as Prometheus would,
and the Grafana dashboard built on them."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import grpc
import prometheus_client
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from blumpo.generation.v1 import generation_pb2_grpc
from blumpo.token.v1 import token_pb2 as tpb
from blumpo.token.v1 import token_pb2_grpc
from blumpo_common.db import create_pool
from harness import ROOT
from harness.processes import ServiceProcess, free_port
from tests import support
from tests.conftest import database_config
from tests.generation_support import job_request
from tests.support import GenerationStub, TokenStub
from token_service.store import Store as TokenStore

pytestmark = pytest.mark.slow

TOKEN = "blumpo.token.v1.TokenService"
GENERATION = "blumpo.generation.v1.GenerationService"
POOL_SIZE = 7
# Served as on a machine of two CPUs: the supervisor serves its workers' metrics together.
WORKERS = 2
DASHBOARD = ROOT / "deploy" / "grafana" / "blumpo.json"
# A sample: its name and its labels, sorted.
Key = tuple[str, tuple[tuple[str, str], ...]]


def key(name: str, **labels: str) -> Key:
    return name, tuple(sorted(labels.items()))


def rpc(grpc_service: str, grpc_method: str, grpc_type: str = "unary", **more: str) -> dict[str, str]:
    return {"grpc_type": grpc_type, "grpc_service": grpc_service, "grpc_method": grpc_method, **more}


@dataclass
class Scrape:
    samples: dict[Key, float]

    def value(self, name: str, **labels: str) -> float:
        return self.samples.get(key(name, **labels), 0.0)

    def names(self) -> set[str]:
        return {name for name, _ in self.samples}

    def labels_of(self, name: str) -> list[dict[str, str]]:
        return [dict(labels) for n, labels in self.samples if n == name]


@dataclass
class Service:
    process: ServiceProcess
    metrics_port: int

    def scrape(self) -> Scrape:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as reply:
            text = reply.read().decode()
        samples: dict[Key, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                samples[key(sample.name, **sample.labels)] = sample.value
        return Scrape(samples)


@dataclass
class Running:
    token: Service
    generation: Service


def service(module: str, prefix: str, database_url: str, log: Path, **env: str) -> Service:
    port, metrics = free_port(), free_port()
    settings = {
        "DATABASE_URL": database_url,
        "LOG_LEVEL": "WARNING",
        "SHUTDOWN_GRACE_SECONDS": "1",
        "DB_POOL_SIZE": str(POOL_SIZE),
        "WORKERS": str(WORKERS),
        f"{prefix}_LISTEN_ADDR": f"127.0.0.1:{port}",
        f"{prefix}_METRICS_ADDR": f"127.0.0.1:{metrics}",
        **env,
    }
    return Service(ServiceProcess(module, settings, port, log), metrics)


@pytest.fixture(scope="module")
async def running(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Running]:
    logs = tmp_path_factory.mktemp("metrics")
    token = service("token_service", "TOKEN", database_url, logs / "token.log")
    generation = service(
        "generation_service",
        "GENERATION",
        database_url,
        logs / "generation.log",
        TOKEN_SERVICE_TARGET=token.process.address,
        # Every create asks for its owner's plan, whichever worker serves it: the counts are exact.
        PLAN_CACHE_SECONDS="0",
    )
    await asyncio.gather(token.process.start(), generation.process.start())
    try:
        yield Running(token, generation)
    finally:
        token.process.stop()
        generation.process.stop()


async def scrape(service: Service) -> Scrape:
    return await asyncio.to_thread(service.scrape)


async def test_calls_move_the_conventional_grpc_metrics(running: Running) -> None:
    token_before, generation_before = await scrape(running.token), await scrape(running.generation)
    async with (
        grpc.aio.insecure_channel(running.token.process.address) as to_token,
        grpc.aio.insecure_channel(running.generation.process.address) as to_generation,
    ):
        token: TokenStub = token_pb2_grpc.TokenServiceStub(to_token)
        generation: GenerationStub = generation_pb2_grpc.GenerationServiceStub(to_generation)
        user_id = (await token.CreateUser(tpb.CreateUserRequest(email=support.new_email()))).user.user_id
        await generation.CreateGenerationJob(job_request(user_id, cost=3))
        # More than the balance: the token service refuses the debit.
        await support.expect_error(
            generation.CreateGenerationJob(job_request(user_id, cost=1000)), grpc.StatusCode.FAILED_PRECONDITION
        )
        await support.expect_error(
            token.GetTokenBalance(tpb.GetTokenBalanceRequest(user_id="not-a-uuid")), grpc.StatusCode.INVALID_ARGUMENT
        )
        # A stream: the health watch sends the status at once, then is cancelled by the caller.
        watch = health_pb2_grpc.HealthStub(to_generation).Watch(health_pb2.HealthCheckRequest())
        assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
        watch.cancel()
    token_after, generation_after = await scrape(running.token), await scrape(running.generation)

    def moved(before: Scrape, after: Scrape, name: str, **labels: str) -> float:
        return after.value(name, **labels) - before.value(name, **labels)

    # Served: the debit on the token side, the create call on the generation side.
    append = rpc(TOKEN, "AppendLedgerEntry")
    for name in ("grpc_server_started_total", "grpc_server_msg_received_total", "grpc_server_handling_seconds_count"):
        assert moved(token_before, token_after, name, **append) == 2, name
    assert moved(token_before, token_after, "grpc_server_handling_seconds_bucket", **append, le="+Inf") == 2
    assert moved(token_before, token_after, "grpc_server_msg_sent_total", **append) == 1
    for code in ("OK", "FailedPrecondition"):
        assert moved(token_before, token_after, "grpc_server_handled_total", **append, grpc_code=code) == 1
    bad = rpc(TOKEN, "GetTokenBalance", grpc_code="InvalidArgument")
    assert moved(token_before, token_after, "grpc_server_handled_total", **bad) == 1
    # A refused call sent no response message; the answered ones are the creates' plan lookups.
    balance = rpc(TOKEN, "GetTokenBalance")
    answered = moved(token_before, token_after, "grpc_server_handled_total", **balance, grpc_code="OK")
    assert answered == 2
    assert moved(token_before, token_after, "grpc_server_msg_sent_total", **balance) == answered
    create = rpc(GENERATION, "CreateGenerationJob")
    for code in ("OK", "FailedPrecondition"):
        assert moved(generation_before, generation_after, "grpc_server_handled_total", **create, grpc_code=code) == 1
    assert moved(generation_before, generation_after, "grpc_server_handling_seconds_count", **create) == 2

    # Made: the generation service's calls to the token service, one answered, one refused.
    for name in ("grpc_client_started_total", "grpc_client_msg_sent_total", "grpc_client_handling_seconds_count"):
        assert moved(generation_before, generation_after, name, **append) == 2, name
    assert moved(generation_before, generation_after, "grpc_client_msg_received_total", **append) == 1
    for code in ("OK", "FailedPrecondition"):
        assert moved(generation_before, generation_after, "grpc_client_handled_total", **append, grpc_code=code) == 1

    # The stream is told from unary calls by grpc_type, and counts each message it sent.
    health_watch = rpc("grpc.health.v1.Health", "Watch", "server_stream")
    assert moved(generation_before, generation_after, "grpc_server_started_total", **health_watch) == 1
    assert moved(generation_before, generation_after, "grpc_server_msg_sent_total", **health_watch) >= 1

    # The ledger entries written: the signup grant and the debit.
    for reason in ("SIGNUP_BONUS", "GENERATION"):
        assert moved(token_before, token_after, "token_ledger_entries_total", reason=reason) == 1, reason


async def test_gauges_of_the_pool_jobs_and_backlog(running: Running, admin: asyncpg.Connection) -> None:
    queued = "SELECT count(*) FROM generation.generation_job WHERE status = 'QUEUED'"
    before = await admin.fetchval(queued)
    async with (
        grpc.aio.insecure_channel(running.token.process.address) as to_token,
        grpc.aio.insecure_channel(running.generation.process.address) as to_generation,
    ):
        token: TokenStub = token_pb2_grpc.TokenServiceStub(to_token)
        generation: GenerationStub = generation_pb2_grpc.GenerationServiceStub(to_generation)
        user_id = await support.user_with_balance(token, 10)
        for _ in range(2):
            await generation.CreateGenerationJob(job_request(user_id))
    assert await admin.fetchval(queued) == before + 2
    # Read in the workers and copied out for the supervisor every second (metrics.publish_scraped).
    for _ in range(50):
        after = await scrape(running.generation)
        if after.value("generation_jobs", state="QUEUED") == before + 2:
            break
        await asyncio.sleep(0.1)
    assert after.value("generation_jobs", state="QUEUED") == before + 2
    assert {labels["state"] for labels in after.labels_of("generation_jobs")} == {
        "CHARGING",
        "QUEUED",
        "RUNNING",
        "PAUSED",
    }
    for kind in ("intents", "refunds", "leases"):
        assert after.value("generation_reconciler_backlog", kind=kind) == 0, kind
    for kind in ("intents", "refunds"):
        assert key("generation_reconciler_oldest_seconds", kind=kind) in after.samples, kind

    for served in (running.generation, running.token):
        # Both services' pools have connected (each worker's health probe), within their bound
        # (summed over the workers), once the workers' first readings are out.
        for _ in range(50):
            scraped = await scrape(served)
            if scraped.value("db_pool_connections") >= WORKERS:
                break
            await asyncio.sleep(0.1)
        assert scraped.value("db_pool_connections") >= WORKERS
        assert scraped.value("db_pool_connections_max") == WORKERS * POOL_SIZE
        assert 0 <= scraped.value("db_pool_connections_in_use") <= scraped.value("db_pool_connections")
        assert key("db_pool_waiting") in scraped.samples
        assert not [name for name in scraped.names() if name.endswith("_created")]


async def test_the_grpc_series_carry_the_conventional_labels(running: Running) -> None:
    scraped = await scrape(running.token)
    families = {
        "grpc_server_started_total": {"grpc_type", "grpc_service", "grpc_method"},
        "grpc_server_handled_total": {"grpc_type", "grpc_service", "grpc_method", "grpc_code"},
        "grpc_server_handling_seconds_bucket": {"grpc_type", "grpc_service", "grpc_method", "le"},
        "grpc_server_msg_received_total": {"grpc_type", "grpc_service", "grpc_method"},
        "grpc_server_msg_sent_total": {"grpc_type", "grpc_service", "grpc_method"},
    }
    for name, labels in families.items():
        found = scraped.labels_of(name)
        assert found and all(set(sample) == labels for sample in found), (name, found)
    # The old labels are gone.
    assert not [s for s in scraped.labels_of("grpc_server_handled_total") if "method" in s or "code" in s]


# PromQL words that are not metric names.
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset", "and", "or", "unless"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads: identifiers once strings, label matchers,
    ranges and grouping clauses are taken out, other than functions and keywords."""
    bare = re.sub(r'"[^"]*"', "", expr)
    bare = re.sub(r"\{[^}]*\}|\[[^\]]*\]", "", bare)
    bare = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", bare)
    names = set(re.findall(r"\b([a-zA-Z_:][\w:]*)\b(?!\s*\()", bare))
    return {n for n in names if n not in _KEYWORDS and not re.fullmatch(r"[eE]\d*|Inf|NaN", n)}


def test_metric_names_are_read_from_expressions() -> None:
    expr = 'histogram_quantile(0.99, sum by (le, job) (rate(a_bucket{job=~"$job", x!="y"}[$__rate_interval]))) / b'
    assert metric_names(expr) == {"a_bucket", "b"}


async def test_the_dashboard_reads_only_metrics_the_services_serve(running: Running) -> None:
    # Each family has samples by now (the tests above made calls of every kind).
    served = (await scrape(running.token)).names() | (await scrape(running.generation)).names()
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", ())]
    exprs += [v["definition"] for v in dashboard["templating"]["list"] if "definition" in v]
    used = set().union(*(metric_names(e.replace("label_values(", "label_values_of(")) for e in exprs))
    used -= {"job"}  # label_values(metric, job): the label asked for
    assert len(used) >= 20, used
    assert used - served == set(), f"not served: {sorted(used - served)}"


async def test_pool_gauges_count_connections_lent_and_calls_waiting(database_url: str) -> None:
    pool = await create_pool(dataclasses.replace(database_config(database_url, "token_service"), pool_size=1))
    store = TokenStore(pool, 5.0)

    def gauge(name: str) -> float:
        value = prometheus_client.REGISTRY.get_sample_value(name)
        assert value is not None, name
        return value

    try:
        base = {name: gauge(name) for name in ("db_pool_connections_in_use", "db_pool_waiting")}
        async with store.connection():
            waiter = asyncio.create_task(store.fetchval("health_probe"))
            await asyncio.sleep(0.2)
            assert gauge("db_pool_connections_in_use") - base["db_pool_connections_in_use"] == 1
            assert gauge("db_pool_waiting") - base["db_pool_waiting"] == 1
        assert await waiter is True
        assert gauge("db_pool_waiting") == base["db_pool_waiting"]
    finally:
        await pool.close()
