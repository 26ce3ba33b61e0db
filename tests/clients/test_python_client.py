"""The typed Python client (clients/python, `genserve_client`) against a live keyed server:
one call per family, streaming events, async, typed errors, retries honouring Retry-After."""

import asyncio
import json
import re
import time

import httpx
import pytest
from PIL import Image as PILImage

import genserve_client as gc
from tests.conftest import KEYED_RATE_LIMIT

pytestmark = pytest.mark.server

KEY, RATE_KEY = "key-client", "key-client-rate"
PROMPT = "a handwritten digit seven"


@pytest.fixture(scope="module")
def client(keyed_server):
    with gc.Client(keyed_server.url, api_key=KEY, max_retries=0, timeout=60) as c:
        yield c


def cancelled(url: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    match = re.search(r'genserve_engine_requests_finished_total\{model="sd_digits",reason="cancelled"\} (\S+)', text)
    return float(match[1]) if match else 0.0


def test_models_and_one_call_per_family(client):
    models = client.models()
    assert isinstance(models.get("sd_digits"), gc.ModelInfo) and models.default_models["diffusion"] == "sd_digits"
    r = client.txt2img(PROMPT, num_images=2, num_inference_steps=8, seed=4, height=32, width=48)
    assert isinstance(r, gc.GenerationResult) and [im.seed for im in r.images] == [4, 5]
    assert r.images[0].to_pil().size == (48, 32) and r.images[0].data[:4] == b"\x89PNG"
    assert r.parameters["num_inference_steps"] == 8 and r.request_id
    again = client.txt2img(PROMPT, num_inference_steps=8, seed=5, height=32, width=48)
    assert again.images[0].data == r.images[1].data  # the response says how to reproduce each image
    cached = client.txt2img(PROMPT, num_inference_steps=8, seed=5, height=32, width=48, cache_interval=2)
    assert cached.parameters["cache_interval"] == 2 and cached.images[0].data != again.images[0].data
    source = r.images[0].to_pil()
    assert client.img2img(source.resize((32, 32)), PROMPT, strength=0.5, num_inference_steps=8).images[0].width == 32
    mask = PILImage.new("L", (32, 32), 0)
    mask.paste(255, (16, 0, 32, 32))
    assert len(client.inpaint(source.resize((32, 32)), mask, PROMPT, num_inference_steps=8).images) == 1
    assert client.gan_generate(model="dcgan_digits", seed=1, num_images=3).images[2].seed == 3
    assert client.ddpm_generate(seed=2, num_inference_steps=5).images[0].seed == 2
    latents = client.gan_latents([1, 2], model="stylegan_digits")
    assert latents.tensor.shape[0] == 2
    assert len(client.gan_synthesize(latents.tensor, model="stylegan_digits").images) == 2
    encoded = client.vae_encode(source.resize((32, 32)), model="sd_digits")
    assert len(client.vae_decode(encoded.tensor, model="sd_digits").images) == 1


def test_stream_events_are_typed_and_breaking_out_cancels(client, keyed_server):
    events = list(client.txt2img_stream(PROMPT, num_inference_steps=6, preview_every=2, seed=9))
    kinds = [type(e).__name__ for e in events]
    assert kinds.count("Progress") == 6 and kinds.count("Preview") == 2 and kinds[-1] == "Result"
    assert events[-1].result.images[0].seed == 9 and events[1].total == 6
    before = cancelled(keyed_server.url)
    for event in client.txt2img_stream(PROMPT, num_inference_steps=150, num_images=4, seed=1):
        if isinstance(event, gc.Progress) and event.step >= 2:
            break  # the generator closes the response: the server cancels the request
    deadline = time.monotonic() + 10
    while cancelled(keyed_server.url) <= before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert cancelled(keyed_server.url) == before + 1


def test_async_client_calls_and_streams(keyed_server):
    async def go():
        async with gc.AsyncClient(keyed_server.url, api_key=KEY, max_retries=0) as c:
            results = await asyncio.gather(*[c.txt2img(PROMPT, num_inference_steps=5, seed=s) for s in (1, 2)])
            events = [e async for e in c.ddpm_generate_stream(seed=3, num_inference_steps=4, preview_every=2)]
            return results, events
    results, events = asyncio.run(go())
    assert [r.images[0].seed for r in results] == [1, 2]
    assert isinstance(events[-1], gc.Result) and any(isinstance(e, gc.Preview) for e in events)


def test_errors_are_typed_with_the_error_shape(client, keyed_server):
    with pytest.raises(gc.InvalidRequestError) as info:
        client.txt2img(PROMPT, num_images=99)
    assert info.value.status == 422 and info.value.field == "num_images" and info.value.limit == 8
    assert info.value.request_id
    with pytest.raises(gc.NotFoundError) as info:
        client.txt2img(PROMPT, model="nope")
    assert "sd_digits" in info.value.allowed
    with pytest.raises(gc.InvalidRequestError) as info:  # errors before a stream starts raise at the call
        client.txt2img_stream(PROMPT, height=33)
    assert info.value.field == "height"
    with pytest.raises(gc.AuthenticationError):
        gc.Client(keyed_server.url, api_key="wrong").models()
    with pytest.raises(gc.APIConnectionError):
        gc.Client("http://127.0.0.1:9", max_retries=1, max_retry_wait=0.01).models()


def test_rate_limited_calls_are_retried_after_retry_after(keyed_server):
    limit = int(KEYED_RATE_LIMIT.split("/")[0])
    with gc.Client(keyed_server.url, api_key=RATE_KEY, max_retries=0) as c:
        for _ in range(limit):
            c.models()
        with pytest.raises(gc.RateLimitError) as info:
            c.models()
        assert info.value.retry_after >= 1 and info.value.code == "rate_limited"
    with gc.Client(keyed_server.url, api_key=RATE_KEY, max_retries=3) as c:
        start = time.monotonic()
        assert c.models().models  # waits out Retry-After, then succeeds
        assert time.monotonic() - start >= 0.9


def test_retry_waits_are_the_servers(monkeypatch):
    answers = [httpx.Response(503, headers={"Retry-After": "0.3"}, json={"error": {"code": "backend_unavailable",
                                                                                   "message": "down"}}),
               httpx.Response(429, headers={"Retry-After": "0.2"}, json={"error": {"code": "queue_full",
                                                                                  "message": "full"}}),
               httpx.Response(200, json={"default_models": {}, "models": []})]
    slept = []
    monkeypatch.setattr(time, "sleep", slept.append)
    c = gc.Client("http://test", transport=httpx.MockTransport(lambda request: answers.pop(0)))
    assert c.models().models == [] and slept == [0.3, 0.2]
    answers[:] = [httpx.Response(503, json={"error": {"code": "backend_unavailable", "message": "down"}})] * 3
    with pytest.raises(gc.ServiceUnavailableError):
        c.models()


def test_a_generation_is_not_sent_twice_after_the_server_may_have_started_it(monkeypatch):
    """A read timeout or dropped connection can follow work the server did: a POST is sent again
    only when it never left (connection refused), a GET after any transport error."""
    monkeypatch.setattr(time, "sleep", lambda s: None)
    sent = []

    def failing(error):
        def handler(request):
            sent.append(request.method)
            raise error("boom", request=request)
        return handler

    for error, posts in ((httpx.ReadTimeout, 1), (httpx.RemoteProtocolError, 1), (httpx.ConnectError, 3)):
        sent.clear()
        with gc.Client("http://test", transport=httpx.MockTransport(failing(error))) as c:
            with pytest.raises(gc.APIConnectionError):
                c.txt2img("a cat")
        assert sent == ["POST"] * posts, error
    sent.clear()
    with gc.Client("http://test", transport=httpx.MockTransport(failing(httpx.ReadTimeout))) as c:
        with pytest.raises(gc.APIConnectionError):
            c.models()
    assert sent == ["GET"] * 3


def test_lora_is_sent_as_the_requests_adapter_list_in_order():
    sent = []

    def handler(request):
        sent.append((request.url.path, json.loads(request.content)))
        return httpx.Response(422, json={"error": {"code": "invalid_request", "message": "lora: no slots",
                                                   "field": "lora"}})

    with gc.Client("http://test", transport=httpx.MockTransport(handler)) as c:
        for call in (lambda: c.txt2img("a cat", lora={"ink": 0.8, "paper": -1}),
                     lambda: c.img2img(b"png", "a cat", lora={"ink": 1}),
                     lambda: c.inpaint(b"png", b"png", "a cat", lora={})):
            with pytest.raises(gc.InvalidRequestError) as refused:
                call()
            assert refused.value.field == "lora"
    assert [body["lora"] for _, body in sent] == [
        [{"name": "ink", "scale": 0.8}, {"name": "paper", "scale": -1.0}], [{"name": "ink", "scale": 1.0}], []]
    assert [path for path, _ in sent] == ["/v1/txt2img", "/v1/img2img", "/v1/inpaint"]
