"""The metrics meet the engine's observer Protocol by shape: neither imports the other."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

from services.engine.engine import EngineObserver
from services.metrics import ServiceMetrics

ROOT = Path(__file__).resolve().parents[2]


def imported(path: str) -> set[str]:
    """The modules a file imports when it runs (not those under `if TYPE_CHECKING:`)."""
    tree = ast.parse((ROOT / path).read_text())
    checking = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                and getattr(node.test, "id", None) == "TYPE_CHECKING" for n in ast.walk(node)}
    names = set()
    for node in ast.walk(tree):
        if id(node) in checking:
            continue
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
    return names


def hooks() -> list[str]:
    return [name for name, member in vars(EngineObserver).items()
            if inspect.isfunction(member) and not name.startswith("_")]


def test_the_engine_metrics_have_every_hook_with_its_signature():
    import prometheus_client

    observer = ServiceMetrics(prometheus_client.CollectorRegistry()).engine_observer()
    for name in hooks():
        assert inspect.signature(getattr(observer, name)) == inspect.signature(
            getattr(EngineObserver, name).__get__(observer)), name


def test_the_engine_metrics_count_what_the_engine_reports():
    import prometheus_client

    registry = prometheus_client.CollectorRegistry()
    observer = ServiceMetrics(registry).engine_observer()
    observer.iteration("sd", rows=4, requests=2, images=3)
    observer.finished("sd", "done")
    assert registry.get_sample_value("genserve_engine_denoising_steps_total", {"model": "sd"}) == 3
    assert registry.get_sample_value("genserve_engine_requests_finished_total", {"model": "sd", "reason": "done"}) == 1


def test_no_back_arrows_between_engine_runtime_and_metrics():
    assert not any(m.startswith("services.engine") for m in imported("services/metrics.py"))
    assert "services.metrics" not in imported("services/runtime/__init__.py")
    for path in (ROOT / "services/engine").glob("*.py"):
        assert "services.metrics" not in imported(str(path.relative_to(ROOT))), path


def test_full_collections_are_noted_in_the_gc_hook_and_observed_later():
    """A collection can start inside a metric's own non-reentrant lock (any allocation may
    trigger one): the gc.callbacks hook must not touch a metric, only note the time."""
    import prometheus_client

    registry = prometheus_client.CollectorRegistry()
    metrics = ServiceMetrics(registry)

    def count():
        return registry.get_sample_value("genserve_gc_full_collection_seconds_count")

    metrics.observe_gc("start", {"generation": 0})
    metrics.observe_gc("stop", {"generation": 0})  # young collections are not timed
    metrics.observe_gc("start", {"generation": 2})
    metrics.observe_gc("stop", {"generation": 2})
    assert count() == 0
    metrics.observe_execution("unet", "onnxruntime", 2, 0.01)  # a safe place: outside any metric's lock
    assert count() == 1
