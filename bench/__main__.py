import asyncio
import sys

from bench.refill import main

sys.exit(asyncio.run(main(sys.argv[1:])))
