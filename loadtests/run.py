"""Headless locust run against a genserve on this machine, with pass/fail thresholds.

    .venv/bin/python loadtests/run.py --users 8 --spawn-rate 2 --duration 60 \
        --max-error-rate 0.01 --max-p95-ms 5000                   # starts its own service
    .venv/bin/python loadtests/run.py --host http://127.0.0.1:3000 --duration 30

Without --host it starts `bentoml serve` itself on a free loopback port (embedded ONNX
Runtime backend, GENSERVE_MODEL_REPOSITORY or model_repository/) and stops it after.
Only loopback targets are accepted (127.0.0.0/8, ::1, localhost): load is never sent to
another machine. The run is bounded by --duration (at most an hour).

Writes under --reports (default loadtests/reports/, git-ignored), per run
`<stamp>_stats.csv`, `_stats_history.csv`, `_failures.csv`, `_exceptions.csv` and
`<stamp>.html`; prints the figures; exits 1 when the error rate or the p95 latency of
all requests together exceed the thresholds, 2 on bad arguments or a failed run.
"""

from __future__ import annotations

import argparse
import csv
import ipaddress
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from tests.fixtures.local_server import LocalServer  # noqa: E402

LOCUSTFILE = HERE / "locustfile.py"
MAX_DURATION_S = 3600


@dataclass
class Figures:
    """The aggregated row of locust's stats CSV."""

    requests: int
    failures: int
    p50_ms: float
    p95_ms: float
    rps: float

    @property
    def error_rate(self) -> float:
        return self.failures / self.requests if self.requests else 0.0


def loopback_only(url: str) -> str:
    """The URL if it names a loopback address; ValueError otherwise. No DNS lookup: a
    name other than localhost is refused rather than resolved."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"--host must be http(s)://HOST:PORT, got {url!r}")
    host = parts.hostname
    if host != "localhost":
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(f"--host {url!r}: only loopback targets (127.0.0.0/8, ::1, localhost) "
                             "are allowed; names are not resolved") from None
        if not address.is_loopback:
            raise ValueError(f"--host {url!r} is not a loopback address: load tests stay on this machine")
    return url.rstrip("/")


def read_figures(stats_csv: Path) -> tuple[Figures, list[dict]]:
    """(aggregated figures, per-request-name rows) from locust's `_stats.csv`."""
    with open(stats_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    total = next((r for r in rows if r["Name"] == "Aggregated"), None)
    if total is None:
        raise ValueError(f"{stats_csv}: no Aggregated row")

    def ms(value: str) -> float:
        return float(value) if value not in ("", "N/A") else 0.0

    figures = Figures(requests=int(total["Request Count"]), failures=int(total["Failure Count"]),
                      p50_ms=ms(total["50%"]), p95_ms=ms(total["95%"]), rps=float(total["Requests/s"]))
    return figures, [r for r in rows if r["Name"] != "Aggregated"]


def check_thresholds(figures: Figures, max_error_rate: float, max_p95_ms: float) -> list[str]:
    """What exceeded its threshold, in words; empty when the run passes."""
    problems = []
    if figures.requests == 0:
        problems.append("no request completed")
    if figures.error_rate > max_error_rate:
        problems.append(f"error rate {figures.error_rate:.2%} > {max_error_rate:.2%}")
    if figures.p95_ms > max_p95_ms:
        problems.append(f"p95 {figures.p95_ms:.0f} ms > {max_p95_ms:.0f} ms")
    return problems


def run_locust(host: str, args: argparse.Namespace, prefix: Path) -> int:
    cmd = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless",
           "--host", host, "--users", str(args.users), "--spawn-rate", str(args.spawn_rate),
           "--run-time", f"{args.duration}s", "--stop-timeout", "10",
           "--csv", str(prefix), "--html", f"{prefix}.html", "--only-summary",
           "--loglevel", "WARNING"]
    if args.user_classes:
        cmd += args.user_classes
    # Bounded twice: locust's --run-time, and a hard limit here in case it hangs.
    return subprocess.run(cmd, cwd=ROOT, timeout=args.duration + 120).returncode


def print_figures(figures: Figures, rows: list[dict], args: argparse.Namespace) -> None:
    print(f"\n{'name':58} {'reqs':>6} {'fails':>6} {'p50 ms':>8} {'p95 ms':>8}")
    for r in rows:
        print(f"{r['Type'] + ' ' + r['Name']:58.58} {r['Request Count']:>6} {r['Failure Count']:>6} "
              f"{r['50%']:>8} {r['95%']:>8}")
    print(f"\nusers={args.users} duration={args.duration}s requests={figures.requests} "
          f"failures={figures.failures} ({figures.error_rate:.2%}) p50={figures.p50_ms:.0f}ms "
          f"p95={figures.p95_ms:.0f}ms throughput={figures.rps:.2f} req/s")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", help="service base URL on loopback; default: start one here")
    p.add_argument("--users", type=int, default=4, help="concurrent simulated users (default 4)")
    p.add_argument("--spawn-rate", type=float, default=2.0, help="users started per second (default 2)")
    p.add_argument("--duration", type=int, default=30, help=f"seconds of load, 1-{MAX_DURATION_S} (default 30)")
    p.add_argument("--max-error-rate", type=float, default=0.01, help="fail above this failed/all ratio (default 0.01)")
    p.add_argument("--max-p95-ms", type=float, default=5000.0,
                   help="fail above this p95 over all requests (default 5000)")
    p.add_argument("--reports", type=Path, default=HERE / "reports", help="report folder (default loadtests/reports)")
    p.add_argument("user_classes", nargs="*", metavar="USER_CLASS",
                   help="run only these classes (Txt2ImgUser GANBurstUser StreamingUser); default: the mix")
    args = p.parse_args(argv)
    if not 1 <= args.duration <= MAX_DURATION_S:
        p.error(f"--duration must be within 1..{MAX_DURATION_S} seconds")
    if args.users < 1 or args.spawn_rate <= 0:
        p.error("--users must be >= 1 and --spawn-rate > 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        host = loopback_only(args.host) if args.host else None
    except ValueError as exc:
        print(f"refused: {exc}", file=sys.stderr)
        return 2
    args.reports.mkdir(parents=True, exist_ok=True)
    prefix = args.reports / time.strftime("%Y%m%d-%H%M%S")
    service = None
    try:
        if host is None:
            service = LocalServer({"GENSERVE_BACKEND": os.environ.get("GENSERVE_BACKEND", "onnxruntime"),
                                   "GENSERVE_MODEL_REPOSITORY": os.environ.get(
                                       "GENSERVE_MODEL_REPOSITORY", str(ROOT / "model_repository"))},
                                  Path(f"{prefix}_service.log"))
            service.wait_ready()
            host = service.url
            print(f"started genserve at {host} (log {prefix}_service.log)")
        code = run_locust(host, args, prefix)
    finally:
        if service is not None:
            service.stop()
    stats = Path(f"{prefix}_stats.csv")
    if code not in (0, 1) or not stats.exists():   # locust exits 1 when any request failed
        print(f"locust failed (exit {code}); no {stats}", file=sys.stderr)
        return 2
    figures, rows = read_figures(stats)
    print_figures(figures, rows, args)
    print(f"reports: {stats} and {prefix}.html")
    problems = check_thresholds(figures, args.max_error_rate, args.max_p95_ms)
    for problem in problems:
        print(f"FAIL: {problem}", file=sys.stderr)
    if not problems:
        print(f"PASS: error rate <= {args.max_error_rate:.2%}, p95 <= {args.max_p95_ms:.0f} ms")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
