"""The observability config against real processes: a real tritonserver, the service on
the Triton backend, and a real Prometheus (Debian's package) scraping both on loopback.

1. Every metric name the rules, the alerts, the dashboard, the prometheus-adapter config
   and the KEDA queries use exists in a live scrape (except the names listed in
   NOT_SCRAPED, with the reason).
2. Prometheus loads the rule files, evaluates every rule without error, and the recording
   rules return values after a few requests; the adapter's queries return per-target values.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import yaml

from tests.fixtures.local_server import free_port

pytestmark = pytest.mark.server

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
RULE_FILES = [DEPLOY / "prometheus" / "genserve.rules.yaml", DEPLOY / "prometheus" / "genserve.alerts.yaml"]

# Names queried but absent from the scrapes here, each for a reason.
NOT_SCRAPED = {
    "up": "Prometheus's own per-target series, not exported by the targets",
    "DCGM_FI_DEV_GPU_UTIL": "NVIDIA DCGM exporter: GPU nodes only",
    "DCGM_FI_DEV_FB_USED": "NVIDIA DCGM exporter: GPU nodes only",
    "genserve_rate_limited_total": "a labelled counter appears with its first refusal; the service here runs "
                                   "without rate limits (tests/services/test_hardening.py scrapes it after one)",
    **dict.fromkeys(
        ("genserve_adapter_lookups_total", "genserve_adapter_loads_total", "genserve_adapter_load_seconds_bucket",
         "genserve_adapter_evictions_total"),
        "labelled series appear with the first adapter named, loaded or unloaded; the demo repository here has "
        "no adapters (tests/services/test_adapter_library.py scrapes them after loads and deletions)"),
}
# Recording rules that must hold a number once traffic has flowed (NaN allowed for
# per-model series of models that saw no traffic, not for all of them).
RECORDINGS = [
    "genserve:images_generated:rate5m", "genserve:requests:rate5m", "genserve:errors:rate5m",
    "genserve:denoising_steps:rate5m", "genserve:engine_requests_finished:rate5m",
    "genserve:request_duration_seconds:p50_5m", "genserve:request_duration_seconds:p95_5m",
    "genserve:request_duration_seconds:p99_5m", "genserve:pipeline_duration_seconds:p95_5m",
    "genserve:model_batch_size:avg_5m", "genserve:engine_batch_rows:avg_5m",
    "genserve:prompt_cache_hit:ratio_5m", "genserve:requests_in_flight:sum", "genserve:engine_queue_steps:sum",
    "genserve:slo_errors:ratio_rate5m", "genserve:slo_slow:ratio_rate5m",
    "triton:inferences:rate5m", "triton:batch_size:avg_5m", "triton:queue_to_compute:ratio_5m",
    "triton:queue_seconds_per_request:avg_5m", "triton:request_duration_seconds:avg_5m",
]
PROMQL_WORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring",
                "group_left", "group_right", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """Series names in a PromQL expression (recorded names included), by elimination:
    strings, label matchers, ranges, label lists, numbers and functions are removed."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)
    s = re.sub(r"\{[^}]*\}", " ", s)
    s = re.sub(r"\[[^\]]*\]", " ", s)
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)
    s = re.sub(r"(?<![\w:])\d+(\.\d+)?([eE][-+]?\d+)?", " ", s)
    names = {m.group(1) for m in re.finditer(r"([A-Za-z_:][\w:]*)\s*(\()?", s) if not m.group(2)}
    return names - PROMQL_WORDS


def used_queries() -> dict[str, list[str]]:
    """Every PromQL query deploy/ ships, by where it comes from."""
    rules = [r for f in RULE_FILES for g in yaml.safe_load(f.read_text())["groups"] for r in g["rules"]]
    dash = json.loads((DEPLOY / "grafana" / "genserve.json").read_text())
    adapter = yaml.safe_load((DEPLOY / "prometheus" / "prometheus-adapter-rules.yaml").read_text())["rules"]
    keda = [yaml.safe_load(p.read_text()) for p in (DEPLOY / "components" / "keda").glob("*-scaledobject.yaml")]
    return {
        "rules": [r["expr"] for r in rules],
        "dashboard": [t["expr"] for p in dash["panels"] for t in p.get("targets", [])],
        "prometheus-adapter": [adapter_query(r, "x") for r in adapter] + [r["seriesQuery"] for r in adapter],
        "keda": [t["metadata"]["query"] for so in keda for t in so["spec"]["triggers"]],
    }


