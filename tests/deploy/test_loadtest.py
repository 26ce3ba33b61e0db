"""loadtests/: a short, bounded locust run (the whole mix: txt2img, GAN bursts, streams
left early) against a live service passes its thresholds and leaves CSV and HTML reports;
the thresholds fail a run that exceeds them; non-loopback targets are refused."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RUN = ROOT / "loadtests" / "run.py"

_spec = importlib.util.spec_from_file_location("loadtest_run", RUN)
run = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = run   # dataclasses look their module up there
_spec.loader.exec_module(run)

# Short and small, for a shared 2-core machine; generous latency bound for the same reason.
DURATION_S, USERS = 15, 4


@pytest.mark.parametrize("host", ["http://10.0.0.1:3000", "http://192.168.1.5", "http://example.com:80", "ftp://127.0.0.1"])
def test_non_loopback_targets_are_refused(host):
    with pytest.raises(ValueError):
        run.loopback_only(host)
    done = subprocess.run([sys.executable, str(RUN), "--host", host, "--duration", "1"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "refused" in done.stderr


@pytest.mark.parametrize("host", ["http://127.0.0.1:3000", "http://127.8.9.1:80/", "http://localhost:3000", "http://[::1]:3000"])
def test_loopback_targets_are_accepted(host):
    assert run.loopback_only(host) == host.rstrip("/")


def test_thresholds():
    ok = run.Figures(requests=100, failures=1, p50_ms=50, p95_ms=400, rps=5)
    assert run.check_thresholds(ok, max_error_rate=0.01, max_p95_ms=500) == []
    problems = run.check_thresholds(ok, max_error_rate=0.005, max_p95_ms=300)
    assert len(problems) == 2 and "error rate" in problems[0] and "p95" in problems[1]
    assert run.check_thresholds(run.Figures(0, 0, 0, 0, 0), 1.0, 1e9) == ["no request completed"]


@pytest.mark.server
def test_short_run_passes_its_thresholds_and_writes_reports(server, tmp_path):
    cmd = [sys.executable, str(RUN), "--host", server.url, "--users", str(USERS), "--spawn-rate", str(USERS),
           "--duration", str(DURATION_S), "--max-error-rate", "0.01", "--max-p95-ms", "10000",
           "--reports", str(tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=DURATION_S + 150)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    print(done.stdout)   # the figures, for the log (pytest -s)
    [stats] = tmp_path.glob("*_stats.csv")
    prefix = str(stats).removesuffix("_stats.csv")
    for suffix in ("_stats_history.csv", "_failures.csv", "_exceptions.csv", ".html"):
        assert Path(prefix + suffix).stat().st_size > 0, suffix
    figures, rows = run.read_figures(stats)
    assert figures.requests > 10 and figures.failures == 0
    names = {r["Name"] for r in rows}
    assert "/v1/gan/generate" in names and any(n.startswith("/v1/txt2img [") for n in names)
    assert any(n.startswith("/v1/txt2img/stream") for n in names)
    # The same figures against an impossible bound fail the run.
    assert run.check_thresholds(figures, max_error_rate=0.0, max_p95_ms=0.001)
