"""Who may call what: the policy of AUTHZ_POLICY_FILE, checked for every call.

    [callers.generation]
    methods = ["blumpo.token.v1.TokenService/AppendLedgerEntry"]   # or ["*"]: all of a server's
    ledger_reasons = ["GENERATION", "GENERATION_REFUND"]          # or ["*"]; default none

The file is checked at start-up against both services' descriptors (a name no service has
stops start-up), so a typo cannot silently refuse or allow. The server's interceptor asks the
Gate for each call's Grant and answers its refusal; the token service checks each ledger
entry's reason against the call's Grant (check_reason), so one forbidden entry of a batch
fails alone. Health and reflection stay open.
"""

from __future__ import annotations

import contextvars
import logging
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeAlias

import grpc
from google.protobuf import descriptor_pool

import blumpo.generation.v1.generation_pb2
import blumpo.token.v1.token_pb2 as tpb
from blumpo_common import callers, logs
from blumpo_common.config import ConfigError, is_development
from blumpo_common.errors import ServiceError

ALL = "*"
REASON_PREFIX = "LEDGER_REASON_"
# Every ledger reason a policy may name, without the prefix.
LEDGER_REASONS = frozenset(
    value.name.removeprefix(REASON_PREFIX)
    for value in tpb.DESCRIPTOR.enum_types_by_name["LedgerReason"].values
    if value.number != 0
)
# The services whose methods a policy may name (their modules are imported above).
SERVICES = (
    tpb.DESCRIPTOR.services_by_name["TokenService"].full_name,
    blumpo.generation.v1.generation_pb2.DESCRIPTOR.services_by_name["GenerationService"].full_name,
)
REFUSED = "CALLER_NOT_ALLOWED"

audit_log = logging.getLogger("blumpo.audit")


@dataclass(frozen=True)
class Rights:
    """What one caller may do; None: everything (`"*"`)."""

    methods: frozenset[str] | None
    ledger_reasons: frozenset[str] | None

    def allows_method(self, method: str) -> bool:
        """method as gRPC names it: "/blumpo.token.v1.TokenService/AppendLedgerEntry"."""
        return self.methods is None or method.lstrip("/") in self.methods

    def allows_reason(self, reason: str) -> bool:
        return self.ledger_reasons is None or reason in self.ledger_reasons


EVERYTHING = Rights(None, None)
NOTHING = Rights(frozenset(), frozenset())


@dataclass(frozen=True)
class Grant:
    """What the policy makes of one call: its caller, its rights, and its refusal if refused."""

    caller: str
    method: str
    rights: Rights
    refusal: ServiceError | None = None


# The grant of the call being served (None outside a call, e.g. in tests: everything allowed).
current: contextvars.ContextVar[Grant | None] = contextvars.ContextVar("grant", default=None)
Scope: TypeAlias = tuple[contextvars.Token[str | None], contextvars.Token[Grant | None]]


def enter(grant: Grant) -> Scope:
    """Makes grant the call's, for everything it runs (the caller for callers.caller_of too)."""
    return callers.current.set(grant.caller), current.set(grant)


def leave(scope: Scope) -> None:
    callers.current.reset(scope[0])
    current.reset(scope[1])


@dataclass(frozen=True)
class Policy:
    callers: Mapping[str, Rights]

    def rights(self, caller: str) -> Rights:
        return self.callers.get(caller, NOTHING)


def _method_exists(name: str) -> bool:
    service, _, method = name.partition("/")
    if service not in SERVICES or not method:
        return False
    try:
        descriptor_pool.Default().FindMethodByName(f"{service}.{method}")
    except KeyError:
        return False
    return True


def _names(table: Mapping[str, Any], key: str, where: str) -> list[str]:
    value = table.get(key, [])
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ConfigError(f"AUTHZ_POLICY_FILE: {where}.{key} must be a list of strings")
    return value


