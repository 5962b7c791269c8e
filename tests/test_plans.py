"""Plans: ChangePlan, and the plan table as the one source of grants and allowances."""

from __future__ import annotations

import uuid

import asyncpg
import grpc

from blumpo.token.v1 import token_pb2 as tpb
from tests import support
from tests.support import TokenStub


async def test_change_plan_moves_the_account(token: TokenStub) -> None:
    user = (await token.CreateUser(tpb.CreateUserRequest(email=support.new_email()))).user
    account = (await token.ChangePlan(tpb.ChangePlanRequest(user_id=user.user_id, plan="pro"))).account
    assert account.user_id == user.user_id and account.plan == "pro"
    assert account.balance == user.account.balance  # a plan change moves no tokens
    assert account.updated_at.ToDatetime() >= user.account.updated_at.ToDatetime()
    balance = await token.GetTokenBalance(tpb.GetTokenBalanceRequest(user_id=user.user_id))
    assert balance.plan == "pro"
    back = (await token.ChangePlan(tpb.ChangePlanRequest(user_id=user.user_id, plan="free"))).account
    assert back.plan == "free"


async def test_grants_and_allowances_come_from_the_plan_table(token: TokenStub, admin: asyncpg.Connection) -> None:
    await admin.execute(
        "INSERT INTO token.plan (code, name, monthly_allowance, signup_grant) VALUES ('studio', 'Studio', 77, 33) "
        "ON CONFLICT DO NOTHING"
    )
    user = (await token.CreateUser(tpb.CreateUserRequest(email=support.new_email(), plan="studio"))).user
    assert user.account.balance == 33
    other = (await token.CreateUser(tpb.CreateUserRequest(email=support.new_email()))).user
    await token.ChangePlan(tpb.ChangePlanRequest(user_id=other.user_id, plan="studio"))
    await support.open_accounts_long_ago(admin)
    await token.RunMonthlyRefill(tpb.RunMonthlyRefillRequest(period="2015-05"))
    for user_id, balance in ((user.user_id, 33 + 77), (other.user_id, 100 + 77)):
        assert (await token.GetTokenBalance(tpb.GetTokenBalanceRequest(user_id=user_id))).balance == balance


async def test_change_plan_of_an_unknown_user_is_not_found(token: TokenStub, admin: asyncpg.Connection) -> None:
    before = await support.row_counts(admin, "token")
    await support.expect_error(
        token.ChangePlan(tpb.ChangePlanRequest(user_id=str(uuid.uuid4()), plan="pro")),
        grpc.StatusCode.NOT_FOUND,
        "ACCOUNT_NOT_FOUND",
    )
    assert await support.row_counts(admin, "token") == before


async def test_an_unknown_plan_leaves_the_account_alone(token: TokenStub) -> None:
    user = (await token.CreateUser(tpb.CreateUserRequest(email=support.new_email()))).user
    error = await support.expect_error(
        token.ChangePlan(tpb.ChangePlanRequest(user_id=user.user_id, plan="platinum")),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert support.bad_fields(error) == ["plan"]
    balance = await token.GetTokenBalance(tpb.GetTokenBalanceRequest(user_id=user.user_id))
    assert balance.plan == "free"
