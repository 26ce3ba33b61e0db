"""The committed digits ControlNet, exported by `export demo` and served by the torch-free
pipeline: with the empty prompt, the classifier reads the outline's digit far more often with
the control image than without it (the rates measured for the checkpoint are in its
training.json)."""

from __future__ import annotations

import json

import pytest

from zoo.controlnet import CHECKPOINT
from zoo.controlnet.evaluate import judge

pytestmark = pytest.mark.slow


def test_outlines_steer_the_digit(repository, classifier):
    rates = judge(repository, 100, classifier)
    recorded = json.loads((CHECKPOINT / "training.json").read_text())["judged"]
    assert rates["with_control"] >= 0.6 and rates["with_control"] >= rates["without_control"] + 0.4, rates
    assert abs(rates["with_control"] - recorded["with_control"]) <= 0.05, (rates, recorded)
