"""Atomic repository writes and the export report.

An export writes every graph into a staging folder beside the repository (same file system, so
a rename moves it) and moves the model folders into place only once every component exported
and verified: a failed or interrupted export leaves the repository as it was, never a U-Net
without its VAE or a graph without its config. The report of what was verified, how long it
took and how much memory it needed goes into `<repository>/export_report.json`, keyed by
pipeline name (Triton ignores files at the repository's top level).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

REPORT_FILE = "export_report.json"


@contextmanager
def staged_repository(repository: Path, name: str) -> Iterator[Path]:
    """Yields a fresh folder to export `name` into; on a clean exit each model folder in it
    replaces the repository's folder of the same name, on an exception nothing moves."""
    repository = Path(repository).resolve()
    repository.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{repository.name}.staging-{name}-", dir=repository.parent))
    try:
        yield staging
        repository.mkdir(exist_ok=True)
        _move_into_place(staging, repository)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _move_into_place(staging: Path, repository: Path) -> None:
    """Renames each staged model folder into the repository; a folder it replaces is set aside
    first and put back if a later rename fails."""
    replaced = staging / ".replaced"
    replaced.mkdir()
    moved: list[tuple[Path, Path | None]] = []  # (destination, what it replaced)
    try:
        for src in sorted(p for p in staging.iterdir() if p.is_dir() and p != replaced):
            dest = repository / src.name
            old = None
            if dest.exists():
                old = replaced / src.name
                os.replace(dest, old)
            moved.append((dest, old))
            os.replace(src, dest)
    except BaseException:
        for dest, old in reversed(moved):
            if dest.exists():
                shutil.rmtree(dest)
            if old is not None:
                os.replace(old, dest)
        raise


class PeakRSS:
    """This process's resident memory, sampled in a thread: `peak` bytes over the block (and at
    least the resident size at its start and end)."""

    def __init__(self, interval: float = 0.05):
        self.interval, self.peak = interval, 0
        self._stop = threading.Event()

    @staticmethod
    def current() -> int:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:  # not Linux: the process's lifetime peak is what there is
            import resource

            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self.current())

    def __enter__(self) -> PeakRSS:
        self.peak = self.current()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.current())


@dataclass
class Measured:
    wall_s: float = 0.0
    peak_rss_bytes: int = 0


@contextmanager
def measured() -> Iterator[Measured]:
    """Wall time and peak RSS of a block."""
    result = Measured()
    start = time.perf_counter()
    with PeakRSS() as rss:
        yield result
    result.wall_s, result.peak_rss_bytes = time.perf_counter() - start, rss.peak


def report_rows(reports) -> list[dict]:
    return [{"component": r.name, "wall_s": round(r.wall_s, 1), "peak_rss_gib": round(r.peak_rss_bytes / 2**30, 2),
             "verified": r.verified, "max_abs_error": r.max_abs_error, "external_data": r.external_data}
            for r in reports]


def write_export_report(repository: Path, name: str, family: str, reports, wall_s: float, peak_rss_bytes: int) -> Path:
    """Sets `name`'s entry of the repository's export_report.json (others' entries stay)."""
    path = Path(repository) / REPORT_FILE
    report = json.loads(path.read_text()) if path.exists() else {}
    report[name] = {"family": family, "wall_s": round(wall_s, 1), "peak_rss_gib": round(peak_rss_bytes / 2**30, 2),
                    "components": report_rows(reports)}
    tmp = path.with_name(f".{REPORT_FILE}.{os.getpid()}")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def format_report(reports) -> str:
    """The report as a table for the terminal."""
    rows = [("component", "wall", "peak RSS", "max error", "verified")]
    rows += [(r.name, f"{r.wall_s:.1f} s", f"{r.peak_rss_bytes / 2**30:.2f} GiB", f"{r.max_abs_error:.1e}",
              r.verified) for r in reports]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row[:4], widths)) + "  " + row[4] for row in rows)