def adapter_query(rule: dict, matchers: str, group_by: str = "instance") -> str:
    """A prometheus-adapter metricsQuery with its template filled in."""
    series = rule["seriesQuery"].split("{", 1)[0]
    return (rule["metricsQuery"].replace("<<.Series>>", series)
            .replace("<<.LabelMatchers>>", matchers).replace("<<.GroupBy>>", group_by))


def test_metric_name_extraction():
    assert metric_names('sum by (model) (rate(nv_inference_count{job="triton"}[5m])) / 1e6 / clamp_min(x:y:z, 1e-9)') \
        == {"nv_inference_count", "x:y:z"}
    assert metric_names('histogram_quantile(0.5, a_bucket) or vector(0) and on (pod) b') == {"a_bucket", "b"}


# --- live processes ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def service(triton_service):
    """The service under observation: on the Triton backend, so both scrape."""
    return triton_service


def send_traffic(url: str) -> None:
    """A little of everything: GAN, txt2img (several schedulers and guidance scales), a
    stream the client leaves early, and two client errors."""
    with httpx.Client(base_url=url, timeout=60) as client:
        for seed in range(3):
            assert client.post("/v1/gan/generate", json={"seed": seed, "num_images": 4}).status_code == 200
        for scheduler, guidance in [("ddim", 7.5), ("euler", 1.0), ("dpmpp_2m", 3.0)]:
            body = {"prompt": "7", "num_inference_steps": 4, "scheduler": scheduler, "guidance_scale": guidance}
            r = client.post("/v1/txt2img", json=body)
            assert r.status_code == 200, r.text
        with client.stream("POST", "/v1/txt2img/stream", json={"prompt": "7", "num_inference_steps": 30}) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("event: progress"):
                    break   # hang up: the engine cancels the request
        assert client.post("/v1/gan/generate", json={"num_images": 99}).status_code == 422
        assert client.post("/v1/gan/generate", json={"model": "nope"}).status_code == 404


def scrape_names(url: str) -> set[str]:
    text = httpx.get(url, timeout=10).text
    return {re.split(r"[{ ]", line, maxsplit=1)[0] for line in text.splitlines() if line and not line.startswith("#")}


@pytest.fixture(scope="module")
def live_names(service, triton) -> set[str]:
    send_traffic(service.url)
    time.sleep(0.5)   # the stream's cancellation lands in the counters
    return scrape_names(f"{service.url}/metrics") | scrape_names(f"http://127.0.0.1:{triton.metrics_port}/metrics")


@pytest.mark.parametrize("source", ["rules", "dashboard", "prometheus-adapter", "keda"])
def test_every_queried_metric_exists_in_a_live_scrape(live_names, source):
    recorded = {r["record"] for f in RULE_FILES for g in yaml.safe_load(f.read_text())["groups"]
                for r in g["rules"] if "record" in r}
    used = set().union(*(metric_names(q) for q in used_queries()[source]))
    assert used, source
    missing = sorted(n for n in used - recorded - set(NOT_SCRAPED) if n not in live_names)
    assert not missing, f"{source} queries names no live scrape has: {missing}"
    assert not {n for n in used if ":" in n} - recorded, "recorded names without a rule"


# --- a real Prometheus ---------------------------------------------------------------------

