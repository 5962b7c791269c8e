"""A service's command line: every setting comes from the environment, so it takes no option
but --help, which says what it serves and where its settings are described."""

from __future__ import annotations

import argparse
from collections.abc import Callable

SETTINGS = (
    "Every setting comes from the environment (DATABASE_URL or the service's own *_DATABASE_URL, "
    "*_LISTEN_ADDR, ...): see the settings table in docs/operations.md. A missing or malformed one "
    "stops start-up with one line naming it (exit status 2)."
)


def run(prog: str, description: str, main: Callable[[], None]) -> None:
    argparse.ArgumentParser(prog=prog, description=description, epilog=SETTINGS).parse_args()
    main()
