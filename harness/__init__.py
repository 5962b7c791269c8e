"""What the tests and the benchmarks share: scratch databases, services run as processes, a private
PostgreSQL server to restart and a proxy to make the database slow or silent."""

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
