"""Settings: each GENSERVE_* variable is declared once (services.config), and the README's
configuration table is the one those declarations print."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from services.config import Settings, table, variables

README = Path(__file__).resolve().parents[2] / "README.md"


def test_the_readme_table_is_the_declared_one():
    text = README.read_text()
    start = text.index("| variable | default | meaning |")
    documented = text[start:text.index("\n\n", start) + 1]
    assert documented == table(), "README's configuration table differs from services/config.py: " \
                                  "replace it with the output of `python -m services.config`"


def test_every_variable_is_declared_once_with_its_default():
    names = [v.name for v in variables()]
    assert len(names) == len(set(names)) and all(n.startswith("GENSERVE_") for n in names)


def test_unset_variables_load_the_declared_defaults(monkeypatch):
    for v in variables():
        monkeypatch.delenv(v.name, raising=False)
    loaded, declared = Settings.from_env(), Settings()
    assert loaded.memory.limit_mb >= 0  # the host's share: only the loader reads it
    assert replace(loaded, memory=declared.memory) == declared


def test_bad_values_are_refused_by_name(monkeypatch):
    monkeypatch.setenv("GENSERVE_MAX_QUEUED_STEPS", "0")
    with pytest.raises(ValueError, match="GENSERVE_MAX_QUEUED_STEPS must be >= 1, got 0"):
        Settings.from_env()
    monkeypatch.setenv("GENSERVE_MAX_QUEUED_STEPS", "many")
    with pytest.raises(ValueError, match="GENSERVE_MAX_QUEUED_STEPS must be an integer, got 'many'"):
        Settings.from_env()
    monkeypatch.delenv("GENSERVE_MAX_QUEUED_STEPS")
    monkeypatch.setenv("GENSERVE_BACKEND", "")
    with pytest.raises(ValueError, match="GENSERVE_BACKEND must be one of onnxruntime, triton, got ''"):
        Settings.from_env()
