"""Serves the token service: users, token accounts, the ledger, one-time-password login and plans."""

import signal

from blumpo_common import cli


def entry() -> None:
    """The console script blumpo-token-service, and `python -m token_service`."""
    # SIGHUP re-reads the certificates once serving (blumpo_common.server); until then, and for
    # good without TLS, it is ignored, so a rotation that lands during start-up ends nothing.
    # Set before the service's modules load, and inherited by the worker processes it spawns.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    from token_service.server import main

    cli.run("blumpo-token-service", __doc__ or "", main)


# Guarded: worker processes (spawned) import this module again.
if __name__ == "__main__":
    entry()