def _rights(name: str, table: Any) -> Rights:
    where = f"callers.{name}"
    if not isinstance(table, dict):
        raise ConfigError(f"AUTHZ_POLICY_FILE: {where} must be a table")
    unknown_keys = set(table) - {"methods", "ledger_reasons"}
    if unknown_keys:
        raise ConfigError(f"AUTHZ_POLICY_FILE: {where} has unknown keys {sorted(unknown_keys)}")
    methods, reasons = _names(table, "methods", where), _names(table, "ledger_reasons", where)
    for method in methods:
        if method != ALL and not _method_exists(method):
            raise ConfigError(f"AUTHZ_POLICY_FILE: {where}.methods names no method of the services: {method!r}")
    for reason in reasons:
        if reason != ALL and reason not in LEDGER_REASONS:
            raise ConfigError(f"AUTHZ_POLICY_FILE: {where}.ledger_reasons names no ledger reason: {reason!r}")
    return Rights(
        None if ALL in methods else frozenset(methods),
        None if ALL in reasons else frozenset(reasons),
    )


def load_policy(path: Path) -> Policy:
    """The policy in the file; ConfigError naming what is wrong."""
    try:
        document = tomllib.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(f"AUTHZ_POLICY_FILE {path} cannot be read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"AUTHZ_POLICY_FILE {path} is not valid TOML: {exc}") from None
    unknown = set(document) - {"callers"}
    if unknown:
        raise ConfigError(f"AUTHZ_POLICY_FILE: unknown top-level keys {sorted(unknown)}")
    table = document.get("callers", {})
    if not isinstance(table, dict):
        raise ConfigError("AUTHZ_POLICY_FILE: callers must be a table of [callers.<name>]")
    return Policy({name: _rights(name, rights) for name, rights in table.items()})


def load(env: Mapping[str, str]) -> Policy | None:
    """The policy of AUTHZ_POLICY_FILE; None (everything allowed) only in development."""
    path = env.get("AUTHZ_POLICY_FILE", "").strip()
    if not path:
        if is_development(env):
            return None
        raise ConfigError(
            "AUTHZ_POLICY_FILE is not set: outside development a policy must say which caller may call what"
        )
    return load_policy(Path(path))


def refused(caller: str, method: str, reason: str | None = None) -> ServiceError:
    metadata = {"caller": caller, "method": method.lstrip("/")}
    what = f"method {metadata['method']}"
    if reason is not None:
        metadata["reason"] = str(reason)
        what = f"ledger reason {reason}"
    return ServiceError(
        grpc.StatusCode.PERMISSION_DENIED, REFUSED, f"caller {caller!r} is not allowed {what}", metadata
    )


@dataclass(frozen=True)
class Gate:
    """One server's checks: how callers are identified (mutual_tls) and the policy (None:
    everything allowed, development only)."""

    policy: Policy | None = None
    mutual_tls: bool = False

    def admit(self, context: grpc.aio.ServicerContext[Any, Any], method: str) -> Grant:
        """The call's caller and rights, refused (CALLER_NOT_ALLOWED) when the method is not
        among them."""
        caller = callers.identify(context, self.mutual_tls)
        rights = EVERYTHING if self.policy is None else self.policy.rights(caller)
        if not rights.allows_method(method):
            return Grant(caller, method, NOTHING, refused(caller, method))
        return Grant(caller, method, rights)


def check_reason(reason: str) -> None:
    """CALLER_NOT_ALLOWED unless the call's caller may write entries with reason (no prefix)."""
    grant = current.get()
    if grant is not None and not grant.rights.allows_reason(reason):
        raise refused(grant.caller, grant.method, reason)


def audit(action: str, **fields: object) -> None:
    """A line in the audit log: a maintenance action, by whom, in which request."""
    caller = callers.current.get() or callers.DEVELOPMENT_CALLER
    audit_log.info(action, extra={"caller": caller, "request_id": logs.request_id.get(), **fields})
