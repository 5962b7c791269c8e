"""Certificates for tests: a CA made here (trustme), callers' and servers' certificates as
`make certs` issues them, and the settings that point a process at them."""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import grpc
import trustme

from harness import ROOT
from scripts.make_certs import LOCAL_HOSTS, issue

POLICY = ROOT / "deploy" / "policy.toml"


@dataclass(frozen=True)
class Identity:
    """A certificate with its key, and the CA bundle it trusts, written to files."""

    cert: Path
    key: Path
    ca: Path

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(self.ca.read_bytes(), self.key.read_bytes(), self.cert.read_bytes())

    def settings(self) -> dict[str, str]:
        return {"TLS_CERT_FILE": str(self.cert), "TLS_KEY_FILE": str(self.key), "TLS_CA_FILE": str(self.ca)}


class Authority:
    """A CA of the test's own, issuing into a directory."""

    def __init__(self, directory: Path, label: str = "ca") -> None:
        self.ca = trustme.CA()
        self.directory = directory
        self.label = label
        self.bundle = directory / f"{label}.pem"
        self.ca.cert_pem.write_to_path(str(self.bundle))

    def issue(self, name: str, hosts: tuple[str, ...] = (), *, uri: str | None = None) -> Identity:
        """A certificate naming `name` (spiffe URI SAN unless uri says otherwise); servers' get hosts."""
        cert, key = issue(self.ca, name, hosts, uri=uri)
        stem = self.directory / f"{self.label}-{name}"
        stem.with_suffix(".pem").write_bytes(cert)
        stem.with_suffix(".key").write_bytes(key)
        return Identity(stem.with_suffix(".pem"), stem.with_suffix(".key"), self.bundle)

    def server(self, name: str) -> Identity:
        return self.issue(name, LOCAL_HOSTS)


@functools.cache
def production_security() -> dict[str, str]:
    """Settings for mutual TLS and the shipped policy, as production mode requires (files made
    once per test run)."""
    directory = Path(tempfile.mkdtemp(prefix="blumpo-certs-"))
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    return {**Authority(directory).server("token").settings(), "AUTHZ_POLICY_FILE": str(POLICY)}
