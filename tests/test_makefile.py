"""The Makefile's commands, dry-run (`make -n`: nothing is built, installed or served)."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")


def dry_run(target: str, **env) -> str:
    run = subprocess.run(["make", "-n", target], cwd=ROOT, env={**os.environ, **env}, capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    return run.stdout


@pytest.mark.parametrize("target", ["serve", "serve-triton", "triton"])
def test_a_repository_given_by_the_user_is_the_one_served(target):
    out = dry_run(target, GENSERVE_MODEL_REPOSITORY="/srv/my-models")
    assert "/srv/my-models" in out and "--repository model_repository" not in out
    assert "GENSERVE_MODEL_REPOSITORY=model_repository" not in out and "--model-repository model_repository" not in out


def test_without_one_the_demo_repository_is_served(monkeypatch):
    monkeypatch.delenv("GENSERVE_MODEL_REPOSITORY", raising=False)
    assert "GENSERVE_MODEL_REPOSITORY=model_repository" in dry_run("serve")
