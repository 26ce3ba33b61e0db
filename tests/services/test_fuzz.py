"""Schemathesis against the live server's OpenAPI document: every operation, positive and
negative examples, a fixed seed, a bounded amount of work.

The real tool, run as CI runs it (`st run`, the CLI of the pinned `schemathesis` in the
`test` extra), against a real `bentoml serve`. Passing means, for every request it sent:
no response >= 500, every status, content type, header and body as the document says,
and every request that breaks the schema refused (4xx). The document's JSON examples for
/img2img and /inpaint carry valid images (services/openapi.py), so those operations are
driven to 200 too, and the run's HAR log proves it.

The work is bounded (examples per operation and phase, a deadline per request), not the
wall time: a busy machine takes longer, it does not fail. A failure prints, from the run's
JUnit report, each failing operation, the checks it failed and the request that failed
them (a curl line); the JUnit XML and HAR log stay in the test's tmp_path.
"""

from __future__ import annotations

import collections
import json
import re
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit
from xml.etree import ElementTree

import pytest

pytestmark = [pytest.mark.server, pytest.mark.slow]

SEED = 20260601  # fixed: the same requests every run (coverage is deterministic; fuzzing follows the seed)
MAX_EXAMPLES = 100  # per operation and phase; ~30 s on 2 cores, 1,400-odd requests in all
REQUEST_TIMEOUT_S = 60  # the slowest valid request (8 images x 150 steps) takes seconds on CPU;
# a request past it is a failure, so a hang is caught without a deadline for the whole run

CHECKS = [
    "not_a_server_error",  # no 5xx, documented (500, 503, 504 are) or not
    "status_code_conformance",  # every status is documented for its operation
    "content_type_conformance",
    "response_schema_conformance",  # bodies (and SSE events) match their schemas
    "response_headers_conformance",  # Retry-After on 429/503, ...
    "negative_data_rejection",  # what breaks the schema is refused with a 4xx
    # Not positive_data_acceptance: the document cannot express every rule (seed + num_images
    # stay below 2**32, int(steps x strength) >= 1, the prompt's token count, a decodable image
    # of the right size, a model name that is served), and 404/422 for such requests are
    # documented answers, so a schema-valid request refused with 4xx is correct here, not a bug.
]


def _operation(url: str) -> str:
    """The document's path of a request URL: /v1/img2img -> /img2img."""
    path = urlsplit(url).path
    return path.removeprefix("/v1")


def har_statuses(har_path: Path) -> tuple[list, dict[tuple[str, str], collections.Counter]]:
    """The HAR log's entries, and per (method, document path) how often each status came back
    (0: no response)."""
    entries = json.loads(har_path.read_text())["log"]["entries"]
    statuses: dict[tuple[str, str], collections.Counter] = collections.defaultdict(collections.Counter)
    for entry in entries:
        request = entry["request"]
        statuses[(request["method"], _operation(request["url"]))][(entry.get("response") or {}).get("status", 0)] += 1
    return entries, statuses


def run_schemathesis(base: str, workdir: Path, max_examples: int = MAX_EXAMPLES,
                     phases: str = "examples,coverage,fuzzing") -> tuple[subprocess.CompletedProcess, Path, Path]:
    """`st run` against the document at `base`/openapi.json: (the finished run, its HAR log, its
    JUnit report). No wall-clock limit: the work is bounded, so a slow machine only takes longer."""
    report_dir = workdir / "schemathesis"
    har_path, junit_path = report_dir / "run.har.json", report_dir / "junit.xml"
    command = [
        str(Path(sys.executable).parent / "st"), "run", f"{base}/openapi.json",
        "--url", base,
        "--phases", phases,  # stateful off: no links between operations
        "--checks", ",".join(CHECKS),
        "--mode", "all",  # positive and negative examples
        "--max-examples", str(max_examples),
        "--seed", str(SEED),
        "--generation-database", "none",  # no examples replayed from earlier runs: reproducible
        "--request-timeout", str(REQUEST_TIMEOUT_S),
        "--workers", "1",  # the server has the machine's cores; one client keeps timings sane
        "--continue-on-failure",  # every distinct failure of an operation, not only its first
        "--report", "junit,har",
        "--report-dir", str(report_dir),
        "--report-junit-path", str(junit_path),
        "--report-har-path", str(har_path),
        "--no-color",
    ]
    # In workdir: Schemathesis keeps a crash cache (.schemathesis/) in its working directory and
    # replays it on the next run; a fresh one per run keeps runs reproducible and the checkout clean.
    return subprocess.run(command, capture_output=True, text=True, cwd=workdir), har_path, junit_path


def failures_in(junit_path: Path) -> str:
    """Each failing operation of a run, from its JUnit report: the operation, the checks it
    failed, and Schemathesis' account of each failure with its request as a curl line."""
    if not junit_path.exists():
        return "(no JUnit report)"
    found = []
    for case in ElementTree.parse(junit_path).iter("testcase"):
        for kind in ("failure", "error"):
            for outcome in case.iter(kind):
                found.append(f"== {case.get('name')}: {kind} ({outcome.get('message') or 'no message'})\n"
                             f"{(outcome.text or '').strip()}")
    return "\n\n".join(found) or "(the JUnit report lists no failure)"


