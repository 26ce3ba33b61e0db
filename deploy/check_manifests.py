"""Validate rendered Kubernetes manifests offline, against the API schemas of one
Kubernetes version (kubernetes-validate ships them; nothing is fetched).

    kubectl kustomize deploy/overlays/gpu > gpu.yaml
    .venv/bin/python deploy/check_manifests.py gpu.yaml [more.yaml ...]

Strict: unknown fields (a typo'd `readinessProbe`) are errors. Custom resources have no
schema there; their kinds are listed in CRD_KINDS and skipped with the reason printed,
never silently, and any other kind without a schema is an error. Exit 1 when an object
is invalid. Used by deploy/checks.sh and tests/deploy/test_manifests.py.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import yaml

# The oldest Kubernetes these manifests target (autoscaling/v2, policy/v1, the restricted
# Pod Security level and sidecar-free probes are all older than this).
KUBERNETES_VERSION = "1.31.0"

CRD_KINDS = {
    "ServiceMonitor": "Prometheus Operator CRD (monitoring.coreos.com/v1), no schema in kubernetes-validate",
    "PodMonitor": "Prometheus Operator CRD (monitoring.coreos.com/v1), no schema in kubernetes-validate",
    "PrometheusRule": "Prometheus Operator CRD (monitoring.coreos.com/v1), no schema in kubernetes-validate",
    "ScaledObject": "KEDA CRD (keda.sh/v1alpha1), no schema in kubernetes-validate",
}


def render(kustomization: Path) -> list[dict]:
    """`kubectl kustomize` of one folder, as objects."""
    out = subprocess.run(["kubectl", "kustomize", str(kustomization)], check=True,
                         capture_output=True, text=True).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def validate(obj: dict, version: str = KUBERNETES_VERSION) -> tuple[str, str]:
    """("valid" | "skipped" | "invalid", detail) for one object."""
    import kubernetes_validate

    kind = obj.get("kind", "?")
    if kind in CRD_KINDS:
        return "skipped", CRD_KINDS[kind]
    try:
        kubernetes_validate.validate(obj, version, strict=True)
    except kubernetes_validate.ValidationError as e:
        where = ".".join(str(p) for p in e.path) or "(top level)"
        return "invalid", f"{where}: {e.message}"
    except kubernetes_validate.SchemaNotFoundError as e:
        return "invalid", e.message
    return "valid", f"Kubernetes {version}"


def name_of(obj: dict) -> str:
    meta = obj.get("metadata", {})
    return f"{obj.get('kind')}/{meta.get('namespace', '-')}/{meta.get('name')}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="+", type=Path, help="rendered manifests (multi-document YAML)")
    parser.add_argument("--kubernetes-version", default=KUBERNETES_VERSION)
    args = parser.parse_args(argv)
    try:
        import kubernetes_validate  # noqa: F401
    except ImportError:
        print("kubernetes-validate is not installed: pip install -e '.[deploy]'", file=sys.stderr)
        return 2
    counts = {"valid": 0, "skipped": 0, "invalid": 0}
    for path in args.files:
        for obj in (d for d in yaml.safe_load_all(path.read_text()) if d):
            status, detail = validate(obj, args.kubernetes_version)
            counts[status] += 1
            if status != "valid":
                print(f"{path.name}: {name_of(obj)}: {status.upper()}: {detail}")
    print(f"{counts['valid']} valid, {counts['skipped']} skipped (custom resources), {counts['invalid']} invalid")
    return 1 if counts["invalid"] else 0


if __name__ == "__main__":
    sys.exit(main())
