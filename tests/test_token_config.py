"""Start-up settings of the token service: OTP secret, TTL, the code sender."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from blumpo_common.config import ConfigError
from harness import ROOT
from tests.certificates import production_security
from token_service import config

BASE = {"TOKEN_DATABASE_URL": "postgresql://token_service@127.0.0.1:5432/blumpo", "PAGE_TOKEN_SECRET": "p" * 32}
SECRET = "s" * 32
SMTP = {"OTP_SMTP_HOST": "smtp.example.com", "OTP_SMTP_FROM": "login@blumpo.example"}


def test_a_missing_secret_is_refused_outside_development() -> None:
    with pytest.raises(ConfigError, match="OTP_SECRET"):
        config.load({**BASE, **SMTP})
    with pytest.raises(ConfigError, match="OTP_SECRET"):
        config.load({**BASE, **SMTP, "BLUMPO_ENV": "production"})


def test_development_uses_the_named_development_secret_and_the_log_sender() -> None:
    loaded = config.load({**BASE, "BLUMPO_ENV": "development"})
    assert loaded.development
    assert loaded.otp.secret == config.DEVELOPMENT_OTP_SECRET.encode()
    assert loaded.otp.development_secret
    assert loaded.otp.smtp is None
    assert loaded.otp.ttl_seconds == 600


def test_production_settings() -> None:
    loaded = config.load(
        {
            **BASE,
            **SMTP,
            **production_security(),
            "OTP_SECRET": SECRET,
            "OTP_TTL_SECONDS": "300",
            "OTP_SMTP_PORT": "2525",
            "OTP_SMTP_USER": "mailer",
            "OTP_SMTP_PASSWORD": "pw",
            "OTP_SMTP_STARTTLS": "false",
        }
    )
    assert not loaded.development and not loaded.otp.development_secret
    assert loaded.otp.secret == SECRET.encode()
    assert loaded.otp.ttl_seconds == 300
    assert loaded.otp.smtp == config.SmtpConfig(
        "smtp.example.com", 2525, "login@blumpo.example", "mailer", "pw", starttls=False, timeout_seconds=10
    )


@pytest.mark.parametrize(
    ("env", "names"),
    [
        ({"OTP_SECRET": "short"}, "OTP_SECRET"),
        ({"OTP_SECRET": SECRET, "OTP_TTL_SECONDS": "ten"}, "OTP_TTL_SECONDS"),
        ({"OTP_SECRET": SECRET, "OTP_TTL_SECONDS": "5"}, "OTP_TTL_SECONDS"),
        ({"OTP_SECRET": SECRET, "OTP_SMTP_HOST": ""}, "OTP_SMTP_HOST"),
        ({"OTP_SECRET": SECRET, "OTP_SMTP_FROM": "nobody"}, "OTP_SMTP_FROM"),
        ({"OTP_SECRET": SECRET, "OTP_SMTP_USER": "mailer"}, "OTP_SMTP_USER"),
        ({"OTP_SECRET": SECRET, "OTP_SMTP_PORT": "99999"}, "OTP_SMTP_PORT"),
        ({"OTP_SECRET": SECRET, "OTP_SMTP_STARTTLS": "maybe"}, "OTP_SMTP_STARTTLS"),
    ],
)
def test_malformed_settings_name_themselves(env: dict[str, str], names: str) -> None:
    with pytest.raises(ConfigError, match=names):
        config.load({**BASE, **SMTP, **env})


def test_start_up_exits_with_one_clear_line_without_a_secret() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTP_", "BLUMPO_ENV"))}
    env.update({**BASE, **SMTP})
    done = subprocess.run(
        [sys.executable, "-m", "token_service"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2
    [line] = done.stderr.strip().splitlines()
    assert "OTP_SECRET" in line
