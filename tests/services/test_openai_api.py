"""The OpenAI Images API (/v1/images/*) driven by the official `openai` SDK against a live
server with API keys on: sync, async, streaming, edits, and the SDK's typed exceptions."""

import asyncio
import base64
import io
import re
import time

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from services.routers.openai_images import OpenAIErrorShape, openai_mask_to_genserve
from tests.conftest import KEYED_RATE_LIMIT

pytestmark = pytest.mark.server

KEY, RATE_KEY = "key-openai", "key-openai-rate"
PROMPT = "a handwritten digit seven"


@pytest.fixture(scope="module")
def client(keyed_server):
    return openai.OpenAI(base_url=f"{keyed_server.url}/v1", api_key=KEY, max_retries=0, timeout=60)


def pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))


def png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def cancelled(url: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    match = re.search(r'genserve_engine_requests_finished_total\{model="sd_digits",reason="cancelled"\} (\S+)', text)
    return float(match[1]) if match else 0.0


def test_generate_with_the_sdk_sizes_seeds_and_extensions(client):
    r = client.images.generate(model="sd_digits", prompt=PROMPT, n=2, size="48x32", quality="low",
                               extra_body={"seed": 11, "guidance_scale": 5.0, "scheduler": "euler"})
    assert len(r.data) == 2 and r.size == "48x32" and r.output_format == "png" and r.created > 0
    assert pixels(r.data[0].b64_json).shape == (32, 48)  # WxH: 48 wide, 32 high
    params = r.genserve["parameters"]
    assert params["num_inference_steps"] == 10 and params["seed"] == 11 and params["scheduler"] == "euler"
    assert [d.seed for d in r.data] == [11, 12]
    # image 1 of that request is the image of seed 12 alone (as everywhere in genserve)
    again = client.images.generate(prompt=PROMPT, size="48x32", quality="low",
                                   extra_body={"seed": 12, "guidance_scale": 5.0, "scheduler": "euler"})
    assert np.array_equal(pixels(again.data[0].b64_json), pixels(r.data[1].b64_json))
    # quality maps to steps; num_inference_steps (extra_body) wins over it
    high = client.images.generate(prompt=PROMPT, quality="high", extra_body={"seed": 1})
    assert high.genserve["parameters"]["num_inference_steps"] == 40 and high.size == "32x32"
    assert client.images.generate(prompt=PROMPT, quality="high", extra_body={"num_inference_steps": 3}
                                  ).genserve["parameters"]["num_inference_steps"] == 3
    cached = client.images.generate(prompt=PROMPT, quality="low", extra_body={"seed": 1, "cache_interval": 2})
    assert cached.genserve["parameters"]["cache_interval"] == 2
    jpeg = client.images.generate(prompt=PROMPT, quality="low", output_format="jpeg", output_compression=30)
    assert base64.b64decode(jpeg.data[0].b64_json)[:3] == b"\xff\xd8\xff" and jpeg.output_format == "jpeg"


def test_async_client_runs_requests_concurrently(keyed_server):
    async def go():
        async with openai.AsyncOpenAI(base_url=f"{keyed_server.url}/v1", api_key=KEY, max_retries=0) as c:
            return await asyncio.gather(*[c.images.generate(prompt=PROMPT, quality="low", extra_body={"seed": s})
                                          for s in (1, 2, 3)])
    results = asyncio.run(go())
    assert [r.genserve["parameters"]["seed"] for r in results] == [1, 2, 3]
    assert all(pixels(r.data[0].b64_json).shape == (32, 32) for r in results)


def test_streaming_partial_images_then_completed(client):
    events = list(client.images.generate(prompt=PROMPT, stream=True, partial_images=2, quality="low",
                                         extra_body={"seed": 5}))
    kinds = [e.type for e in events]
    assert kinds == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    assert [e.partial_image_index for e in events[:2]] == [0, 1]
    final = events[-1]
    assert final.size == "32x32" and final.output_format == "png"
    plain = client.images.generate(prompt=PROMPT, quality="low", extra_body={"seed": 5})
    assert np.array_equal(pixels(final.b64_json), pixels(plain.data[0].b64_json))  # same seed, same image
    # no partial images asked: the completed event alone
    assert [e.type for e in client.images.generate(prompt=PROMPT, stream=True, quality="low")] == [
        "image_generation.completed"]


def test_closing_a_stream_cancels_the_request_on_the_server(client, keyed_server):
    before = cancelled(keyed_server.url)
    stream = client.images.generate(prompt=PROMPT, stream=True, partial_images=3, n=4,  # seconds of work left
                                    extra_body={"num_inference_steps": 150, "seed": 1})
    first = next(iter(stream))
    assert first.type == "image_generation.partial_image"
    stream.close()
    deadline = time.monotonic() + 10
    while cancelled(keyed_server.url) <= before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert cancelled(keyed_server.url) == before + 1


def test_edits_inpaint_with_an_openai_mask_and_img2img_without(client):
    image = Image.new("L", (32, 32), 0)
    mask = Image.new("RGBA", (32, 32), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (16, 0, 32, 32))  # right half transparent: edit it
    r = client.images.edit(image=("digit.png", png(image), "image/png"), mask=("mask.png", png(mask), "image/png"),
                           prompt=PROMPT, quality="low", extra_body={"seed": 3})
    assert r.genserve["task"] == "inpaint" and r.size == "32x32"
    out = pixels(r.data[0].b64_json).astype(int)
    assert np.abs(out[:, :12]).mean() < np.abs(out[:, 20:]).mean()  # the kept half stays black, the edit does not
    r = client.images.edit(image=("digit.png", png(image), "image/png"), prompt=PROMPT, n=2, quality="low")
    assert r.genserve["task"] == "img2img" and r.genserve["parameters"]["strength"] == 0.8 and len(r.data) == 2
    events = list(client.images.edit(image=("digit.png", png(image), "image/png"), prompt=PROMPT, quality="low",
                                     stream=True, partial_images=1))
    assert [e.type for e in events] == ["image_edit.partial_image", "image_edit.completed"]


def test_openai_masks_become_genserve_masks():
    mask = Image.new("RGBA", (4, 2), (255, 255, 255, 255))
    mask.putpixel((1, 0), (0, 0, 0, 0))  # transparent = edit
    converted = pixels(openai_mask_to_genserve(base64.b64encode(png(mask)).decode()))
    assert converted.tolist() == [[0, 255, 0, 0], [0, 0, 0, 0]]  # white = repaint


def bad(call) -> openai.APIStatusError:
    with pytest.raises(openai.APIStatusError) as info:
        call()
    error = info.value.body
    assert set(error) >= {"message", "type", "param", "code"} and error["message"]
    return info.value


def test_errors_are_openai_shaped_and_typed(client, keyed_server):
    e = bad(lambda: client.images.generate(prompt=PROMPT, size="33x32"))
    assert isinstance(e, openai.BadRequestError) and e.body["param"] == "size" and e.body["limit"] == 64
    e = bad(lambda: client.images.generate(prompt=PROMPT, size="big"))
    assert isinstance(e, openai.BadRequestError) and e.body["param"] == "size"
    e = bad(lambda: client.images.generate(prompt=PROMPT, n=9))
    assert isinstance(e, openai.BadRequestError) and e.body["param"] == "n" and e.body["limit"] == 8
    e = bad(lambda: client.images.generate(prompt=PROMPT, extra_body={"cache_interval": 11}))
    assert isinstance(e, openai.BadRequestError) and e.body["param"] == "cache_interval" and e.body["limit"] == 10
    e = bad(lambda: client.images.generate(prompt=PROMPT, response_format="url"))
    assert isinstance(e, openai.BadRequestError) and e.body["param"] == "response_format"
    e = bad(lambda: client.images.generate(prompt=PROMPT, style="vivid"))  # OpenAI-only field
    assert isinstance(e, openai.BadRequestError) and e.body["param"] == "style"
    e = bad(lambda: client.images.generate(prompt=PROMPT, model="dall-e-3"))
    assert isinstance(e, openai.NotFoundError) and e.body["code"] == "model_not_found"
    e = bad(lambda: client.images.edit(image=("x.png", b"not an image", "image/png"), prompt=PROMPT))
    assert isinstance(e, openai.BadRequestError) and e.body["param"] == "image"
    opaque = png(Image.new("L", (32, 32), 0))
    e = bad(lambda: client.images.edit(image=("x.png", opaque, "image/png"), mask=("m.png", opaque, "image/png"),
                                       prompt=PROMPT))
    assert isinstance(e, openai.BadRequestError) and e.body["param"] == "mask" and "alpha" in e.body["message"]
    nokey = openai.OpenAI(base_url=f"{keyed_server.url}/v1", api_key="wrong", max_retries=0)
    e = bad(lambda: nokey.images.generate(prompt=PROMPT))
    assert isinstance(e, openai.AuthenticationError) and e.status_code == 401
    # the gateway's refusals on these paths are OpenAI-shaped too; elsewhere genserve's shape stays
    r = httpx.post(f"{keyed_server.url}/v1/images/generations", content=b" " * (21 * 1024 * 1024), timeout=30,
                   headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["type"] == "invalid_request_error"
    assert r.json()["error"]["limit"] == 20 * 1024 * 1024
    r = httpx.post(f"{keyed_server.url}/v1/txt2img", json={"prompt": PROMPT, "num_images": 99},
                   headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 422 and r.json()["error"]["field"] == "num_images" and "type" not in r.json()["error"]


def test_rate_limits_are_the_sdks_rate_limit_error(keyed_server):
    c = openai.OpenAI(base_url=f"{keyed_server.url}/v1", api_key=RATE_KEY, max_retries=0)
    limit = int(KEYED_RATE_LIMIT.split("/")[0])
    for _ in range(limit):  # cheap refusals still count against the key's request rate
        with pytest.raises(openai.BadRequestError):
            c.images.generate(prompt=PROMPT, size="bad")
    e = bad(lambda: c.images.generate(prompt=PROMPT))
    assert isinstance(e, openai.RateLimitError) and e.body["type"] == "rate_limit_error"
    assert int(e.response.headers["retry-after"]) >= 1


def test_what_other_openai_clients_send_is_understood(keyed_server):
    """The SDK's array form for edit images (`image[]`), fields it documents that have no effect
    here (accepted, as `user` is), and responses whose `quality` is within OpenAI's values.
    Its own key: the other tests spend most of theirs."""
    sdk = openai.OpenAI(base_url=f"{keyed_server.url}/v1", api_key="key-openai-compat", max_retries=0, timeout=60)
    image = ("digit.png", png(Image.new("L", (32, 32), 0)), "image/png")
    r = sdk.images.edit(image=[image], prompt=PROMPT, quality="low", input_fidelity="high")
    assert r.genserve["task"] == "img2img" and r.size == "32x32"
    e = bad(lambda: sdk.images.edit(image=[image, image], prompt=PROMPT))
    assert isinstance(e, openai.BadRequestError)
    assert e.body["param"] == "image" and "more than once" in e.body["message"]
    r = sdk.images.generate(prompt=PROMPT, quality="standard", moderation="low", safety_identifier="u-1",
                            extra_body={"num_inference_steps": 2})
    assert r.quality == "medium" and len(r.data) == 1
    assert sdk.images.generate(prompt=PROMPT, quality="xhigh", extra_body={"num_inference_steps": 2}).quality == "xhigh"
    # tools discover models with the SDK's models.list()
    assert "sd_digits" in {m.id for m in sdk.models.list()}


def test_model_failures_and_deadlines_tell_the_sdk_not_to_retry():
    """The SDK retries every 5xx unless told: a request past its deadline would run three times."""
    import json

    async def app(status):
        async def inner(scope, receive, send):
            body = json.dumps({"error": {"code": "x", "message": "m"}}).encode()
            await send({"type": "http.response.start", "status": status,
                        "headers": [(b"content-type", b"application/json")]})
            await send({"type": "http.response.body", "body": body})
        return inner

    async def headers_for(status):
        sent = []

        async def send(message):
            sent.append(message)

        await OpenAIErrorShape(await app(status))({"type": "http", "path": "/v1/images/generations"}, None, send)
        return dict(sent[0]["headers"])

    assert asyncio.run(headers_for(504))[b"x-should-retry"] == b"false"
    assert asyncio.run(headers_for(500))[b"x-should-retry"] == b"false"
    assert b"x-should-retry" not in asyncio.run(headers_for(503))  # an outage: retry after Retry-After
