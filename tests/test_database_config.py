"""Which login each service uses, and how it talks to a pooler."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import pytest

from blumpo_common.config import ConfigError, login_url
from generation_service import config as generation_config
from tests.certificates import production_security
from token_service import config as token_config

ADMIN = "postgresql://postgres:s3cret@db.example:5433/blumpo?sslmode=verify-full&sslrootcert=/ca.pem"
DEVELOPMENT = {"BLUMPO_ENV": "development", "DATABASE_URL": ADMIN}


def test_a_login_url_keeps_everything_but_the_user() -> None:
    assert login_url(ADMIN, "token_service") == (
        "postgresql://token_service:s3cret@db.example:5433/blumpo?sslmode=verify-full&sslrootcert=/ca.pem"
    )
    assert login_url("postgresql://127.0.0.1/blumpo", "generation_service") == (
        "postgresql://generation_service@127.0.0.1/blumpo"
    )


def test_in_development_each_service_derives_its_login_from_database_url() -> None:
    assert token_config.load(DEVELOPMENT).database.url == login_url(ADMIN, "token_service")
    generation = generation_config.load(DEVELOPMENT).database
    assert generation.url == login_url(ADMIN, "generation_service")
    assert generation.listen_url == generation.url
    assert generation.pooler == "none" and generation.statement_cache_size == 100


def test_a_service_url_of_its_own_wins() -> None:
    own = "postgresql://token_service:other@pooler:6432/blumpo?sslmode=require"
    assert token_config.load({**DEVELOPMENT, "TOKEN_DATABASE_URL": own}).database.url == own


@pytest.mark.parametrize(
    ("load", "setting"),
    [(token_config.load, "TOKEN_DATABASE_URL"), (generation_config.load, "GENERATION_DATABASE_URL")],
)
def test_outside_development_the_migrations_login_is_refused(
    load: Callable[[Mapping[str, str]], object], setting: str
) -> None:
    with pytest.raises(ConfigError, match=setting):
        load({"DATABASE_URL": ADMIN, "BLUMPO_ENV": "production"})


def test_behind_a_transaction_pooler_no_statement_is_cached_and_listen_goes_direct() -> None:
    direct = "postgresql://generation_service@db.example:5432/blumpo"
    loaded = generation_config.load(
        {
            "GENERATION_DATABASE_URL": "postgresql://generation_service@pooler:6432/blumpo",
            "DATABASE_LISTEN_URL": direct,
            "DB_POOLER": "transaction",
            "PAGE_TOKEN_SECRET": "p" * 32,
            **production_security(),
        }
    ).database
    assert loaded.statement_cache_size == 0
    assert loaded.listen_url == direct


@pytest.mark.parametrize(
    ("env", "name"),
    [
        ({"DB_POOLER": "statement"}, "DB_POOLER"),
        ({"DATABASE_LISTEN_URL": "mysql://x/y"}, "DATABASE_LISTEN_URL"),
        ({"GENERATION_DATABASE_URL": "postgresql://generation_service@h:x/blumpo"}, "GENERATION_DATABASE_URL"),
    ],
)
def test_malformed_database_settings_name_themselves(env: dict[str, str], name: str) -> None:
    with pytest.raises(ConfigError, match=name):
        generation_config.load({**DEVELOPMENT, **env})


def test_no_password_is_shown_in_the_settings() -> None:
    assert "s3cret" not in repr(token_config.load(DEVELOPMENT))