def test_schemathesis_finds_nothing(server, tmp_path):
    base = f"{server.url}/v1"  # the document's `servers: [{"url": "/v1"}]`
    run, har_path, junit_path = run_schemathesis(base, tmp_path)
    output = run.stdout + run.stderr
    if not har_path.exists():
        pytest.fail(failure_message(run, junit_path, "(no HAR log)"), pytrace=False)

    # What was sent and answered, from the HAR log.
    entries, statuses = har_statuses(har_path)
    refused_methods = sorted(f"{m} {p}" for (m, p), c in statuses.items() if set(c) == {405})
    summary = "\n".join([f"  {m} {p}: {dict(sorted(c.items()))}" for (m, p), c in sorted(statuses.items())
                         if set(c) != {405}] + [f"  405 only: {len(refused_methods)} method/path pairs"])

    # A 504 for a deadline the request itself set (timeout_s can be 1 s) is the documented
    # answer, not a server fault; on a slow machine the generator's smallest deadlines meet it.
    # Schemathesis counts every 5xx, so a run whose only failures are such 504s passes here.
    deadlines = [e for e in entries if (e.get("response") or {}).get("status") == 504
                 and '"deadline_exceeded"' in (e["response"].get("content") or {}).get("text", "")]
    kinds = set(re.findall(r"^- (ST\d+) ", output, re.MULTILINE))
    only_deadlines = deadlines and kinds == {"ST101"} and "[504] Gateway Timeout" in output and all(
        line.strip().startswith("[504]") for line in output.splitlines() if re.match(r"\s*\[5\d\d\]", line))
    if run.returncode != 0 and not only_deadlines:
        pytest.fail(failure_message(run, junit_path, summary), pytrace=False)

    # Belt and braces on top of the checks: nothing >= 500 (or unanswered), every operation of
    # the document reached, each (img2img and inpaint included, thanks to the document's
    # examples) answered 200 at least once.
    server_errors = {op: {s: n for s, n in c.items() if s >= 500 or s <= 0} for op, c in statuses.items()}
    for entry in deadlines:  # the request's own deadline (above), not a server error
        server_errors[(entry["request"]["method"], _operation(entry["request"]["url"]))][504] -= 1
    server_errors = {op: {s: n for s, n in c.items() if n} for op, c in server_errors.items()}
    assert not any(server_errors.values()), f"responses >= 500 (or none):\n{summary}"
    with urllib.request.urlopen(f"{base}/openapi.json", timeout=30) as response:
        document = json.load(response)
    operations = {(method.upper(), path) for path, item in document["paths"].items() for method in item
                  if method in ("get", "post", "put", "patch", "delete")}
    assert {"/img2img", "/inpaint"} <= {p for _, p in operations}
    with urllib.request.urlopen(f"{base}/adapters", timeout=30) as response:
        if not json.load(response)["adapters"]:  # no model here serves adapters: loading can only be refused
            operations -= {("POST", "/adapters"), ("DELETE", "/adapters")}
    for method, path in sorted(operations):
        ok = statuses[(method, path)][200] + statuses[(method, path)][201]
        assert ok >= 1, f"{method} {path} never answered 2xx:\n{summary}"
    assert len(entries) >= 500, f"only {len(entries)} requests sent:\n{summary}"


def failure_message(run: subprocess.CompletedProcess, junit_path: Path, summary: str) -> str:
    """What a failed run prints: every failing operation, check and request first, then the
    statuses per operation and the end of Schemathesis' own output."""
    return (f"schemathesis exited with {run.returncode} (reports in {junit_path.parent})\n"
            f"--- failures: operation, checks, request ---\n{failures_in(junit_path)}\n"
            f"--- statuses per operation ---\n{summary}\n"
            f"--- schemathesis output (end) ---\n{(run.stdout + run.stderr)[-6000:]}")


def test_a_failing_run_names_the_operation_the_check_and_the_request(tmp_path):
    """Against a tiny app whose one operation answers 500: the failure message must say which
    operation, which check, and the request that broke it."""
    import socket

    import uvicorn
    from fastapi import FastAPI, Response

    app = FastAPI(servers=[{"url": "/"}])

    @app.get("/boom")
    def boom(n: int = 0) -> dict:
        return Response(b'{"detail": "a server fault"}', status_code=500, media_type="application/json")

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            time.sleep(0.05)
        run, _, junit_path = run_schemathesis(f"http://127.0.0.1:{port}", tmp_path, max_examples=2,
                                              phases="examples,fuzzing")
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    assert run.returncode != 0
    message = failure_message(run, junit_path, "")
    failures = message.split("--- statuses per operation ---")[0]
    assert "== GET /boom: failure" in failures
    assert "Server error" in failures and "curl -X GET" in failures and f"127.0.0.1:{port}/boom" in failures
