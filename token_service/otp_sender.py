"""Delivery of login codes: to the log in development, by SMTP otherwise.

A sender is the only place a code exists in clear outside the caller's request.
"""

from __future__ import annotations

import asyncio
import logging
import smtplib
import ssl
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from email.message import EmailMessage
from typing import Protocol

from token_service.config import OtpConfig, SmtpConfig

log = logging.getLogger(__name__)

# SMTP sessions run at once; more requests wait for a free one (holding no database connection).
MAX_CONCURRENT_SENDS = 32


class DeliveryError(Exception):
    """The code could not be handed over for delivery."""


class OtpSender(Protocol):
    async def send(self, email: str, code: str, expires_at: datetime) -> None:
        """Hands the code over for delivery; raises DeliveryError when it cannot."""


class LogSender:
    """Development only: writes the code to the service log."""

    async def send(self, email: str, code: str, expires_at: datetime) -> None:
        log.warning(
            "development login code (BLUMPO_ENV=development; never in production)",
            extra={"email": email, "otp_code": code, "expires_at": expires_at.isoformat()},
        )


def mailbox(email: str) -> str:
    """The address as every mail relay takes it: an internationalised domain in its ASCII
    (IDNA) form. A non-ASCII local part stays as it is; only a relay with SMTPUTF8 takes that."""
    local, _, domain = email.rpartition("@")
    try:
        return f"{local}@{domain.encode('idna').decode('ascii')}"
    except UnicodeError:
        return email


class SmtpSender:
    """Mails the code with the standard library, STARTTLS unless configured off."""

    def __init__(self, config: SmtpConfig) -> None:
        self.config = config
        # Its own threads: a mail server that hangs must not fill the loop's default executor,
        # which asyncio also resolves host names with (asyncpg's new connections among them).
        self.threads = ThreadPoolExecutor(MAX_CONCURRENT_SENDS, thread_name_prefix="smtp")

    def message(self, email: str, code: str, expires_at: datetime) -> EmailMessage:
        message = EmailMessage()
        message["From"] = self.config.sender_address
        message["To"] = mailbox(email)
        message["Subject"] = f"Your Blumpo login code: {code}"
        message.set_content(
            f"Your Blumpo login code is {code}.\n\n"
            f"It expires at {expires_at:%Y-%m-%d %H:%M} UTC and works once. "
            "If you did not ask to log in, ignore this email.\n"
        )
        return message

    def _send(self, message: EmailMessage) -> None:
        config = self.config
        with smtplib.SMTP(config.host, config.port, timeout=config.timeout_seconds) as smtp:
            if config.starttls:
                smtp.starttls(context=ssl.create_default_context())
            if config.user:
                smtp.login(config.user, config.password)
            smtp.send_message(message)

    async def send(self, email: str, code: str, expires_at: datetime) -> None:
        try:
            # smtplib blocks: keep it off the event loop.
            message = self.message(email, code, expires_at)
            await asyncio.get_running_loop().run_in_executor(self.threads, self._send, message)
        except (OSError, smtplib.SMTPException) as exc:
            # The exception text never holds the code; the message body is not in it.
            raise DeliveryError(f"{type(exc).__name__}: {exc}") from None


def from_config(config: OtpConfig) -> OtpSender:
    return LogSender() if config.smtp is None else SmtpSender(config.smtp)
