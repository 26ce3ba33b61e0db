"""Schemathesis against the live server's OpenAPI document: every operation, positive and
negative examples, a fixed seed, bounded in time.

The real tool, run as CI runs it (`st run`, the CLI of the pinned `schemathesis` in the
`test` extra), against a real `bentoml serve`. Passing means, for every request it sent:
no response >= 500, every status, content type, header and body as the document says,
and every request that breaks the schema refused (4xx). The document's JSON examples for
/img2img and /inpaint carry valid images (services/openapi.py), so those operations are
driven to 200 too, and the run's HAR log proves it.

A failure prints Schemathesis' own report (each distinct failure with a curl line to
reproduce it); the JUnit XML and HAR log stay in the test's tmp_path.
"""

from __future__ import annotations

import collections
import json
import re
import subprocess
import sys
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

import pytest

pytestmark = [pytest.mark.server, pytest.mark.slow]

SEED = 20260601  # fixed: the same requests every run (coverage is deterministic; fuzzing follows the seed)
MAX_EXAMPLES = 100  # per operation and phase; ~30 s on 2 cores, 1,400-odd requests in all
REQUEST_TIMEOUT_S = 60  # the slowest valid request (8 images x 150 steps) takes seconds on CPU
RUN_TIMEOUT_S = 300  # the whole run is bounded: a hang fails the test instead of stalling CI

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


def test_schemathesis_finds_nothing(server, tmp_path):
    base = f"{server.url}/v1"  # the document's `servers: [{"url": "/v1"}]`
    report_dir = tmp_path / "schemathesis"
    har_path, junit_path = report_dir / "run.har.json", report_dir / "junit.xml"
    command = [
        str(Path(sys.executable).parent / "st"), "run", f"{base}/openapi.json",
        "--url", base,
        "--phases", "examples,coverage,fuzzing",  # stateful off: no links between operations
        "--checks", ",".join(CHECKS),
        "--mode", "all",  # positive and negative examples
        "--max-examples", str(MAX_EXAMPLES),
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
    try:
        # In tmp_path: Schemathesis keeps a crash cache (.schemathesis/) in its working directory and
        # replays it on the next run; a fresh one per run keeps runs reproducible and the checkout clean.
        run = subprocess.run(command, capture_output=True, text=True, timeout=RUN_TIMEOUT_S, cwd=tmp_path)
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        pytest.fail(f"schemathesis did not finish within {RUN_TIMEOUT_S}s:\n{out[-8000:]}"
                    f"\n--- server log ---\n{server.logs()}", pytrace=False)
    output = run.stdout + run.stderr
    if not har_path.exists():
        pytest.fail(f"schemathesis exited with {run.returncode}, no HAR log:\n{output[-20000:]}", pytrace=False)

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
    if run.returncode != 0 and not only_deadlines:  # Schemathesis' report: each failure, with a curl line
        pytest.fail(f"schemathesis exited with {run.returncode} (reports in {report_dir}):\n{output[-20000:]}"
                    f"\n--- statuses per operation ---\n{summary}", pytrace=False)

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
    for method, path in sorted(operations):
        assert statuses[(method, path)][200] >= 1, f"{method} {path} never answered 200:\n{summary}"
    assert len(entries) >= 500, f"only {len(entries)} requests sent:\n{summary}"
