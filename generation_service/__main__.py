"""Serves the generation service: image generation jobs, their assets and variants."""

import signal

from blumpo_common import cli


def entry() -> None:
    """The console script blumpo-generation-service, and `python -m generation_service`."""
    # SIGHUP re-reads the certificates once serving (blumpo_common.server); until then, and for
    # good without TLS, it is ignored, so a rotation that lands during start-up ends nothing.
    # Set before the service's modules load, and inherited by the worker processes it spawns.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    from generation_service.server import main

    cli.run("blumpo-generation-service", __doc__ or "", main)


# Guarded: worker processes (spawned) import this module again.
if __name__ == "__main__":
    entry()
