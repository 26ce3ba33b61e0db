"""A failed start stops the whole server, with a non-zero exit status.

BentoML's supervisor (the `bentoml serve` process, a circus arbiter) holds the listening
socket and respawns a worker whose start failed, forever outside a container: the port
stays open, connections are accepted and never answered, and a readiness probe without a
client timeout hangs instead of being refused. So the supervisor learns of a failed start
from its worker (SIGUSR1), stops as on SIGTERM (closing the port) and exits with status 1.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import signal
import sys

log = logging.getLogger("genserve")

SERVER_PID = "GENSERVE_SERVER_PID"  # set by the supervisor, inherited by its workers
_failed = False


def supervise() -> None:
    """In the supervisor, before its workers start (BentoML's on_deployment hook)."""
    os.environ[SERVER_PID] = str(os.getpid())
    atexit.register(_exit_status)  # registered early, so it runs after the later handlers

    def on_failed_start(sig, frame):
        global _failed
        if _failed:
            return
        _failed = True
        log.error("the service failed to start (the worker's log above says why); stopping the server")
        signal.raise_signal(signal.SIGTERM)  # circus's own stop: workers, then the socket

    signal.signal(signal.SIGUSR1, on_failed_start)


def _exit_status() -> None:
    if _failed:
        sys.stdout.flush(), sys.stderr.flush()
        os._exit(1)


@contextlib.contextmanager
def failure_stops_the_server(cleanup=None):
    """Around a worker's start-up: a failure runs `cleanup` (no shutdown hook runs after a
    failed start) and tells the supervisor (when there is one) before it propagates."""
    try:
        yield
    except BaseException:
        if cleanup is not None:
            cleanup()
        supervisor = os.getppid()
        if os.environ.get(SERVER_PID) == str(supervisor):
            os.kill(supervisor, signal.SIGUSR1)
        raise
