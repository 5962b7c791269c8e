"""Development certificates (`make certs`): a CA, one certificate per caller of the policy, and
the two servers' certificates, under .data/certs/.

Each certificate names its holder as `spiffe://blumpo.dev/<name>` (the name the services read:
docs/security.md); the servers' also hold localhost and 127.0.0.1. Never for production: the
CA's key lies next to the certificates it signed.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import tomllib
from collections.abc import Sequence
from pathlib import Path

import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

TRUST_DOMAIN = "blumpo.dev"
LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")
# The servers' files, and the caller each one is when it calls another service.
SERVERS = {"token_service": "token", "generation_service": "generation"}
VALID_DAYS = 365


def spiffe_id(name: str, trust_domain: str = TRUST_DOMAIN) -> str:
    return f"spiffe://{trust_domain}/{name}"


def issue(
    ca: trustme.CA, name: str, hosts: Sequence[str] = (), *, uri: str | None = None, days: int = VALID_DAYS
) -> tuple[bytes, bytes]:
    """A certificate and its key (PEM) for `name`: a spiffe:// URI SAN (uri, else the name's),
    the hosts as DNS or IP SANs, and the name as subject CN; good for client and server."""
    issuer = x509.load_pem_x509_certificate(ca.cert_pem.bytes())
    issuer_key = serialization.load_pem_private_key(ca.private_key_pem.bytes(), password=None)
    assert isinstance(issuer_key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(uri or spiffe_id(name))]
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(issuer.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
        .sign(issuer_key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return certificate.public_bytes(serialization.Encoding.PEM), key_pem


def policy_callers(policy: Path) -> list[str]:
    return list(tomllib.loads(policy.read_text()).get("callers", {}))


def write_pair(directory: Path, file_name: str, pair: tuple[bytes, bytes]) -> None:
    cert, key = pair
    (directory / f"{file_name}.pem").write_bytes(cert)
    key_path = directory / f"{file_name}-key.pem"
    key_path.write_bytes(key)
    key_path.chmod(0o600)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--policy", type=Path, default=Path("deploy/policy.toml"))
    parser.add_argument("--out", type=Path, default=Path(".data/certs"))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA(organization_name="Blumpo development")
    ca.cert_pem.write_to_path(str(args.out / "ca.pem"))
    ca.private_key_pem.write_to_path(str(args.out / "ca-key.pem"))
    (args.out / "ca-key.pem").chmod(0o600)
    callers = policy_callers(args.policy)
    for caller in callers:
        write_pair(args.out, caller, issue(ca, caller))
    for server, caller in SERVERS.items():
        write_pair(args.out, server, issue(ca, caller, LOCAL_HOSTS))
    print(f"{args.out}: ca.pem, {', '.join(callers)}, {', '.join(SERVERS)} (each <name>.pem and <name>-key.pem)")


if __name__ == "__main__":
    main()
