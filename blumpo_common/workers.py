"""A service as WORKERS server processes sharing one listening port.

One Python process serves gRPC on one core at most. With WORKERS > 1 the process started
becomes a supervisor: it serves the metrics of all workers (prometheus_client's
multiprocess mode; metrics.publish_scraped copies the gauges read at scrape time there), starts
the workers, passes SIGTERM and SIGINT (and SIGHUP, which re-reads certificates) on to them and
exits when they have. Each worker is a whole server on the same address (gRPC listens with
SO_REUSEPORT, so the kernel spreads connections over them) with its own connection pool.
A worker that dies takes the others down, so whatever supervises the service sees it fail;
and a worker dies with its supervisor, so a killed service leaves nothing listening.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable
from typing import Any, NoReturn

import prometheus_client
from prometheus_client import multiprocess

from blumpo_common.config import ConfigError, ServerConfig, exit_on
from blumpo_common.server import check_bindable

log = logging.getLogger(__name__)

METRICS_DIR = "PROMETHEUS_MULTIPROC_DIR"
_PR_SET_PDEATHSIG = 1


def supervise(
    name: str, config: ServerConfig, worker: Callable[[Any], None], argument: Any, *, reload: bool = False
) -> NoReturn:
    """Runs config.workers processes of worker(argument) (a module-level function) until SIGTERM
    or SIGINT (then exits 0 once they have stopped), or until one stops by itself (then stops
    the others and exits non-zero). With reload (the workers re-read their certificates on
    SIGHUP), SIGHUP is passed on to every worker."""
    try:
        # Here, so that an address no worker could use is one line, not one per worker.
        check_bindable(config.listen_addr, share_port=False)
    except OSError as exc:
        exit_on(name, ConfigError(f"{config.listen_setting} {config.listen_addr} cannot be used: {exc}"))
    metrics_dir = tempfile.mkdtemp(prefix=f"{name}-metrics-")
    # Read by prometheus_client in each worker when it starts.
    os.environ[METRICS_DIR] = metrics_dir
    try:
        registry = prometheus_client.CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=metrics_dir)  # type: ignore[no-untyped-call]
        host, _, port = config.metrics_addr.rpartition(":")
        try:
            prometheus_client.start_http_server(int(port), host, registry=registry)
        except OSError as exc:
            exit_on(name, ConfigError(f"{config.metrics_setting} {config.metrics_addr} cannot be used: {exc}"))
        context = multiprocessing.get_context("spawn")
        workers = [
            context.Process(target=_worker, args=(os.getpid(), worker, argument), name=f"{name}-{n}")
            for n in range(config.workers)
        ]
        stopping = False

        def stop(signum: int, frame: object) -> None:
            nonlocal stopping
            stopping = True
            for process in workers:
                if process.pid is not None and process.exitcode is None:
                    os.kill(process.pid, signal.SIGTERM)

        def pass_on(signum: int, frame: object) -> None:
            for process in workers:
                if process.pid is not None and process.exitcode is None:
                    os.kill(process.pid, signum)

        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, stop)
        for process in workers:
            process.start()
        # After the start: the workers inherit SIGHUP ignored (not this handler, which exec would
        # reset to the default, ending them) until each installs its own.
        if reload:
            signal.signal(signal.SIGHUP, pass_on)
        log.info("workers started", extra={"workers": config.workers})
        ended = multiprocessing.connection.wait([p.sentinel for p in workers])
        if not stopping:
            first = next(p for p in workers if p.sentinel in ended)
            first.join()
            log.error("a worker stopped: stopping the others", extra={"worker": first.name, "exit": first.exitcode})
            stop(signal.SIGTERM, None)
            for process in workers:
                process.join()
            # A worker killed by a signal has a negative exit code: the service failed all the same.
            sys.exit(first.exitcode if first.exitcode and first.exitcode > 0 else 1)
        for process in workers:
            process.join()
        sys.exit(0 if all(p.exitcode in (0, -signal.SIGTERM) for p in workers) else 1)
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)


def _worker(supervisor: int, worker: Callable[[Any], None], argument: Any) -> None:
    # Dies with the supervisor, however that ends (Linux).
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != supervisor:  # it was gone before the line above
        sys.exit(1)
    worker(argument)
