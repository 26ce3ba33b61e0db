"""deploy/ without a cluster: every kustomization renders and validates offline against
the Kubernetes schemas, and the rendered objects say what the platform promises (resources,
non-root read-only containers, probes, images from one images: block, GPUs in the gpu
overlay, autoscalers on genserve and Triton, shutdown timings that let in-flight requests
finish, API keys from a Secret that can rotate without a restart); the Prometheus rules
pass promtool, every alert has a runbook section and a unit test; the dashboard loads.

The same checks run as `make deploy-check` (deploy/checks.sh).
"""

from __future__ import annotations

import base64
import copy
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path, PurePosixPath

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
PROMETHEUS = DEPLOY / "prometheus"
RULE_FILES = [PROMETHEUS / "genserve.rules.yaml", PROMETHEUS / "genserve.alerts.yaml"]
OVERLAYS = ["cpu", "gpu", "gpu-keda"]
NAMESPACE = "genserve"
POD_OWNERS = ("Deployment", "Job")


def require(tool: str) -> str:
    """The tool's path; skip without it, except in CI, whose scripts must install it."""
    path = shutil.which(tool) or (shutil.which(tool, path=str(Path(sys.executable).parent)))
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{tool} is not installed (CI must install it: see deploy/checks.sh)")
        pytest.skip(f"{tool} is not installed")
    return path


