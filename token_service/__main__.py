"""Serves the token service: users, token accounts, the ledger, one-time-password login and plans."""

from blumpo_common import cli
from token_service.server import main


def entry() -> None:
    """The console script blumpo-token-service, and `python -m token_service`."""
    cli.run("blumpo-token-service", __doc__ or "", main)


# Guarded: worker processes (spawned) import this module again.
if __name__ == "__main__":
    entry()
