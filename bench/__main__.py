"""`python -m bench [floor] [append] [generation] [queue] [refill] [scale] [--queue-max N] [--write-docs]`:
runs the benchmarks on a scratch database; all of them by default."""

import argparse
import asyncio
import os
import sys
import tempfile
from pathlib import Path

from bench import append, common, floor, generation, queue, refill, scale
from harness import databases
from token_service import refill as refill_job


async def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("which", nargs="*", help="floor, append, generation, queue, refill, scale (default: all)")
    parser.add_argument("--accounts", type=int, default=100_000, help="accounts for the refill")
    parser.add_argument(
        "--queue-max", type=int, default=100_000, help="longest queue for `queue` (1000000: a few minutes more)"
    )
    parser.add_argument("--write-docs", action="store_true", help="put the figures into docs/benchmarks.md")
    args = parser.parse_args(argv)
    unknown = set(args.which) - {"floor", "append", "generation", "queue", "refill", "scale"}
    if unknown:
        parser.error(f"unknown benchmark {', '.join(sorted(unknown))}")
    base = os.environ.get("DATABASE_URL") or os.environ.get("POSTGRES_URL")
    if not base:
        print("DATABASE_URL is not set: run `make bench`", file=sys.stderr)
        return 2
    for which in args.which or ["floor", "append", "generation", "queue", "refill", "scale"]:
        url = databases.scratch_database_url(base, "bench")
        databases.dbmate(url, "up")
        try:
            if which == "refill":
                lines = await refill.bench(url, args.accounts, refill_job.BATCH_SIZE)
            elif which == "queue":
                lines = await queue.bench(url, args.queue_max)
            else:
                with tempfile.TemporaryDirectory() as work_dir:
                    benches = {"floor": floor.bench, "append": append.bench, "generation": generation.bench}
                    run = {**benches, "scale": scale.bench}[which]
                    lines = await run(url, Path(work_dir))
        finally:
            databases.drop_database(url)
        print(f"## {which}\n" + "\n".join(lines) + "\n", flush=True)
        if args.write_docs:
            common.write_docs(which, lines)
    return 0


# Guarded: the load generator's processes (spawned) import this module again.
if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1:])))
