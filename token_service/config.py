"""The token service's settings, from the environment."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from blumpo_common.config import DatabaseConfig, ServerConfig, load_database, load_server

PORT = 50051
METRICS_PORT = 9151


@dataclass(frozen=True)
class Config:
    database: DatabaseConfig
    server: ServerConfig


def load(env: Mapping[str, str]) -> Config:
    return Config(
        database=load_database(env, role="token_service", search_path="token"),
        server=load_server(env, "TOKEN", PORT, METRICS_PORT),
    )
