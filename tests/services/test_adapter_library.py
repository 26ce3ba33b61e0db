"""Adapters loaded at run time (services.adapter_library, /v1/adapters).

On conftest's lora_repositories (a tiny random SD export with the `peft` and `kohya` adapters
stored and adapter slots): an adapter found in an allowed directory, stored there or as its
author published it, loads on first use and serves the image the repository's copy serves; the
memory cap unloads the least recently used idle adapter and never one a request holds; an
unload or reload leaves running requests and the prompt cache right; what cannot be loaded is
refused naming the field. Over HTTP: the endpoints, admin keys, and loads and unloads while
requests with adapters run, none failing.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import threading
import time

import numpy as np
import pytest

from services.adapter_library import AdapterLibrary
from services.adapters import MANIFEST, load_adapter
from services.engine.engine import DiffusionEngine, EngineConfig
from services.engine.request import RequestStatus
from services.errors import AdapterNotFound, InvalidRequest, MemoryLimited
from services.pipelines.pipeline_stable_diffusion import (
    DiffusionRequest,
    StableDiffusionPipeline,
    discover_stable_diffusion,
)
from services.runtime.onnxruntime_backend import OnnxRuntimeBackend
from services.runtime.repository import ModelRepository
from tests.fixtures.engine import drain

pytestmark = pytest.mark.slow
PIPELINE, STEPS = "sd_random", 3


class Recorder:
    """The library's observer, counting what it reports."""

    def __init__(self):
        self.loads, self.evictions, self.lookups = [], [], []

    def loaded(self, pipeline, source, seconds):
        self.loads.append(source)

    def evicted(self, pipeline, reason):
        self.evictions.append(reason)

    def lookup(self, pipeline, hit):
        self.lookups.append(hit)

    def memory(self, adapters, nbytes):
        pass


@pytest.fixture(scope="module")
def slotted(lora_repositories):
    return lora_repositories[3]


@pytest.fixture(scope="module")
def backend(slotted):
    return OnnxRuntimeBackend(ModelRepository(slotted))


def pipeline_with(backend, library: AdapterLibrary) -> StableDiffusionPipeline:
    pipeline = StableDiffusionPipeline(backend, discover_stable_diffusion(backend.models())[PIPELINE])
    library.adopt(pipeline.adapters)
    return pipeline


def stored(slotted, name):
    return slotted / f"{PIPELINE}_unet" / "adapters" / name


def copy_adapter(slotted, name, dest, new_name, pipeline=PIPELINE):
    """A stored adapter as `export lora --out dest` writes it, under another name."""
    folder = dest / new_name
    shutil.copytree(stored(slotted, name), folder)
    manifest = json.loads((folder / MANIFEST).read_text())
    (folder / MANIFEST).write_text(json.dumps({**manifest, "name": new_name, "pipeline": pipeline}))
    return folder


def req(lora, seed=5) -> DiffusionRequest:
    return DiffusionRequest(prompt="a red cat", negative_prompt="blue", num_inference_steps=STEPS,
                            guidance_scale=4.0, seed=seed, lora=list(lora))


def generate(pipeline, request) -> np.ndarray:
    return asyncio.run(pipeline(request)).images


def test_an_adapter_stored_in_an_allowed_directory_loads_on_first_use(backend, slotted, tmp_path):
    copy_adapter(slotted, "kohya", tmp_path, "kohya_dir")
    copy_adapter(slotted, "kohya", tmp_path, "for_another", pipeline="sd_other")  # not offered to sd_random
    recorder = Recorder()
    library = AdapterLibrary(dirs=[tmp_path], observer=recorder)
    pipeline = pipeline_with(backend, library)
    library.preload()
    assert recorder.loads == ["repository", "repository"]
    assert pipeline.adapters.names == ["kohya", "kohya_dir", "peft"]
    assert ("sd_random", "kohya_dir") not in library.loaded
    from_dir = generate(pipeline, req([("kohya_dir", 0.8)]))
    assert library.loaded[("sd_random", "kohya_dir")].source == "directory"
    assert recorder.loads[-1] == "directory" and recorder.lookups == [False]
    np.testing.assert_array_equal(from_dir, generate(pipeline, req([("kohya", 0.8)])))
    generate(pipeline, req([("kohya_dir", 0.8)]))
    assert recorder.lookups == [False, True, True]  # then loaded: hits


