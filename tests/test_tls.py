"""Mutual TLS: who can connect at all, whose name a certificate gives, and a job charged end to
end with both services and the generation service's client on mutual TLS."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from blumpo.generation.v1 import generation_pb2 as gpb
from blumpo.generation.v1 import generation_pb2_grpc
from blumpo.token.v1 import token_pb2 as tpb
from blumpo.token.v1 import token_pb2_grpc
from blumpo_common import tls
from tests import support
from tests.certificates import Authority, Identity, secure_generation_server, secure_token_server
from tests.generation_support import job_request


@pytest.fixture(scope="module")
def authority(tmp_path_factory: pytest.TempPathFactory) -> Authority:
    return Authority(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
async def token_address(database_url: str, authority: Authority) -> AsyncIterator[str]:
    async with secure_token_server(database_url, authority.server("token")) as address:
        yield address


@pytest.fixture(scope="module")
async def generation_address(database_url: str, authority: Authority, token_address: str) -> AsyncIterator[str]:
    async with secure_generation_server(database_url, authority.server("generation"), token_address) as address:
        yield address


async def health(channel: grpc.aio.Channel) -> int:
    answer = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    return int(answer.status)


async def test_a_caller_with_a_certificate_of_the_ca_is_served(token_address: str, authority: Authority) -> None:
    async with grpc.aio.secure_channel(token_address, authority.issue("admin").channel_credentials()) as channel:
        assert await health(channel) in (
            health_pb2.HealthCheckResponse.SERVING,
            health_pb2.HealthCheckResponse.NOT_SERVING,
        )
        stub = token_pb2_grpc.TokenServiceStub(channel)
        missing = tpb.GetTokenBalanceRequest(user_id=str(uuid.uuid4()))
        await support.expect_error(stub.GetTokenBalance(missing), grpc.StatusCode.NOT_FOUND, "ACCOUNT_NOT_FOUND")


async def test_a_plaintext_client_cannot_call(token_address: str) -> None:
    async with grpc.aio.insecure_channel(token_address) as channel:
        await support.expect_error(health(channel), grpc.StatusCode.UNAVAILABLE)


async def test_a_client_without_a_certificate_cannot_call(token_address: str, authority: Authority) -> None:
    credentials = grpc.ssl_channel_credentials(authority.bundle.read_bytes())
    async with grpc.aio.secure_channel(token_address, credentials) as channel:
        await support.expect_error(health(channel), grpc.StatusCode.UNAVAILABLE)


async def test_a_client_whose_certificate_comes_from_another_ca_cannot_call(
    token_address: str, authority: Authority, tmp_path: Path
) -> None:
    stranger = Authority(tmp_path, "other").issue("admin")
    # It trusts the server's CA, so only its own certificate is wrong.
    credentials = grpc.ssl_channel_credentials(
        authority.bundle.read_bytes(), stranger.key.read_bytes(), stranger.cert.read_bytes()
    )
    async with grpc.aio.secure_channel(token_address, credentials) as channel:
        await support.expect_error(health(channel), grpc.StatusCode.UNAVAILABLE)


@pytest.mark.parametrize(
    ("names", "caller"),
    [
        ({"uri": "spiffe://prod.blumpo.example/ns/default/sa/billing", "dns": ["billing.internal"]}, "billing"),
        ({"uri": "https://example.com/web", "dns": ["web.internal", "other"]}, "web.internal"),
        ({"uri": None, "dns": []}, "cn-only"),
    ],
)
def test_the_caller_is_the_spiffe_name_else_the_first_dns_name_else_the_common_name(
    authority: Authority, names: dict[str, object], caller: str
) -> None:
    uri = names["uri"]
    dns = names["dns"]
    assert isinstance(dns, list)
    cert = identity_pem(authority, "cn-only", dns, uri if isinstance(uri, str) else None)
    assert tls.identity(cert) == caller


def identity_pem(authority: Authority, common_name: str, dns: list[str], uri: str | None) -> bytes:
    """A certificate with exactly these names (no URI SAN when uri is None)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    ca_key = serialization.load_pem_private_key(authority.ca.private_key_pem.bytes(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    ca_cert = x509.load_pem_x509_certificate(authority.ca.cert_pem.bytes())
    sans: list[x509.GeneralName] = [x509.DNSName(name) for name in dns]
    if uri is not None:
        sans.insert(0, x509.UniformResourceIdentifier(uri))
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(ca_cert.not_valid_before_utc)
        .not_valid_after(ca_cert.not_valid_after_utc)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def stubs(address: str, identity: Identity) -> grpc.aio.Channel:
    return grpc.aio.secure_channel(address, identity.channel_credentials())


async def test_generation_charges_a_job_over_mutual_tls_and_cannot_purchase(
    token_address: str, generation_address: str, authority: Authority, admin: asyncpg.Connection
) -> None:
    async with (
        stubs(token_address, authority.issue("admin")) as admin_channel,
        stubs(generation_address, authority.issue("web")) as web_channel,
        stubs(token_address, authority.issue("generation")) as generation_channel,
    ):
        operator = token_pb2_grpc.TokenServiceStub(admin_channel)
        user_id = await support.user_with_balance(operator, 50)
        web = generation_pb2_grpc.GenerationServiceStub(web_channel)
        job_id = str(uuid.uuid4())
        job = (await web.CreateGenerationJob(job_request(user_id, job_id, cost=20))).job
        assert job.status == gpb.JOB_STATUS_QUEUED
        balance = await operator.GetTokenBalance(tpb.GetTokenBalanceRequest(user_id=user_id))
        assert balance.balance == 30
        # The debit was written by the generation service, as its certificate names it.
        writer = await admin.fetchval(
            "SELECT created_by FROM token.token_ledger WHERE user_id = $1 AND reference_id = $2",
            uuid.UUID(user_id),
            job_id,
        )
        assert writer == "generation"

        # The same certificate may not credit a purchase.
        token_as_generation = token_pb2_grpc.TokenServiceStub(generation_channel)
        refused = await support.expect_error(
            token_as_generation.AppendLedgerEntry(
                tpb.AppendLedgerEntryRequest(
                    user_id=user_id, delta=1000, reason=tpb.LEDGER_REASON_PURCHASE, reference_id="free-tokens"
                )
            ),
            grpc.StatusCode.PERMISSION_DENIED,
            "CALLER_NOT_ALLOWED",
        )
        assert dict(support.error_info(refused).metadata) == {
            "caller": "generation",
            "method": "blumpo.token.v1.TokenService/AppendLedgerEntry",
            "reason": "PURCHASE",
        }
        assert (await operator.GetTokenBalance(tpb.GetTokenBalanceRequest(user_id=user_id))).balance == 30


async def test_the_client_certificate_is_read_again_on_reload_while_a_call_is_in_flight(
    token_address: str, authority: Authority, admin: asyncpg.Connection, tmp_path: Path
) -> None:
    live = Identity(tmp_path / "client.pem", tmp_path / "client.key", authority.bundle)

    def present(identity: Identity) -> None:
        live.cert.write_bytes(identity.cert.read_bytes())
        live.key.write_bytes(identity.key.read_bytes())

    present(authority.issue("generation"))
    settings = tls.TlsConfig(live.cert, live.key, live.ca)
    rotating = tls.RotatingChannel(
        lambda: grpc.aio.secure_channel(token_address, tls.channel_credentials(settings)), drain_seconds=30
    )
    try:
        client = token_pb2_grpc.TokenServiceStub(rotating.channel())
        async with stubs(token_address, authority.issue("admin")) as admin_channel:
            operator = token_pb2_grpc.TokenServiceStub(admin_channel)
            held_id = await support.user_with_balance(operator, 100)
            other_id = await support.user_with_balance(operator, 100)
        async with admin.transaction():
            await admin.execute("SELECT 1 FROM token.token_account WHERE user_id = $1 FOR UPDATE", uuid.UUID(held_id))
            in_flight = asyncio.ensure_future(
                client.AppendLedgerEntry(
                    tpb.AppendLedgerEntryRequest(
                        user_id=held_id, delta=-5, reason=tpb.LEDGER_REASON_GENERATION, reference_id="held"
                    ),
                    timeout=30,
                )
            )
            await asyncio.sleep(0.3)
            # Now the files hold another caller's certificate: calls from here on present it.
            present(authority.issue("billing"))
            assert rotating.reload()
            purchase = await client.AppendLedgerEntry(
                tpb.AppendLedgerEntryRequest(
                    user_id=other_id, delta=5, reason=tpb.LEDGER_REASON_PURCHASE, reference_id="after"
                ),
                timeout=10,
            )
            assert purchase.entry.created_by == "billing"
            assert not in_flight.done()
        # The call made before the reload finishes on the old channel, as the old caller.
        assert (await in_flight).entry.created_by == "generation"
        # Files that are not a certificate keep the channel in use.
        live.cert.write_text("not a certificate")
        assert not rotating.reload()
        again = tpb.AppendLedgerEntryRequest(
            user_id=other_id, delta=5, reason=tpb.LEDGER_REASON_PURCHASE, reference_id="after-bad-files"
        )
        assert (await client.AppendLedgerEntry(again, timeout=10)).entry.created_by == "billing"
    finally:
        await rotating.close()
