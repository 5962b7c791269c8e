"""Development only: lets the services log in with the password of DATABASE_URL.

In development each service derives its login from DATABASE_URL (same host, port and
database; its own role as the user; the same password). A server that trusts local
connections needs nothing more. One that asks for a password gets it here: each service
role is given the password of DATABASE_URL, so no new secret exists. `make run`, `make seed`
and the tests run this after the migrations; outside development a deployment sets the
roles' passwords (or certificates) itself, and this is never run.
"""

from __future__ import annotations

import asyncio
import os
import sys
from urllib.parse import unquote, urlsplit

import asyncpg

# The login roles the migrations create.
SERVICE_ROLES = ("token_service", "generation_service")


async def set_passwords(admin_url: str) -> bool:
    """Gives each service role the password of admin_url; False (nothing done) when it has none."""
    password = urlsplit(admin_url).password
    if password is None:
        return False
    conn = await asyncpg.connect(admin_url)
    try:
        for role in SERVICE_ROLES:
            # ALTER ROLE takes no parameters: format() quotes the password as a literal.
            statement = await conn.fetchval(
                "SELECT format('ALTER ROLE %I PASSWORD %L', $1::text, $2::text)", role, unquote(password)
            )
            await conn.execute(statement)
    finally:
        await conn.close()
    return True


def main() -> int:
    url = os.environ.get("DATABASE_URL") or os.environ.get("POSTGRES_URL") or ""
    if not url:
        print("development_logins: DATABASE_URL is not set", file=sys.stderr)
        return 2
    if asyncio.run(set_passwords(url)):
        print(
            "development logins: token_service and generation_service use the password of DATABASE_URL", file=sys.stderr
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
