"""Secrets from files, and no secret in `make`'s output."""

from __future__ import annotations

from pathlib import Path

import pytest

from blumpo_common.config import ConfigError
from harness import ROOT
from tests.certificates import production_security
from tests.test_migrations import make
from token_service import config

SECRET = "f" * 40
PRODUCTION = {
    "TOKEN_DATABASE_URL": "postgresql://token_service@127.0.0.1:5432/blumpo",
    "PAGE_TOKEN_SECRET": "p" * 32,
    "OTP_SMTP_HOST": "smtp.example.com",
    "OTP_SMTP_FROM": "login@blumpo.example",
    "OTP_SMTP_USER": "mailer",
}


def test_secrets_come_from_files(tmp_path: Path) -> None:
    (tmp_path / "otp").write_text(SECRET + "\n")
    (tmp_path / "smtp").write_text("mail-password\n")
    loaded = config.load(
        {
            **PRODUCTION,
            **production_security(),
            "OTP_SECRET_FILE": str(tmp_path / "otp"),
            "OTP_SMTP_PASSWORD_FILE": str(tmp_path / "smtp"),
        }
    )
    assert loaded.otp.secret == SECRET.encode()
    assert loaded.otp.smtp is not None and loaded.otp.smtp.password == "mail-password"
    assert SECRET not in repr(loaded) and "mail-password" not in repr(loaded)


@pytest.mark.parametrize(
    ("settings", "complaint"),
    [
        ({"OTP_SECRET": SECRET, "OTP_SECRET_FILE": "{dir}/otp"}, "OTP_SECRET and OTP_SECRET_FILE are both set"),
        ({"OTP_SECRET_FILE": "{dir}/missing"}, "OTP_SECRET_FILE {dir}/missing cannot be read"),
        (
            {"OTP_SECRET": SECRET, "OTP_SMTP_PASSWORD": "pw", "OTP_SMTP_PASSWORD_FILE": "{dir}/otp"},
            "OTP_SMTP_PASSWORD and OTP_SMTP_PASSWORD_FILE are both set",
        ),
    ],
)
def test_a_secret_given_twice_or_unreadable_is_refused_without_quoting_it(
    tmp_path: Path, settings: dict[str, str], complaint: str
) -> None:
    (tmp_path / "otp").write_text(SECRET)
    env = {**PRODUCTION, **{k: v.format(dir=tmp_path) for k, v in settings.items()}}
    with pytest.raises(ConfigError) as caught:
        config.load(env)
    assert complaint.format(dir=tmp_path) in str(caught.value)
    assert SECRET not in str(caught.value)


def test_make_does_not_echo_the_database_url(database_url: str) -> None:
    with_password = database_url.replace("postgresql://postgres@", "postgresql://postgres:hush-a-secret@")
    assert "hush-a-secret" in with_password
    for target in ("migrate", "migrate-status"):
        assert "hush-a-secret" not in make(target, with_password)
    # Every recipe line that holds the URL is silent (a line `make` would echo starts without @).
    for line in (ROOT / "Makefile").read_text().splitlines():
        if "DB_URL)" in line and line.startswith("\t"):
            assert line.startswith("\t@"), line
