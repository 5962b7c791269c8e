from __future__ import annotations

from blumpo.token.v1 import token_pb2 as tpb
from blumpo.token.v1 import token_pb2_grpc
from tests import support


async def test_create_user_grants_signup_bonus(token: token_pb2_grpc.TokenServiceAsyncStub) -> None:
    email = support.new_email()
    user = (await token.CreateUser(tpb.CreateUserRequest(email=email.upper()))).user
    assert user.email == email
    assert user.account.plan == "free"
    assert user.account.balance == 100
