"""A container's health check: exit 0 when the gRPC health service at the target answers
SERVING, 1 otherwise. The target is the first argument, else HEALTHCHECK_TARGET, else the token
service's port on the loopback address.

    blumpo-healthcheck [HOST:PORT]
"""

from __future__ import annotations

import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

DEFAULT_TARGET = "127.0.0.1:50051"
TIMEOUT_SECONDS = 3.0


def healthy(target: str) -> bool:
    with grpc.insecure_channel(target) as channel:
        try:
            answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT_SECONDS)
        except grpc.RpcError:
            return False
    return bool(answer.status == health_pb2.HealthCheckResponse.SERVING)


def main() -> None:
    target = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("HEALTHCHECK_TARGET") or DEFAULT_TARGET
    sys.exit(0 if healthy(target) else 1)


if __name__ == "__main__":
    main()
