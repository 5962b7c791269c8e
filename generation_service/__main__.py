"""Serves the generation service: image generation jobs, their assets and variants."""

from blumpo_common import cli
from generation_service.server import main


def entry() -> None:
    """The console script blumpo-generation-service, and `python -m generation_service`."""
    cli.run("blumpo-generation-service", __doc__ or "", main)


# Guarded: worker processes (spawned) import this module again.
if __name__ == "__main__":
    entry()