class Prometheus:
    """Debian's prometheus on a free loopback port, scraping every second."""

    def __init__(self, workdir: Path, targets: dict[str, str]):
        binary = shutil.which("prometheus")
        if binary is None:
            reason = "prometheus is not installed (Debian package `prometheus`)"
            if os.environ.get("CI"):
                pytest.fail(f"{reason}: CI must install it")
            pytest.skip(reason)
        self.url = f"http://127.0.0.1:{free_port()}"
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "900ms"},
            "rule_files": [str(p) for p in RULE_FILES],
            "scrape_configs": [{"job_name": job, "static_configs": [{"targets": [target]}]}
                               for job, target in targets.items()],
        }
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.log = open(workdir / "prometheus.log", "wb")
        self.proc = subprocess.Popen(
            [binary, f"--config.file={workdir / 'prometheus.yml'}", f"--storage.tsdb.path={workdir / 'data'}",
             f"--web.listen-address={self.url.removeprefix('http://')}", "--log.level=warn"],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        self.log_path = workdir / "prometheus.log"

    def wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log_path.read_text()[-3000:]
            try:
                if httpx.get(f"{self.url}/-/ready", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"prometheus not ready:\n{self.log_path.read_text()[-3000:]}")

    def wait_scraping(self, timeout: float = 30) -> None:
        """Until every target has been scraped successfully (target discovery hands new
        targets to the scrapers only every 5 s)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            targets = httpx.get(f"{self.url}/api/v1/targets", timeout=5).json()["data"]["activeTargets"]
            if targets and all(t["health"] == "up" for t in targets):
                return
            time.sleep(0.5)
        raise RuntimeError(f"targets not scraped: {targets}")

    def query(self, expr: str) -> list[dict]:
        r = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=10).json()
        assert r["status"] == "success", r
        return r["data"]["result"]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


@pytest.fixture(scope="module")
def prometheus(service, triton, tmp_path_factory):
    prom = Prometheus(tmp_path_factory.mktemp("prometheus"), {
        "genserve": service.url.removeprefix("http://"),
        "triton": f"127.0.0.1:{triton.metrics_port}",
    })
    try:
        prom.wait_ready()
        prom.wait_scraping()
        # Traffic across several scrapes, so rate() sees counters move between samples.
        for _ in range(3):
            send_traffic(service.url)
            time.sleep(1.5)
        yield prom
    finally:
        prom.stop()


def numbers(result: list[dict]) -> list[float]:
    return [float(r["value"][1]) for r in result]


def test_prometheus_evaluates_every_rule_without_error(prometheus):
    deadline = time.monotonic() + 20
    while True:   # until every rule has been evaluated once
        groups = httpx.get(f"{prometheus.url}/api/v1/rules", timeout=10).json()["data"]["groups"]
        rules = [r for g in groups for r in g["rules"]]
        if all(r["health"] != "unknown" for r in rules) or time.monotonic() > deadline:
            break
        time.sleep(1)
    expected = sum(len(g["rules"]) for f in RULE_FILES for g in yaml.safe_load(f.read_text())["groups"])
    assert len(rules) == expected
    bad = [(r["name"], r.get("lastError")) for r in rules if r["health"] != "ok"]
    assert not bad, bad
    # Both targets are up, so the down alerts' conditions are false now (their state may
    # still be "pending" from the evaluation before the first scrape).
    for rule in rules:
        if rule["name"] in ("GenserveDown", "TritonDown"):
            assert prometheus.query(rule["query"]) == [], rule["name"]
    targets = httpx.get(f"{prometheus.url}/api/v1/targets").json()["data"]["activeTargets"]
    assert {t["health"] for t in targets} == {"up"}


def test_recording_rules_return_values(prometheus):
    deadline = time.monotonic() + 30
    missing = RECORDINGS
    while missing and time.monotonic() < deadline:
        missing = [name for name in missing
                   if not any(math.isfinite(v) for v in numbers(prometheus.query(name)))]
        time.sleep(1)
    assert not missing, f"no finite value for {missing}"
    images = {r["metric"]["pipeline"]: float(r["value"][1])
              for r in prometheus.query("genserve:images_generated:rate5m")}
    assert images["gan"] > 0 and images["txt2img"] > 0
    p95 = {r["metric"]["endpoint"] for r in prometheus.query("genserve:request_duration_seconds:p95_5m")}
    assert {"/v1/gan/generate", "/v1/txt2img"} <= p95
    assert numbers(prometheus.query("genserve:slo_errors:ratio_rate5m")) == [0.0]   # 4xx spend no budget
    codes = {r["metric"]["code"] for r in prometheus.query("genserve:errors:rate5m")}
    assert {"invalid_request", "model_not_found"} <= codes, codes
    reasons = {r["metric"]["reason"] for r in prometheus.query("genserve:engine_requests_finished:rate5m")}
    assert "cancelled" in reasons, reasons   # the stream we left early


def test_autoscaler_queries_return_per_target_values(prometheus):
    adapter = yaml.safe_load((DEPLOY / "prometheus" / "prometheus-adapter-rules.yaml").read_text())["rules"]
    for rule in adapter:
        job = "triton" if rule["seriesQuery"].startswith("nv_") else "genserve"
        result = prometheus.query(adapter_query(rule, f'job="{job}"'))
        assert [r["metric"].get("instance") for r in result], rule["name"]["as"]
        assert all(math.isfinite(v) for v in numbers(result)), rule["name"]["as"]
