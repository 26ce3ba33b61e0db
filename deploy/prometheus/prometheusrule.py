"""Print the rule files as one Prometheus Operator PrometheusRule, for clusters whose
Prometheus selects rules by PrometheusRule objects (kube-prometheus-stack):

    python deploy/prometheus/prometheusrule.py --label release=kube-prometheus-stack \
        | kubectl apply -n monitoring -f -

The rule files stay the single source (promtool checks and tests them); this only
wraps their groups, unchanged, in the object the Operator reads.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
RULE_FILES = ("genserve.rules.yaml", "genserve.alerts.yaml")


def prometheus_rule(labels: dict[str, str]) -> dict:
    groups = [g for name in RULE_FILES for g in yaml.safe_load((HERE / name).read_text())["groups"]]
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "genserve", "labels": {"app.kubernetes.io/part-of": "genserve", **labels}},
        "spec": {"groups": groups},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--label", action="append", default=[], metavar="KEY=VALUE",
                        help="label the Prometheus's ruleSelector matches (repeatable)")
    args = parser.parse_args(argv)
    labels = dict(item.split("=", 1) for item in args.label)
    yaml.safe_dump(prometheus_rule(labels), sys.stdout, sort_keys=False, width=1000)
    return 0


if __name__ == "__main__":
    sys.exit(main())
