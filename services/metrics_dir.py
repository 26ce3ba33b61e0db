"""A Prometheus multiprocess directory of each server's own.

BentoML hands every worker PROMETHEUS_MULTIPROC_DIR=$BENTOML_HOME/prometheus_multiproc_dir:
one directory for every BentoML server on the host, emptied whenever one of them starts.
A second server wiped the first's series, and each /metrics then read the other's files.

The workers of one server share their supervisor (the `bentoml serve` process), so the
directory is named after it: <tmp>/genserve-metrics/<supervisor pid>-<its start time>.
A worker points PROMETHEUS_MULTIPROC_DIR there before any metric holds a value (this runs
when the service module is imported, before BentoML builds its app), removes the
directories of servers that are gone, and when it shuts down removes its server's
directory if no other worker of that server is alive.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

log = logging.getLogger("genserve")

ENV = "PROMETHEUS_MULTIPROC_DIR"
_DB_FILE = re.compile(r"_(\d+)\.db$")  # prometheus_client's files: <kind>_<pid>.db
_directory: Path | None = None  # this worker's server's directory, once chosen


def base_dir() -> Path:
    return Path(tempfile.gettempdir()) / "genserve-metrics"


def _started(pid: int) -> str | None:
    """A process's identity beyond its pid (pids are reused): its start time, or None when gone."""
    import psutil

    try:
        return f"{psutil.Process(pid).create_time():.2f}"
    except psutil.Error:
        return None


def _server_alive(name: str) -> bool:
    pid, _, started = name.partition("-")
    return pid.isdigit() and _started(int(pid)) == started


def _writers(directory: Path) -> set[int]:
    return {int(m.group(1)) for f in directory.glob("*.db") if (m := _DB_FILE.search(f.name))}


def use_private_multiprocess_dir() -> Path | None:
    """In a BentoML worker (BentoML set PROMETHEUS_MULTIPROC_DIR): moves it to this server's
    own directory and returns it. Elsewhere (tests, tools): None, nothing changes.
    The service calls `release()` when it shuts down."""
    if ENV not in os.environ:
        return None
    supervisor = os.getppid()
    base = base_dir()
    directory = base / f"{supervisor}-{_started(supervisor)}"
    try:
        base.mkdir(mode=0o700, parents=True, exist_ok=True)
        for old in base.iterdir():  # servers stopped without cleaning up (killed)
            if not _server_alive(old.name):
                shutil.rmtree(old, ignore_errors=True)
        directory.mkdir(mode=0o700, exist_ok=True)
    except OSError as exc:  # mixed metrics are better than no server
        log.warning("metrics stay in BentoML's shared directory %s: %s cannot be created (%s)",
                    os.environ[ENV], directory, exc)
        return None
    os.environ[ENV] = str(directory)
    _forget_dead_workers(directory)
    global _directory
    _directory = directory
    return directory


def _forget_dead_workers(directory: Path) -> None:
    """A worker that died without saying so (a crash the supervisor respawned after) leaves
    its live gauges behind; they would be summed in forever."""
    from prometheus_client import multiprocess

    for pid in _writers(directory) - {os.getpid()}:
        if _started(pid) is None:
            multiprocess.mark_process_dead(pid, str(directory))


def release() -> None:
    """At shutdown: removes this server's directory unless another of its workers is alive.
    (Not at exit: uvicorn ends a worker by re-raising SIGTERM, which skips atexit.)"""
    directory = _directory
    if directory is None:
        return
    if any(pid != os.getpid() and _started(pid) is not None for pid in _writers(directory)):
        return  # another worker of this server still serves /metrics from it
    shutil.rmtree(directory, ignore_errors=True)
