"""What the tests and the benchmarks share: scratch databases and services run as processes."""

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
