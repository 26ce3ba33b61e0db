"""The family registry (services/families.py) is the one list of families: each family
appears everywhere it should (its router mounted and documented, its demo models in
GET /v1/models with the capabilities its descriptor states, its playground tab, the export
dispatcher), and every family in the demo repository is registered.

In process: the service is built over the demo repository on the embedded backend and its
/v1 app is called through FastAPI's TestClient."""

from __future__ import annotations

import asyncio
import base64
import json
import re
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from services import families
from services.families import FAMILIES

STATIC = Path(families.__file__).parent / "playground" / "static"


@pytest.fixture(scope="module")
def service(repository):
    from services.service import GenServe, app

    with pytest.MonkeyPatch.context() as env:
        env.setenv("GENSERVE_MODEL_REPOSITORY", str(repository))
        env.setenv("GENSERVE_BACKEND", "onnxruntime")
        # ONNX Runtime's process-wide pool, once made, refuses every later per-session one: the
        # tests after this one in the process build backends with their own pools.
        env.setenv("GENSERVE_ORT_THREAD_POOL", "per-session")
        for group in families.default_models():
            env.delenv(f"GENSERVE_DEFAULT_{group.upper()}_MODEL", raising=False)
        service = GenServe.inner()
    with TestClient(app) as client:
        yield service.ctx, client
    app.state.context = None
    asyncio.run(service._close())


@pytest.fixture(scope="module")
def listed(service) -> dict[str, dict]:
    _, client = service
    response = client.get("/models")
    assert response.status_code == 200, response.text
    return response.json()


def demo_models(ctx, family) -> set[str]:
    """The family's models in the repository, by its configs' genserve.pipeline (not the registry)."""
    return {spec.parameters.get("genserve.pipeline_name", name) for name, spec in ctx.backend.models().items()
            if spec.parameters.get("genserve.pipeline") == family.name}


def entries(listed: dict, family) -> dict[str, dict]:
    # image-to-image models are listed as image_to_image/<task>
    return {m["name"]: m for m in listed["models"] if m["pipeline"].split("/")[0] == family.name}


def endpoints(entry: dict) -> list[str]:
    return entry["endpoint"].split(", ")


def test_every_family_in_the_repository_is_registered(service):
    ctx, _ = service
    found = {spec.parameters["genserve.pipeline"] for spec in ctx.backend.models().values()
             if "genserve.pipeline" in spec.parameters}
    assert found <= set(families.BY_NAME), found - set(families.BY_NAME)
    assert len(families.BY_NAME) == len(FAMILIES)


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_its_router_is_mounted_and_documented(service, family):
    from services.service import FAMILY_ROUTERS

    ctx, client = service
    router = families.load(f"{family.router}:router")
    assert family.router in {module.__name__ for module in FAMILY_ROUTERS}
    assert families.load(f"{family.router}:describe") in ctx.describers  # its GET /v1/models entries
    documented = client.get("/openapi.json").json()["paths"]
    assert router.routes
    for route in router.routes:
        assert set(documented[route.path]) == {method.lower() for method in route.methods}
        for method in route.methods:  # answered by the app (an empty body: refused, not unknown)
            assert client.request(method, route.path).status_code not in (404, 405), route.path


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_its_demo_models_are_listed_with_its_capabilities(service, listed, family):
    ctx, _ = service
    expected = demo_models(ctx, family)
    listed_here = entries(listed, family)
    assert set(listed_here) == expected
    if not expected:
        pytest.skip(f"the demo repository has no {family.name} model")
    if family.default_model:
        assert listed["default_models"][family.default_model] is not None
    single_pass = ctx.backend.batched_models
    for name, entry in listed_here.items():
        assert ("/v1/txt2img" in endpoints(entry)) == family.text_conditioned
        assert ("/v1/vae/decode" in endpoints(entry)) == family.latent_vae
        assert ("/v1/gan/generate" in endpoints(entry)) == family.gan
        assert (entry["cost_model"] is not None) == family.step_engine
        graphs = {n for n, spec in ctx.backend.models().items()
                  if spec.parameters.get("genserve.pipeline_name", n) == name}
        assert graphs and all((graph in single_pass) == family.single_pass for graph in graphs)


@pytest.mark.parametrize("family", [f for f in FAMILIES if f.latent_vae], ids=lambda f: f.name)
def test_a_latent_familys_vae_decodes_under_the_models_name(service, family):
    ctx, client = service
    for name in demo_models(ctx, family):
        latent = np.zeros((1, *ctx.vae[name].info.native_latent), "<f4")
        response = client.post("/vae/decode", json={"model": name, "latent": {
            "shape": list(latent.shape), "datatype": "FP32", "data": base64.b64encode(latent.tobytes()).decode()}})
        assert response.status_code == 200, response.text


@pytest.mark.parametrize("family", [f for f in FAMILIES if f.gan], ids=lambda f: f.name)
def test_a_gan_familys_models_sample_on_gan_generate(service, family):
    ctx, client = service
    for name in demo_models(ctx, family):
        response = client.post("/gan/generate", json={"model": name, "seed": 1})
        assert response.status_code == 200, response.text
        assert response.json()["model"] == name


def playground_tabs() -> dict[str, set[str]]:
    """app.js's tab -> the endpoints whose models it offers."""
    script = (STATIC / "app.js").read_text()
    table = script[script.index("const offered = {"):]
    table = table[:table.index("};")]
    return {tab: set(re.findall(r'serves\(m, "([^"]+)"\)', line))
            for tab, line in re.findall(r'"(tab-[\w-]+)": (.*)', table)}


@pytest.mark.parametrize("family", [f for f in FAMILIES if f.playground_tab], ids=lambda f: f.name)
def test_the_playground_offers_its_models_in_its_tab(service, listed, family):
    assert f'id="{family.playground_tab}"' in (STATIC / "index.html").read_text()
    offered_by = playground_tabs()[family.playground_tab]
    assert offered_by
    for entry in entries(listed, family).values():
        assert offered_by & set(endpoints(entry)), (entry["name"], offered_by)


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_the_exporter_knows_its_classes(tmp_path, family):
    from export.diffusers_folder import detect_family

    assert callable(families.load(family.export))
    for i, class_name in enumerate(family.diffusers_pipelines):
        folder = tmp_path / f"pipeline{i}"
        folder.mkdir()
        (folder / "model_index.json").write_text(json.dumps({"_class_name": class_name}))
        assert detect_family(folder) == family.name
    for i, class_name in enumerate(family.diffusers_models):
        folder = tmp_path / f"model{i}"
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({"_class_name": class_name}))
        assert detect_family(folder) == family.name


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_the_export_cli_has_its_commands(capsys, family):
    from export.__main__ import main

    with pytest.raises(SystemExit) as exited:
        main(["--help"])
    assert exited.value.code == 0
    listed = re.search(r"\{([a-z0-9,-]+)\}", capsys.readouterr().out)
    assert listed, "python -m export --help lists no subcommands"
    assert family.export_commands and set(family.export_commands) <= set(listed.group(1).split(","))
