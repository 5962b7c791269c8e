"""The seed script against the real services: what it makes, and that a rerun changes nothing."""

from __future__ import annotations

import re

import asyncpg

from blumpo.generation.v1 import generation_pb2 as gpb
from scripts import seed


async def ledger_of(admin: asyncpg.Connection, email: str) -> list[tuple[str, int]]:
    rows = await admin.fetch(
        "SELECT l.reference_id, l.delta FROM token.token_ledger l JOIN token.app_user u ON u.id = l.user_id "
        "WHERE u.email = $1 ORDER BY l.seq",
        email,
    )
    return [(r["reference_id"], r["delta"]) for r in rows]


async def generation_state(admin: asyncpg.Connection) -> list[tuple[str, str, int, int]]:
    """(job id, status, assets, variants) of the seed's jobs."""
    rows = await admin.fetch(
        "SELECT j.id::text, j.status, count(DISTINCT a.id) AS assets, count(v.id) AS variants"
        " FROM generation.generation_job j"
        " LEFT JOIN generation.asset_image a ON a.job_id = j.id"
        " LEFT JOIN generation.asset_image_variant v ON v.asset_id = a.id"
        " WHERE j.id = ANY($1::uuid[]) GROUP BY j.id ORDER BY j.id",
        [seed.seed_id(f"job:{job.name}") for job in seed.JOBS],
    )
    return [(r["id"], r["status"], r["assets"], r["variants"]) for r in rows]


async def test_seed_twice_makes_users_tokens_jobs_and_assets_once(
    token_address: str, generation_address: str, admin: asyncpg.Connection
) -> None:
    first = await seed.seed(token_address, generation_address)
    ledger = await ledger_of(admin, seed.TEST_EMAIL)
    costs = [(seed.seed_id(f"job:{job.name}"), -job.tokens_cost) for job in seed.JOBS]
    refunds = [(f"{seed.seed_id('job:storm')}:refund", 10)]
    assert ledger[:3] == [("signup", 100), ("seed:welcome-tokens", 500), ("seed:purchase-0001", 250)]
    assert sorted(ledger[3:]) == sorted(costs + refunds)
    state = await generation_state(admin)
    expected = {
        seed.seed_id(f"job:{job.name}"): (
            gpb.JobStatus.Name(job.target).removeprefix("JOB_STATUS_"),
            0 if job.variants is None else 1,
            len(job.variants or ()),
        )
        for job in seed.JOBS
    }
    assert {job_id: rest for job_id, *rest in state} == {k: list(v) for k, v in expected.items()}
    assert any("plan pro, balance" in line for line in first.lines)

    second = await seed.seed(token_address, generation_address)
    assert await ledger_of(admin, seed.TEST_EMAIL) == ledger
    assert await generation_state(admin) == state
    # The same report, but for the balance, which the first run's jobs spent.
    assert [re.sub(r"balance \d+", "", line.replace("(found)", "(created)")) for line in second.lines] == [
        re.sub(r"balance \d+", "", line) for line in first.lines
    ]
    plans = await admin.fetch(
        "SELECT u.email, a.plan_code FROM token.app_user u JOIN token.token_account a ON a.user_id = u.id "
        "WHERE u.email = ANY($1) ORDER BY 1",
        [seed.TEST_EMAIL, seed.FREE_EMAIL],
    )
    assert [(r["email"], r["plan_code"]) for r in plans] == [(seed.FREE_EMAIL, "free"), (seed.TEST_EMAIL, "pro")]