def _module(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


checks = _module(DEPLOY / "check_manifests.py")

KUSTOMIZATIONS = sorted(
    p.parent.relative_to(DEPLOY).as_posix() for p in DEPLOY.glob("**/kustomization.yaml")
    if yaml.safe_load(p.read_text()).get("kind") == "Kustomization"
)


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    require("kubectl")
    return {name: checks.render(DEPLOY / name) for name in KUSTOMIZATIONS}


def objects(rendered, name: str, kind: str | None = None) -> list[dict]:
    return [o for o in rendered[name] if kind is None or o["kind"] == kind]


def one(rendered, name: str, kind: str, obj_name: str) -> dict:
    found = [o for o in objects(rendered, name, kind) if o["metadata"]["name"] == obj_name]
    assert len(found) == 1, f"{name}: expected one {kind}/{obj_name}, found {len(found)}"
    return found[0]


def pod_specs(rendered, name: str):
    for o in rendered[name]:
        if o["kind"] in POD_OWNERS:
            yield o, o["spec"]["template"]["spec"]


def containers(pod: dict) -> list[dict]:
    return pod.get("initContainers", []) + pod["containers"]


def env_of(container: dict) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


def container(deployment: dict, name: str) -> dict:
    return next(c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == name)


# --- render and validate -----------------------------------------------------------------

def test_the_expected_kustomizations_exist():
    assert {"base", "overlays/cpu", "overlays/gpu", "overlays/gpu-keda", "prometheus", "grafana",
            "jobs/model-export"} <= set(KUSTOMIZATIONS)


def test_every_kustomization_renders(rendered):
    for name, objs in rendered.items():
        assert objs, f"{name} renders nothing"


def test_every_object_validates_offline(rendered):
    require("kubernetes-validate")
    problems, skipped = [], set()
    for name, objs in rendered.items():
        for o in objs:
            status, detail = checks.validate(o)
            if status == "invalid":
                problems.append(f"{name}: {checks.name_of(o)}: {detail}")
            elif status == "skipped":
                skipped.add(o["kind"])
    assert not problems, "\n".join(problems)
    assert skipped <= set(checks.CRD_KINDS)


def test_validation_rejects_typos_and_missing_fields(rendered):
    require("kubernetes-validate")
    deployment = one(rendered, "overlays/gpu", "Deployment", "triton")
    typo = copy.deepcopy(deployment)
    typo["spec"]["template"]["spec"]["containers"][0]["readinessProbes"] = {}
    assert checks.validate(typo)[0] == "invalid"
    missing = copy.deepcopy(deployment)
    del missing["spec"]["selector"]
    assert checks.validate(missing)[0] == "invalid"
    unknown = {"apiVersion": "example.com/v1", "kind": "Gadget", "metadata": {"name": "x"}}
    assert checks.validate(unknown)[0] == "invalid"   # only the listed CRDs are skipped


# --- what every overlay promises ---------------------------------------------------------

@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_lands_in_the_namespace(rendered, overlay):
    for o in rendered[f"overlays/{overlay}"]:
        if o["kind"] != "Namespace":
            assert o["metadata"].get("namespace") == NAMESPACE, checks.name_of(o)


@pytest.mark.parametrize("overlay", [*(f"overlays/{o}" for o in OVERLAYS), "jobs/model-export"])
def test_every_container_has_resources_and_runs_locked_down(rendered, overlay):
    for owner, pod in pod_specs(rendered, overlay):
        where = f"{overlay}: {checks.name_of(owner)}"
        assert pod["securityContext"]["runAsNonRoot"] is True, where
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", where
        mounts_of = {v["name"]: v for v in pod["volumes"]}
        for c in containers(pod):
            res = c["resources"]
            assert {"cpu", "memory"} <= set(res["requests"]) and {"cpu", "memory"} <= set(res["limits"]), \
                f"{where}/{c['name']}: resources {res}"
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True, f"{where}/{c['name']}"
            assert sc["allowPrivilegeEscalation"] is False, f"{where}/{c['name']}"
            assert sc["capabilities"]["drop"] == ["ALL"], f"{where}/{c['name']}"
            # Read-only root: whatever the container writes is a volume; /tmp at least.
            writable = {m["mountPath"] for m in c.get("volumeMounts", []) if not m.get("readOnly")}
            if c["name"] != "sync-model-repository":   # writes only its target volume
                assert "/tmp" in writable, f"{where}/{c['name']}: no writable /tmp"
            for m in c.get("volumeMounts", []):
                assert m["name"] in mounts_of, f"{where}/{c['name']}: volume {m['name']} undefined"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_triton_probes_ports_and_repository_sync(rendered, overlay):
    pod = one(rendered, f"overlays/{overlay}", "Deployment", "triton")["spec"]["template"]["spec"]
    triton = next(c for c in pod["containers"] if c["name"] == "triton")
    ports = {p["name"]: p["containerPort"] for p in triton["ports"]}
    assert ports == {"http": 8000, "grpc": 8001, "metrics": 8002}
    assert triton["startupProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
    assert triton["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
    assert triton["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": "http"}
    # The repository comes from the PVC through the init container's copy.
    [init] = pod["initContainers"]
    assert {m["mountPath"] for m in init["volumeMounts"]} == {"/model-store", "/models"}
    claim = next(v for v in pod["volumes"] if v["name"] == "model-store")["persistentVolumeClaim"]
    one(rendered, f"overlays/{overlay}", "PersistentVolumeClaim", claim["claimName"])
    assert "--model-repository=/models/repository" in triton["args"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_genserve_probes_and_points_at_the_triton_service(rendered, overlay):
    name = f"overlays/{overlay}"
    pod = one(rendered, name, "Deployment", "genserve")["spec"]["template"]["spec"]
    [c] = pod["containers"]
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert c["startupProbe"]["httpGet"]["path"] == "/livez"   # not /readyz: Triton may load for minutes
    env = {e["name"]: e["value"] for e in c["env"]}
    assert env["GENSERVE_BACKEND"] == "triton"
    service = one(rendered, name, "Service", "triton")
    grpc = next(p["port"] for p in service["spec"]["ports"] if p["name"] == "grpc")
    assert env["GENSERVE_TRITON_URL"] == f"{service['metadata']['name']}:{grpc}"
    for var in ("GENSERVE_MODEL_REPOSITORY", "BENTOML_HOME"):
        assert any(m["mountPath"] == env[var] for m in c["volumeMounts"]), var


# --- graceful shutdown and API keys --------------------------------------------------------

SHUTDOWN_MARGIN_S = 5        # for the process to exit after its grace, and for clock skew
MAX_UNREADY_AFTER_SIGTERM_S = 10
RATE = re.compile(r"^\d+(\.\d+)?/(s|sec|second|m|min|minute|h|hour)$")
SHA256_LINE = re.compile(r"^sha256:[0-9a-f]{64}$")


def prestop_sleep_s(c: dict) -> int:
    """Seconds the preStop hook waits: the `sleep` action, or exec of `sleep N`."""
    pre = c["lifecycle"]["preStop"]
    if "sleep" in pre:
        return int(pre["sleep"]["seconds"])
    command = pre["exec"]["command"]
    assert len(command) == 2 and command[0] in ("sleep", "/bin/sleep"), f"preStop is not a sleep: {command}"
    return int(command[1])


def genserve_shutdown_problems(deployment: dict) -> list[str]:
    """What lets SIGTERM cut admitted genserve requests: the kubelet's kill before the
    preStop sleep plus the service's grace, a grace shorter than the longest deadline a
    request may ask for, a readiness probe too slow to take the pod out."""
    pod = deployment["spec"]["template"]["spec"]
    c = container(deployment, "genserve")
    env = env_of(c)
    problems = []
    for var in ("GENSERVE_SHUTDOWN_GRACE_S", "GENSERVE_REQUEST_TIMEOUT_S", "GENSERVE_MAX_REQUEST_TIMEOUT_S"):
        if var not in env:   # the service's defaults (30, 120, 600) do not fit together
            problems.append(f"{var} is not set")
    if problems:
        return problems
    grace, default, longest = (int(env[v]) for v in (
        "GENSERVE_SHUTDOWN_GRACE_S", "GENSERVE_REQUEST_TIMEOUT_S", "GENSERVE_MAX_REQUEST_TIMEOUT_S"))
    sleep = prestop_sleep_s(c)
    kill = pod.get("terminationGracePeriodSeconds", 30)
    if not kill >= sleep + grace + SHUTDOWN_MARGIN_S:
        problems.append(f"terminationGracePeriodSeconds {kill} < preStop {sleep} + grace {grace} + {SHUTDOWN_MARGIN_S}")
    if not grace >= longest >= default:
        problems.append(f"want GENSERVE_SHUTDOWN_GRACE_S {grace} >= MAX_REQUEST_TIMEOUT_S {longest} "
                        f">= REQUEST_TIMEOUT_S {default}")
    if sleep < 5:
        problems.append(f"preStop sleep {sleep}s: too short for endpoint removal to propagate")
    probe = c["readinessProbe"]
    if probe.get("httpGet", {}).get("path") != "/readyz":
        problems.append(f"readiness probe is not /readyz: {probe}")
    unready = probe.get("periodSeconds", 10) * probe.get("failureThreshold", 3)
    if unready > MAX_UNREADY_AFTER_SIGTERM_S:
        problems.append(f"readiness takes up to {unready}s to notice the shutdown")
    return problems


def triton_shutdown_problems(deployment: dict) -> list[str]:
    pod = deployment["spec"]["template"]["spec"]
    c = container(deployment, "triton")
    exits = [a.split("=", 1)[1] for a in c.get("args", []) if a.startswith("--exit-timeout-secs=")]
    if len(exits) != 1:
        return ["triton has no --exit-timeout-secs (its default, 30, should be explicit)"]
    sleep, grace = prestop_sleep_s(c), int(exits[0])
    kill = pod.get("terminationGracePeriodSeconds", 30)
    if not kill >= sleep + grace + SHUTDOWN_MARGIN_S:
        return [f"terminationGracePeriodSeconds {kill} < preStop {sleep} + --exit-timeout-secs {grace} "
                f"+ {SHUTDOWN_MARGIN_S}"]
    return []


def api_keys_problems(objs: list[dict], deployment: dict, variable: str = "GENSERVE_API_KEYS_FILE") -> list[str]:
    """`variable` (a keys file: API or admin keys) must be a file of a Secret mounted whole (a
    subPath mount is never updated, so a rotation would need a restart), read-only, holding
    hashes only."""
    pod = deployment["spec"]["template"]["spec"]
    c = container(deployment, "genserve")
    path = env_of(c).get(variable)
    if not path:
        return [f"{variable} is not set"]
    path = PurePosixPath(path)
    mounts = [m for m in c.get("volumeMounts", []) if path.is_relative_to(m["mountPath"])]
    if not mounts:
        return [f"{path} is in no volume mount"]
    mount = max(mounts, key=lambda m: len(m["mountPath"]))
    problems = []
    if "subPath" in mount or "subPathExpr" in mount:
        problems.append(f"{mount['name']} is a subPath mount: Secret updates never reach it")
    if mount.get("readOnly") is not True:
        problems.append(f"{mount['name']} is not mounted read-only")
    volume = next((v for v in pod["volumes"] if v["name"] == mount["name"]), {})
    if "secret" not in volume:
        return [*problems, f"volume {mount['name']} is not a Secret"]
    secret_name = volume["secret"]["secretName"]
    if volume["secret"].get("optional"):
        problems.append(f"{secret_name} is optional: a pod without keys would start")
    relative = path.relative_to(mount["mountPath"]).as_posix()
    key = next((i["key"] for i in volume["secret"].get("items", []) if i["path"] == relative), relative)
    secrets = [o for o in objs if o["kind"] == "Secret" and o["metadata"]["name"] == secret_name]
    if len(secrets) != 1:
        return [*problems, f"Secret {secret_name} is not rendered once"]
    data = {k: base64.b64decode(v).decode() for k, v in secrets[0].get("data", {}).items()}
    data.update(secrets[0].get("stringData", {}))
    if key not in data:
        return [*problems, f"Secret {secret_name} has no key {key}"]
    for line in data[key].splitlines():
        line = line.strip()
        if line and not line.startswith("#") and not SHA256_LINE.match(line):
            problems.append(f"Secret {secret_name}/{key}: not a sha256:<hex> line (no clear keys in manifests)")
    return problems


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_shutdown_lets_in_flight_requests_finish(rendered, overlay):
    name = f"overlays/{overlay}"
    assert genserve_shutdown_problems(one(rendered, name, "Deployment", "genserve")) == []
    assert triton_shutdown_problems(one(rendered, name, "Deployment", "triton")) == []


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_api_keys_come_from_a_rotatable_secret(rendered, overlay):
    name = f"overlays/{overlay}"
    deployment = one(rendered, name, "Deployment", "genserve")
    assert api_keys_problems(rendered[name], deployment) == []
    env = env_of(container(deployment, "genserve"))
    # Prometheus scrapes /metrics without a key: it must not be turned on here alone.
    assert env["GENSERVE_METRICS_REQUIRE_KEY"] == "0"
    for var in ("GENSERVE_RATE_LIMIT", "GENSERVE_RATE_LIMIT_IMAGE_STEPS"):
        assert RATE.match(env[var]), f"{var}={env[var]!r}"
    assert int(env["GENSERVE_MAX_BODY_BYTES"]) >= 1024
    assert "GENSERVE_CORS_ORIGINS" in env


def test_the_shutdown_and_key_checks_catch_mistakes(rendered):
    name = "overlays/gpu"
    genserve = one(rendered, name, "Deployment", "genserve")
    triton = one(rendered, name, "Deployment", "triton")

    def changed(deployment, edit):
        d = copy.deepcopy(deployment)
        edit(d["spec"]["template"]["spec"])
        return d

    def set_env(pod, var, value):
        next(e for e in pod["containers"][0]["env"] if e["name"] == var)["value"] = value

    short = changed(genserve, lambda p: p.update(terminationGracePeriodSeconds=120))
    assert any("terminationGracePeriodSeconds" in p for p in genserve_shutdown_problems(short))
    long_deadline = changed(genserve, lambda p: set_env(p, "GENSERVE_MAX_REQUEST_TIMEOUT_S", "600"))
    assert genserve_shutdown_problems(long_deadline)
    unset = changed(genserve, lambda p: p["containers"][0].update(
        env=[e for e in p["containers"][0]["env"] if e["name"] != "GENSERVE_SHUTDOWN_GRACE_S"]))
    assert genserve_shutdown_problems(unset)
    slow = changed(genserve, lambda p: p["containers"][0]["readinessProbe"].update(periodSeconds=30))
    assert genserve_shutdown_problems(slow)
    sleep_action = changed(genserve, lambda p: p["containers"][0]["lifecycle"].update(
        preStop={"sleep": {"seconds": 60}}))
    assert any("preStop 60" in p for p in genserve_shutdown_problems(sleep_action))
    assert triton_shutdown_problems(changed(triton, lambda p: p.update(terminationGracePeriodSeconds=30)))

    objs = rendered[name]
    mount = lambda p: next(m for m in p["containers"][0]["volumeMounts"] if m["name"] == "api-keys")  # noqa: E731
    sub_path = changed(genserve, lambda p: mount(p).update(subPath="api-keys.txt"))
    assert any("subPath" in p for p in api_keys_problems(objs, sub_path))
    elsewhere = changed(genserve, lambda p: set_env(p, "GENSERVE_API_KEYS_FILE", "/srv/keys.txt"))
    assert api_keys_problems(objs, elsewhere)
    wrong_file = changed(genserve, lambda p: set_env(
        p, "GENSERVE_API_KEYS_FILE", mount(p)["mountPath"] + "/keys.txt"))
    assert any("no key" in p for p in api_keys_problems(objs, wrong_file))
    clear = [copy.deepcopy(o) for o in objs]
    next(o for o in clear if o["kind"] == "Secret")["stringData"] = {"api-keys.txt": "hunter2\n"}
    assert any("sha256" in p for p in api_keys_problems(clear, genserve))


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_services_pdbs_and_policies_select_real_pods(rendered, overlay):
    name = f"overlays/{overlay}"
    pod_labels = [o["spec"]["template"]["metadata"]["labels"] for o in objects(rendered, name, "Deployment")]

    def selects(selector: dict) -> bool:
        return any(selector.items() <= labels.items() for labels in pod_labels)

    for svc in objects(rendered, name, "Service"):
        assert selects(svc["spec"]["selector"]), checks.name_of(svc)
    for kind in ("PodDisruptionBudget", "NetworkPolicy"):
        for o in objects(rendered, name, kind):
            key = "selector" if kind == "PodDisruptionBudget" else "podSelector"
            assert selects(o["spec"][key]["matchLabels"]), checks.name_of(o)
    assert {p["metadata"]["name"] for p in objects(rendered, name, "PodDisruptionBudget")} == {"genserve", "triton"}


def test_images_are_set_once_in_an_images_block(rendered):
    # Manifests name placeholders only; each placeholder is given a tag in one images: block.
    placeholders = {}
    for path in DEPLOY.glob("**/kustomization.yaml"):
        for image in yaml.safe_load(path.read_text()).get("images", []):
            assert image["name"] not in placeholders, f"{image['name']} set twice"
            placeholders[image["name"]] = f"{image['newName']}:{image['newTag']}"
    assert set(placeholders) == {"tritonserver", "genserve-service", "genserve-export"}
    for path in DEPLOY.glob("**/*.yaml"):
        for doc in yaml.safe_load_all(path.read_text()):
            text = json.dumps(doc)
            for image in re.findall(r'"image": "([^"]+)"', text):
                assert image in placeholders, f"{path}: image {image!r} is not a placeholder"
    for name in rendered:
        for _owner, pod in pod_specs(rendered, name):
            for c in containers(pod):
                assert c["image"] in placeholders.values(), f"{name}: {c['image']}"
    assert placeholders["tritonserver"].startswith("nvcr.io/nvidia/tritonserver:")


def test_gpu_overlay_requests_gpus_and_cpu_overlay_does_not(rendered):
    gpu = one(rendered, "overlays/gpu", "Deployment", "triton")["spec"]["template"]["spec"]
    triton = next(c for c in gpu["containers"] if c["name"] == "triton")
    assert triton["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert gpu["nodeSelector"] and any(t["key"] == "nvidia.com/gpu" for t in gpu["tolerations"])
    cpu = one(rendered, "overlays/cpu", "Deployment", "triton")["spec"]["template"]["spec"]
    assert "nvidia.com/gpu" not in json.dumps(cpu)


def test_hpas_target_their_deployments_on_adapter_metrics(rendered):
    adapter = yaml.safe_load((PROMETHEUS / "prometheus-adapter-rules.yaml").read_text())
    served = {r["name"]["as"] for r in adapter["rules"]}
    for overlay in ("overlays/cpu", "overlays/gpu"):
        hpas = {h["metadata"]["name"]: h for h in objects(rendered, overlay, "HorizontalPodAutoscaler")}
        assert set(hpas) == {"genserve", "triton"}
        for name, hpa in hpas.items():
            target = hpa["spec"]["scaleTargetRef"]
            assert (target["kind"], target["name"]) == ("Deployment", name)
            deployment = one(rendered, overlay, "Deployment", name)
            assert "replicas" not in deployment["spec"], "the HPA owns the replica count"
            for metric in hpa["spec"]["metrics"]:
                assert metric["type"] == "Pods"   # custom per-pod metrics, not CPU
                assert metric["pods"]["metric"]["name"] in served
    genserve = one(rendered, "overlays/gpu", "HorizontalPodAutoscaler", "genserve")
    assert {m["pods"]["metric"]["name"] for m in genserve["spec"]["metrics"]} == {
        "genserve_engine_queue_steps", "genserve_requests_in_flight"}


def test_keda_overlay_replaces_the_hpas(rendered):
    name = "overlays/gpu-keda"
    assert not objects(rendered, name, "HorizontalPodAutoscaler"), "KEDA and HPA would fight"
    targets = {o["spec"]["scaleTargetRef"]["name"] for o in objects(rendered, name, "ScaledObject")}
    assert targets == {"genserve", "triton"}
    for target in targets:
        one(rendered, name, "Deployment", target)


def test_monitors_scrape_named_ports(rendered):
    name = "overlays/gpu"
    sm = one(rendered, name, "ServiceMonitor", "genserve")
    service_ports = {p["name"] for p in one(rendered, name, "Service", "genserve")["spec"]["ports"]}
    assert sm["spec"]["endpoints"][0]["port"] in service_ports
    assert sm["spec"]["endpoints"][0]["honorLabels"] is True   # keeps BentoML's `endpoint` label
    pm = one(rendered, name, "PodMonitor", "triton")
    triton = one(rendered, name, "Deployment", "triton")["spec"]["template"]["spec"]["containers"][0]
    assert pm["spec"]["podMetricsEndpoints"][0]["port"] in {p["name"] for p in triton["ports"]}


# --- Prometheus rules, runbooks, dashboard, images ---------------------------------------

def test_promtool_checks_and_unit_tests_the_rules():
    promtool = require("promtool")
    check = subprocess.run([promtool, "check", "rules", *map(str, RULE_FILES)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    tests = sorted(str(p) for p in (PROMETHEUS / "tests").glob("*.yaml"))
    run = subprocess.run([promtool, "test", "rules", *tests], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr


def _rules(kind: str) -> list[dict]:
    return [r for f in RULE_FILES for g in yaml.safe_load(f.read_text())["groups"] for r in g["rules"] if kind in r]


def test_every_alert_fires_in_a_unit_test_and_has_a_runbook_section():
    tested = set()
    for path in (PROMETHEUS / "tests").glob("*.yaml"):
        for t in yaml.safe_load(path.read_text())["tests"]:
            tested |= {a["alertname"] for a in t.get("alert_rule_test", []) if a["exp_alerts"]}
    headings = {re.sub(r"[^a-z0-9 -]", "", h.strip().lower()).replace(" ", "-")
                for h in re.findall(r"^#+ (.+)$", (DEPLOY / "README.md").read_text(), re.M)}
    for rule in _rules("alert"):
        assert rule["alert"] in tested, f"{rule['alert']} never fires in deploy/prometheus/tests"
        url = rule["annotations"]["runbook_url"]
        assert url.startswith("deploy/README.md#") and url.split("#", 1)[1] in headings, url
        assert rule["labels"]["severity"] in {"page", "ticket", "warning"}


def test_dashboard_loads_and_uses_defined_recordings():
    dash = json.loads((DEPLOY / "grafana" / "genserve.json").read_text())
    panels = [p for p in dash["panels"] if p["type"] != "row"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)) and dash["uid"] == "genserve"
    recorded = {r["record"] for r in _rules("record")}
    for p in panels:
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t["datasource"]["uid"] == "${datasource}"
            for name in re.findall(r"\b[a-z_]+:[a-z0-9_]+:[a-z0-9_]+\b", t["expr"]):
                assert name in recorded, f"{p['title']}: {name} is not a recording rule"
    exprs = " ".join(t["expr"] for p in panels for t in p["targets"])
    assert "DCGM_FI_DEV_GPU_UTIL" in exprs and "DCGM_FI_DEV_FB_USED" in exprs


def test_prometheusrule_wraps_the_rule_files_unchanged():
    rule = _module(PROMETHEUS / "prometheusrule.py").prometheus_rule({"release": "x"})
    groups = [g for f in RULE_FILES for g in yaml.safe_load(f.read_text())["groups"]]
    assert rule["kind"] == "PrometheusRule" and rule["spec"]["groups"] == groups
    assert rule["metadata"]["labels"]["release"] == "x"


def test_dockerfiles_lint_clean_and_the_service_image_copies_no_torch_code():
    hadolint = require("hadolint")
    files = sorted(str(p) for p in (DEPLOY / "docker").glob("*.Dockerfile"))
    run = subprocess.run([hadolint, *files], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    copies = re.findall(r"^COPY (.+) \S+$", (DEPLOY / "docker" / "service.Dockerfile").read_text(), re.M)
    copied = {src for line in copies for src in line.split()}
    assert copied == {"pyproject.toml", "README.md", "services"}   # not export/ or zoo/ (torch)
