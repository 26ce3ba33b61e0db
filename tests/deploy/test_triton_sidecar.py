"""overlays/cpu-sidecar: Triton inside the genserve pod, both containers on one memory-backed
/dev/shm, the service told to require shared memory and to call Triton on loopback, and
the standalone Triton objects gone while its metrics keep their job label; LoRA adapters
(components/lora-adapters) from a read-only volume, with operators' keys of their own."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.deploy.test_manifests import api_keys_problems, checks, container, env_of, objects, one, require

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
OVERLAY = "overlays/cpu-sidecar"


@pytest.fixture(scope="module")
def rendered():
    require("kubectl")
    return {OVERLAY: checks.render(DEPLOY / OVERLAY)}


@pytest.fixture(scope="module")
def pod(rendered):
    return one(rendered, OVERLAY, "Deployment", "genserve")["spec"]["template"]["spec"]


def test_triton_is_a_native_sidecar_on_the_same_shared_memory(rendered, pod):
    triton = next(c for c in pod["initContainers"] if c["name"] == "triton")
    assert triton["restartPolicy"] == "Always"  # started first, stopped last
    assert triton["startupProbe"]["httpGet"]["path"] == "/v2/health/ready"
    shm = {v["name"]: v for v in pod["volumes"]}
    genserve = container(one(rendered, OVERLAY, "Deployment", "genserve"), "genserve")
    mounts = [{m["mountPath"]: m["name"] for m in c["volumeMounts"]}["/dev/shm"] for c in (triton, genserve)]
    assert mounts[0] == mounts[1]
    assert shm[mounts[0]]["emptyDir"]["medium"] == "Memory"
    # Regions are mode 0660: Triton must run in the service's group.
    assert triton["securityContext"]["runAsGroup"] == pod["securityContext"]["runAsGroup"]


def test_the_service_requires_shared_memory_and_calls_triton_on_loopback(rendered, pod):
    genserve = container(one(rendered, OVERLAY, "Deployment", "genserve"), "genserve")
    env = env_of(genserve)
    assert env["GENSERVE_TRITON_SHARED_MEMORY"] == "required"
    triton = next(c for c in pod["initContainers"] if c["name"] == "triton")
    grpc = next(p["containerPort"] for p in triton["ports"] if p["name"] == "triton-grpc")
    assert env["GENSERVE_TRITON_URL"] == f"127.0.0.1:{grpc}"
    assert f"--grpc-port={grpc}" in triton["args"]
    names = [p["name"] for c in pod["containers"] + pod["initContainers"] for p in c.get("ports", [])]
    assert len(names) == len(set(names)), names


def test_standalone_triton_objects_are_gone_and_its_metrics_keep_their_job(rendered, pod):
    for kind in ("Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "NetworkPolicy"):
        assert "triton" not in {o["metadata"]["name"] for o in objects(rendered, OVERLAY, kind)}, kind
    monitor = one(rendered, OVERLAY, "PodMonitor", "triton")["spec"]
    assert monitor["selector"]["matchLabels"] == {"app.kubernetes.io/name": "genserve"}
    [endpoint] = monitor["podMetricsEndpoints"]
    triton = next(c for c in pod["initContainers"] if c["name"] == "triton")
    assert endpoint["port"] in {p["name"] for p in triton["ports"]}
    assert {"action": "replace", "targetLabel": "job", "replacement": "triton"} in endpoint["relabelings"]
    policy = one(rendered, OVERLAY, "NetworkPolicy", "genserve")["spec"]
    port = next(p["containerPort"] for p in triton["ports"] if p["name"] == endpoint["port"])
    assert any(p["port"] == port for rule in policy["ingress"] for p in rule.get("ports", []))


def test_every_container_is_locked_down_with_resources(pod):
    for c in pod["initContainers"] + pod["containers"]:
        assert {"cpu", "memory"} <= set(c["resources"]["limits"]), c["name"]
        sc = c["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False, c["name"]
        assert sc["capabilities"]["drop"] == ["ALL"], c["name"]


def test_adapters_load_from_a_read_only_volume_with_admin_keys_of_their_own(rendered, pod):
    deployment = one(rendered, OVERLAY, "Deployment", "genserve")
    genserve = container(deployment, "genserve")
    env = env_of(genserve)
    mounts = {m["mountPath"]: m for m in genserve["volumeMounts"]}
    directory = mounts[env["GENSERVE_ADAPTER_DIRS"]]
    assert directory["readOnly"] is True
    volume = next(v for v in pod["volumes"] if v["name"] == directory["name"])
    one(rendered, OVERLAY, "PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"])
    # The cap fits in the container's memory limit with room for the work itself.
    limit = genserve["resources"]["limits"]["memory"]
    limit_mb = int(limit.removesuffix("Gi")) * 1024 if limit.endswith("Gi") else int(limit.removesuffix("Mi"))
    assert 0 < int(env["GENSERVE_ADAPTER_MEMORY_MB"]) <= limit_mb // 2
    assert api_keys_problems(rendered[OVERLAY], deployment, "GENSERVE_ADMIN_KEYS_FILE") == []
    assert env["GENSERVE_ADMIN_KEYS_FILE"] != env["GENSERVE_API_KEYS_FILE"]