def test_a_published_lora_file_in_an_allowed_directory_is_converted_once(backend, slotted, lora_repositories,
                                                                          tmp_path, monkeypatch):
    files = lora_repositories[1]
    dirs, cache = tmp_path / "dirs", tmp_path / "cache"
    dirs.mkdir()
    shutil.copy(files["kohya"], dirs / "kohya_file.safetensors")
    library = AdapterLibrary(dirs=[dirs], repository=slotted, cache_dir=cache)
    pipeline = pipeline_with(backend, library)
    library.preload()
    converted = generate(pipeline, req([("kohya_file", 0.7)]))
    assert library.loaded[("sd_random", "kohya_file")].source == "converted"
    np.testing.assert_array_equal(converted, generate(pipeline, req([("kohya", 0.7)])))

    async def no_child(*args, **kwargs):
        raise AssertionError("converted again")

    monkeypatch.setattr(asyncio, "create_subprocess_exec", no_child)
    again = AdapterLibrary(dirs=[dirs], repository=slotted, cache_dir=cache)  # a restarted worker
    np.testing.assert_array_equal(generate(pipeline_with(backend, again), req([("kohya_file", 0.7)])), converted)


def test_the_memory_cap_unloads_the_least_recently_used_idle_adapter_only(backend, slotted, tmp_path):
    for name in ("a", "b", "c"):
        copy_adapter(slotted, "kohya", tmp_path, name)
    size = load_adapter(stored(slotted, "kohya")).nbytes
    recorder = Recorder()
    library = AdapterLibrary(memory_bytes=2 * size + size // 2, dirs=[tmp_path], observer=recorder)
    pipeline = pipeline_with(backend, library)
    adapters = pipeline.adapters

    async def run():
        engine = DiffusionEngine(pipeline, EngineConfig(16, 10_000), start_loop=False)
        await adapters.ensure([("a", 1.0)])
        await adapters.ensure([("b", 1.0)])
        held = engine.submit(req([("a", 0.5)]), timeout_s=600)  # a is held (and now the last used)
        await adapters.ensure([("c", 1.0)])  # room for c: b, idle, goes
        assert sorted(n for _, n in library.loaded) == ["a", "c"] and recorder.evictions == ["memory"]
        other = engine.submit(req([("c", 0.5)]), timeout_s=600)
        with pytest.raises(MemoryLimited, match="GENSERVE_ADAPTER_MEMORY_MB"):  # a and c are held
            await adapters.ensure([("b", 1.0)])
        assert library.nbytes <= library.memory_bytes
        await drain(engine, [held, other])
        assert held.status == other.status == RequestStatus.FINISHED_DONE
        await adapters.ensure([("b", 1.0)])  # idle now: a (least recently used) goes
        assert sorted(n for _, n in library.loaded) == ["b", "c"]

    asyncio.run(run())
    small = AdapterLibrary(memory_bytes=size // 2, dirs=[tmp_path])
    with pytest.raises(InvalidRequest) as info:
        generate(pipeline_with(backend, small), req([("a", 1.0)]))
    assert info.value.field == "lora[0].name" and info.value.limit == 0  # MB, rounded down


def test_an_unload_or_reload_leaves_running_requests_and_the_prompt_cache_right(backend, slotted, tmp_path):
    """Deleted while a request holds it: that request finishes with it, equal to it alone; the
    name loaded again is another load, so its prompts are encoded anew, not read from the cache."""
    copy_adapter(slotted, "peft", tmp_path, "style")
    library = AdapterLibrary(dirs=[tmp_path])
    pipeline = pipeline_with(backend, library)
    alone = generate(pipeline, req([("style", 0.9)]))
    first = library.loaded[("sd_random", "style")].id

    async def run():
        from services.engine.prompt_cache import PromptCache

        cache = PromptCache(64)
        engine = DiffusionEngine(pipeline, EngineConfig(16, 10_000), prompt_cache=cache, start_loop=False)
        handle = engine.submit(req([("style", 0.9)]), timeout_s=600)
        assert library.delete(pipeline.adapters, "style")["in_use"] is True
        assert ("sd_random", "style") not in library.loaded and first in pipeline.adapters.live  # still held
        await drain(engine, [handle])
        assert library.nbytes == 0 and not pipeline.adapters.live  # let go once the request ended
        await pipeline.adapters.ensure([("style", 0.9)])  # loadable still: from the directory
        second = engine.submit(req([("style", 0.9)]), timeout_s=600)
        await drain(engine, [second])
        assert len(cache) == 4  # both loads' [negative, positive]: the second is not the first's
        return handle.result.images, second.result.images

    during, after = asyncio.run(run())
    np.testing.assert_array_equal(during, alone)
    np.testing.assert_array_equal(after, alone)
    assert library.loaded[("sd_random", "style")].id != first


def test_a_request_waiting_for_a_load_that_a_reload_replaces_gets_the_new_one(backend, slotted, tmp_path):
    """A first use is loading; an operator's POST of the name waits for it and then reloads it;
    a request that joined the first load after the POST must return with the name loaded (the
    engine's submit follows without an await), not with the replaced load."""
    copy_adapter(slotted, "kohya", tmp_path, "style")
    library = AdapterLibrary(dirs=[tmp_path])
    adapters = pipeline_with(backend, library).adapters

    async def request() -> bool:
        await adapters.ensure([("style", 1.0)])
        return ("sd_random", "style") in library.loaded  # what submit would find now

    async def first_use():  # the load that was current when its wait ended
        await library.ensure(adapters, [("style", "name")], field="name")
        return library.loaded[("sd_random", "style")]

    async def run():
        first = asyncio.ensure_future(first_use())
        await asyncio.sleep(0)  # its load has started
        post = asyncio.ensure_future(library.register(adapters, "style", tmp_path / "style"))
        await asyncio.sleep(0)
        joined = asyncio.ensure_future(request())
        results = await asyncio.gather(first, post, joined)
        return results, library.loaded[("sd_random", "style")]

    (first, posted, joined_loaded), now = asyncio.run(run())
    assert joined_loaded and posted is now and first is not now  # the POST's reload replaced the first load
    adapters.resolve([("style", 1.0)])  # admitted with the current load


def test_what_cannot_be_loaded_is_refused_naming_the_field(backend, slotted, tmp_path):
    library = AdapterLibrary(dirs=[tmp_path / "allowed"])
    (tmp_path / "allowed").mkdir()
    pipeline = pipeline_with(backend, library)
    with pytest.raises(InvalidRequest, match="outside the adapter directories") as info:
        library.allowed(str(tmp_path / "allowed" / ".." / "elsewhere.safetensors"))
    assert info.value.field == "path"
    with pytest.raises(InvalidRequest, match="GENSERVE_ADAPTER_DIRS names no directory"):
        AdapterLibrary().allowed(str(tmp_path))
    with pytest.raises(InvalidRequest, match="no adapter 'nope'") as info:
        pipeline.check_adapters(req([("nope", 1.0)]))
    assert info.value.field == "lora[0].name"
    with pytest.raises(AdapterNotFound):
        library.delete(pipeline.adapters, "nope")
    # Another export's adapter: a layer the slotted graphs do not have.
    from safetensors.numpy import load_file, save_file

    folder = copy_adapter(slotted, "kohya", tmp_path / "allowed", "stale")
    manifest = json.loads((folder / MANIFEST).read_text())
    layer = manifest["layers"][0]
    old, new = f"{layer['graph']}:{layer['node']}:", f"{layer['graph']}:/not/a/node/MatMul:"
    layer["node"] = "/not/a/node/MatMul"
    tensors = load_file(str(folder / "weights.safetensors"))
    save_file({k.replace(old, new): v for k, v in tensors.items()}, str(folder / "weights.safetensors"))
    (folder / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(InvalidRequest, match="has no layer /not/a/node/MatMul") as info:
        generate(pipeline, req([("stale", 1.0)]))
    assert info.value.field == "lora[0].name"
    assert ("sd_random", "stale") not in library.loaded
    pipeline.adapters.stored["stale"] = folder  # as if stored in the repository: start-up skips it, says why
    library.preload()
    assert ("sd_random", "stale") not in library.loaded and ("sd_random", "kohya") in library.loaded


# -- over HTTP ---------------------------------------------------------------------------
USER_KEY, ADMIN_KEY = "adapter-user-key", "adapter-admin-key"


@pytest.fixture(scope="module")
def adapter_server(slotted, tmp_path_factory):
    from tests.conftest import running_server

    tmp = tmp_path_factory.mktemp("adapter_server")
    dirs = tmp / "adapters"
    dirs.mkdir()
    for name in ("one", "two", "three"):
        copy_adapter(slotted, "kohya" if name != "two" else "peft", dirs, name)
    (tmp / "keys").write_text(f"{USER_KEY}\n")
    (tmp / "admin").write_text(f"{ADMIN_KEY}\n")
    yield from running_server({
        "GENSERVE_MODEL_REPOSITORY": str(slotted), "GENSERVE_ADAPTER_DIRS": str(dirs),
        "GENSERVE_API_KEYS_FILE": str(tmp / "keys"), "GENSERVE_ADMIN_KEYS_FILE": str(tmp / "admin"),
        "GENSERVE_WARMUP_BUDGET_S": "2"}, tmp)


@pytest.mark.server
def test_the_adapter_endpoints_with_admin_keys_and_hot_loads_under_load(adapter_server):
    import httpx

    url = adapter_server.url
    user, admin = {"X-API-Key": USER_KEY}, {"X-API-Key": ADMIN_KEY}
    dirs = json.loads(httpx.get(f"{url}/v1/adapters", headers=user).text)["directories"]
    listed = httpx.get(f"{url}/v1/adapters", headers=user).json()["adapters"]
    assert {(a["name"], a["loaded"]) for a in listed} == {("kohya", True), ("peft", True), ("one", False),
                                                          ("two", False), ("three", False)}
    body = {"path": f"{dirs[0]}/one", "model": PIPELINE}
    r = httpx.post(f"{url}/v1/adapters", json=body, headers=user)
    assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"
    assert httpx.post(f"{url}/v1/adapters", json=body).status_code == 401
    r = httpx.post(f"{url}/v1/adapters", json=body, headers=admin)
    assert r.status_code == 201, r.text
    assert r.json()["name"] == "one" and r.json()["loaded"] and r.json()["targets"]
    r = httpx.post(f"{url}/v1/adapters", json={"path": "/etc/passwd", "model": PIPELINE}, headers=admin)
    assert r.status_code == 422 and r.json()["error"]["field"] == "path"
    r = httpx.delete(f"{url}/v1/adapters", params={"name": "nope", "model": PIPELINE}, headers=admin)
    assert r.status_code == 404 and r.json()["error"]["code"] == "adapter_not_found"
    r = httpx.post(f"{url}/v1/txt2img", json={"prompt": "x", "num_inference_steps": 2, "lora": [{"name": "zz"}]},
                   headers=user)
    assert r.status_code == 422 and r.json()["error"]["field"] == "lora[0].name"

    # Requests naming adapters while an operator loads and unloads them: none fails.
    results, stop = [], threading.Event()

    def client(names):
        with httpx.Client(timeout=120, headers=user) as c:
            i = 0
            while not stop.is_set():
                name = names[i % len(names)]
                r = c.post(f"{url}/v1/txt2img", json={"prompt": "a cat", "num_inference_steps": 2, "seed": i,
                                                      "lora": [{"name": name, "scale": 0.7}]})
                results.append((name, r.status_code, r.text[:200]))
                i += 1

    threads = [threading.Thread(target=client, args=(names,)) for names in (["one", "two"], ["three", "one"])]
    for t in threads:
        t.start()
    churn, deadline = 0, time.monotonic() + 300
    with httpx.Client(timeout=120, headers=admin) as c:
        while (churn < 12 or len(results) < 12) and time.monotonic() < deadline:  # requests run meanwhile
            name = ("one", "two", "three")[churn % 3]
            deleted = c.delete(f"{url}/v1/adapters", params={"name": name, "model": PIPELINE})
            assert deleted.status_code in (200, 404), deleted.text  # 404: not loaded at that moment
            loaded = c.post(f"{url}/v1/adapters", json={"path": f"{dirs[0]}/{name}", "model": PIPELINE})
            assert loaded.status_code == 201, loaded.text
            churn += 1
    stop.set()
    for t in threads:
        t.join()
    assert len(results) >= 12 and all(status == 200 for _, status, _ in results), \
        [r for r in results if r[1] != 200]
    metrics = httpx.get(f"{url}/metrics").text
    assert 'genserve_adapter_evictions_total{model="sd_random",reason="deleted"}' in metrics
    assert 'genserve_adapter_lookups_total{model="sd_random",result="hit"}' in metrics
    assert 'genserve_adapter_loads_total{model="sd_random",source="directory"}' in metrics
