"""Start-up: defaults nobody configured never stop the service; a failed start stops the
whole server, non-zero, with its port closed."""

import socket

import pytest

from services.config import Settings
from services.context import ServiceContext
from services.errors import InvalidRequest
from services.service import GenServe
from tests.fixtures.local_server import LocalServer


def context(**vae) -> ServiceContext:
    return ServiceContext(Settings.from_env(), backend=None, metrics=None, vae=vae)


def test_an_unset_default_with_several_models_served_leaves_no_default(monkeypatch):
    """An SDXL pipeline (its VAE is served too) beside a standalone VAE, neither named like
    the built-in default: the service starts, and requests naming no VAE are told to name one."""
    monkeypatch.delenv("GENSERVE_DEFAULT_VAE_MODEL", raising=False)
    ctx = context(hid_sdxl=object(), hid_vae=object())
    GenServe.inner._check_defaults(ctx)
    assert ctx.settings.defaults.vae is None
    with pytest.raises(InvalidRequest) as refused:
        ctx.model_name(None, "vae", ctx.vae)
    assert refused.value.field == "model" and refused.value.allowed == ["hid_sdxl", "hid_vae"]
    assert "GENSERVE_DEFAULT_VAE_MODEL" in refused.value.message
    assert ctx.model_name("hid_vae", "vae", ctx.vae) == "hid_vae"


def test_an_unset_default_with_one_model_served_is_that_model(monkeypatch):
    monkeypatch.delenv("GENSERVE_DEFAULT_VAE_MODEL", raising=False)
    ctx = context(only_vae=object())
    GenServe.inner._check_defaults(ctx)
    assert ctx.model_name(None, "vae", ctx.vae) == "only_vae"


def test_a_configured_default_that_is_not_served_is_refused(monkeypatch):
    monkeypatch.setenv("GENSERVE_DEFAULT_VAE_MODEL", "vae_digits")
    with pytest.raises(ValueError, match="GENSERVE_DEFAULT_VAE_MODEL='vae_digits' is not in the repository"):
        GenServe.inner._check_defaults(context(hid_sdxl=object(), hid_vae=object()))


@pytest.mark.server
def test_a_failed_start_exits_non_zero_and_closes_the_port(repository, tmp_path):
    server = LocalServer({"GENSERVE_MODEL_REPOSITORY": str(repository), "GENSERVE_DEFAULT_VAE_MODEL": "nope",
                          "TMPDIR": str(tmp_path)}, tmp_path / "bentoml.log")
    try:
        # BentoML's supervisor used to respawn the worker forever, the port open and unanswered.
        assert server.proc.wait(timeout=120) != 0, server.logs()
        assert "GENSERVE_DEFAULT_VAE_MODEL='nope' is not in the repository" in server.logs()
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", server.port), timeout=5).close()
        assert not any((tmp_path / "genserve-metrics").iterdir())  # its metrics directory is gone too
    finally:
        server.stop()
