"""The public edge over real HTTP, as an outside probe found it: metrics per server,
start-up failures, connections, forwarded addresses, logs."""

import re

import httpx
import pytest

from services.local_server import LocalServer

pytestmark = pytest.mark.server


def images_generated(metrics: str) -> float:
    """genserve_images_generated_total summed over its series."""
    return sum(float(m) for m in re.findall(r"^genserve_images_generated_total\{[^}]*\} (\S+)$", metrics, re.M))


def test_two_servers_on_one_host_keep_their_own_metrics(repository, tmp_path):
    """Same BENTOML_HOME (BentoML's shared multiprocess directory) and the same temp dir:
    the second server's start must not wipe the first's series, nor mix them."""
    home, tmp = tmp_path / "bentoml", tmp_path / "tmp"
    home.mkdir(), tmp.mkdir()
    env = {"GENSERVE_MODEL_REPOSITORY": str(repository), "BENTOML_HOME": str(home), "TMPDIR": str(tmp)}
    first = LocalServer(env, tmp_path / "first.log")
    second = None
    try:
        first.wait_ready()
        for seed in range(3):
            r = httpx.post(f"{first.url}/v1/gan/generate", json={"seed": seed, "num_images": 2}, timeout=60)
            assert r.status_code == 200, r.text
        assert images_generated(httpx.get(f"{first.url}/metrics").text) == 6
        second = LocalServer(env, tmp_path / "second.log")
        second.wait_ready()
        r = httpx.post(f"{second.url}/v1/gan/generate", json={"seed": 9, "num_images": 1}, timeout=60)
        assert r.status_code == 200, r.text
        assert images_generated(httpx.get(f"{first.url}/metrics").text) == 6
        assert images_generated(httpx.get(f"{second.url}/metrics").text) == 1
        assert len(list((tmp / "genserve-metrics").iterdir())) == 2  # one directory per server
        first.stop()
        assert len(list((tmp / "genserve-metrics").iterdir())) == 1  # removed by the server that stopped
    finally:
        first.stop()
        if second is not None:
            second.stop()
    assert list((tmp / "genserve-metrics").iterdir()) == []
