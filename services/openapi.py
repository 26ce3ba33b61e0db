"""The OpenAPI document tells the truth: every status an operation can answer, the one
error shape, and the limits of the models actually served (sizes, class labels,
prompt tokens), so generated clients and fuzzers send what the server accepts."""

from __future__ import annotations

import math
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from services.schemas import ErrorResponse

ERROR_DESCRIPTIONS = {
    400: "Two different API keys in one request (send one).",
    401: "No valid API key (only when the server has keys: GENSERVE_API_KEYS_FILE).",
    403: "A valid API key that is not an admin key (GENSERVE_ADMIN_KEYS_FILE) on an operators' endpoint.",
    404: "Unknown model (`allowed` lists the served ones) or path.",
    405: "Method not allowed on this path (`Allow` header).",
    408: "The request body (GENSERVE_BODY_READ_TIMEOUT_S) or its headers (GENSERVE_HEADER_TIMEOUT_S) did not "
         "arrive in time.",
    413: "The request body is larger than GENSERVE_MAX_BODY_BYTES.",
    415: "Content-Type not accepted by this endpoint (`allowed`).",
    422: "A field is invalid: `field`, `limit` and `details` say which and why.",
    429: "Rate limit of the key, failed authentications of the address, or the engine's queue, is full: retry "
         "after `Retry-After` seconds.",
    500: "A server fault; the request id is in the server log.",
    503: "The inference backend (named) is unavailable, or the server is shutting down: retry.",
    504: "The request did not finish within its deadline (`timeout_s`).",
}
RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait before retrying.", "schema": {"type": "integer"}}}
GET_ERRORS = (400, 401, 405, 429, 500, 503)
POST_ERRORS = (400, 401, 404, 405, 408, 413, 415, 422, 429, 500, 503, 504)
ADMIN_ERRORS = (400, 401, 403, 404, 405, 408, 413, 415, 422, 429, 500, 503)
# An operation only operators' keys may call (services.gateway: GENSERVE_ADMIN_KEYS_FILE).
ADMIN = {"x-genserve-admin": True}


# Server-sent events, described per event (OpenAPI 3.1 tools read the schema that way):
# `event` names it, `data` is its JSON.
SSE_RESPONSE: dict[int | str, dict[str, Any]] = {200: {
    "description": "Server-sent events: `progress` per step, `preview` every k steps, then `result` "
                   "(the non-streaming response) or `error` (the error shape with its `status`).",
    "content": {"text/event-stream": {"schema": {
        "type": "object", "required": ["data"],
        "properties": {"event": {"type": "string", "enum": ["progress", "preview", "result", "error"]},
                       "data": {"type": "string", "description": "The event's JSON."}}}}}}}


def error_responses(statuses=POST_ERRORS) -> dict[int | str, dict[str, Any]]:
    out: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        out[status] = {"model": ErrorResponse, "description": ERROR_DESCRIPTIONS[status]}
        if status in (429, 503):
            out[status]["headers"] = RETRY_AFTER
    return out


def body_schema(model) -> dict:
    """`openapi_extra` for endpoints that take JSON (images as base64) or multipart (images
    as files), parsed by the handler itself."""
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    form = {**schema, "properties": {
        k: ({"type": "string", "format": "binary", "description": v.get("description", "")}
            if k in ("image", "mask") else v) for k, v in schema["properties"].items()}}
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": schema}, "multipart/form-data": {"schema": form}}}}


def _request_schemas(doc: dict):
    """Every request-body schema object: components named *Request, and inline bodies."""
    for name, schema in doc.get("components", {}).get("schemas", {}).items():
        if name.endswith("Request"):
            yield schema
    for item in doc.get("paths", {}).values():
        for op in item.values():
            for content in op.get("requestBody", {}).get("content", {}).values():
                if "properties" in content.get("schema", {}):
                    yield content["schema"]


def document_limits(doc: dict, *, sides: list[dict], num_classes: list[int], prompt_tokens: list[int]) -> dict:
    """Writes the served models' limits into the request schemas (the loosest over models,
    so the document never refuses what some model accepts)."""
    for schema in _request_schemas(doc):
        props = schema.get("properties", {})
        if sides:
            for key in ("height", "width"):
                if key in props:
                    target = next((v for v in props[key].get("anyOf", []) if v.get("type") == "integer"), props[key])
                    target["multipleOf"] = math.gcd(*(s["multiple_of"] for s in sides))
                    target["minimum"] = min(s["min"] for s in sides)
                    target["maximum"] = max(s["max"] for s in sides)
        if num_classes and "class_label" in props:
            label = props["class_label"]
            target = next((v for v in label.get("anyOf", []) if v.get("type") == "integer"), label)
            target["maximum"] = max(num_classes) - 1
        if prompt_tokens:
            for key in ("prompt", "negative_prompt"):
                if key in props:
                    props[key]["description"] = (
                        props[key].get("description", "") + f" At most {max(prompt_tokens)} tokens of the model's "
                        "tokenizer (longer is refused, never truncated).")
    return doc


def _png_base64(pixels) -> str:
    """uint8 pixels -> base64 PNG, for example bodies."""
    import base64
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def image_examples(doc: dict, spec) -> dict:
    """Working JSON examples for the image endpoints: a grey image and a half mask of the
    model's native size, so clients (and fuzzers) see a request that succeeds."""
    import numpy as np

    png = _png_base64
    h, w = spec.native_height, spec.native_width
    image = png(np.full((h, w) if spec.image_channels == 1 else (h, w, 3), 128, np.uint8))
    mask = np.zeros((h, w), np.uint8)
    mask[:, w // 2:] = 255
    bodies = {"/img2img": {"prompt": "a handwritten digit seven", "image": image, "strength": 0.8,
                           "num_inference_steps": 10, "seed": 1},
              "/inpaint": {"prompt": "a handwritten digit seven", "image": image, "mask": png(mask),
                           "num_inference_steps": 10, "seed": 1},
              "/images/edits": {"prompt": "a handwritten digit seven", "image": image, "quality": "low", "seed": 1}}
    for path, body in bodies.items():
        content = doc.get("paths", {}).get(path, {}).get("post", {}).get("requestBody", {}).get("content", {})
        if "application/json" in content:
            content["application/json"]["example"] = body
    return doc


def vae_examples(doc: dict, info) -> dict:
    """Working JSON examples for the VAE endpoints, from the default VAE's shapes."""
    import base64

    import numpy as np

    side = info.native_size
    image = _png_base64(np.full((side, side) if info.image_channels == 1 else (side, side, 3), 128, np.uint8))
    latent = np.zeros((1, *info.native_latent), "<f4")
    bodies: dict[str, dict[str, Any]] = {
        "/vae/encode": {"image": image},
        "/vae/decode": {"latent": {"shape": list(latent.shape), "datatype": "FP32",
                                   "data": base64.b64encode(latent.tobytes()).decode("ascii")}},
        "/vae/interpolate": ({"seed_a": 1, "seed_b": 2, "frames": 4} if info.standalone
                             else {"image_a": image, "image_b": image, "frames": 4}),
    }
    for path, body in bodies.items():
        content = doc.get("paths", {}).get(path, {}).get("post", {}).get("requestBody", {}).get("content", {})
        if "application/json" in content:
            content["application/json"]["example"] = {"model": info.name, **body}
    return doc


def stylegan_examples(doc: dict, info) -> dict:
    """Working JSON examples for the W-space endpoints of one StyleGAN model."""
    import base64

    import numpy as np

    w = np.zeros((1, info.w_dim), "<f4")
    labels = {"class_label": 0} if info.c_dim else {}
    bodies: dict[str, dict[str, Any]] = {
        "/gan/mix": {"seed": 1, "style_seed": 2, **labels},
        "/gan/interpolate": {"seeds": [1, 2], "frames": 4},
        "/gan/latents": {"seeds": [1, 2]},
        "/gan/synthesize": {"w": {"shape": [1, info.w_dim], "datatype": "FP32",
                                  "data": base64.b64encode(w.tobytes()).decode("ascii")}},
    }
    if info.directions:
        bodies["/gan/edit"] = {"seed": 1, "direction": sorted(info.directions)[0], "strength": 1.0, **labels}
    for path, body in bodies.items():
        content = doc.get("paths", {}).get(path, {}).get("post", {}).get("requestBody", {}).get("content", {})
        if "application/json" in content:
            content["application/json"]["example"] = {"model": info.name, **body}
    return doc


def install(app: FastAPI, image_example=None, vae_example=None, stylegan_example=None, image_models=None,
            **limits) -> None:
    """Replaces the app's OpenAPI generator with one that documents `limits` (and, given
    the default diffusion model and VAE, examples for the image and VAE endpoints; given
    `image_models` {path: model}, the model the image-to-image examples name, since a server
    with several has no default)."""

    def openapi() -> dict:
        if app.openapi_schema is None:
            doc = get_openapi(title=app.title, version=app.version, description=app.description,
                              routes=app.routes, servers=app.servers)
            doc = document_limits(doc, **limits)
            if image_example is not None:
                doc = image_examples(doc, image_example)
            if vae_example is not None:
                doc = vae_examples(doc, vae_example)
            if stylegan_example is not None:
                doc = stylegan_examples(doc, stylegan_example)
            for path, name in (image_models or {}).items():
                paths = doc.get("paths", {})
                operation = paths.get(path) or paths.get(path.removeprefix("/v1"), {})  # served under /v1
                content = operation.get("post", {}).get("requestBody", {}).get("content", {})
                if "example" in content.get("application/json", {}):
                    content["application/json"]["example"]["model"] = name
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi_schema = None
    app.openapi = openapi  # type: ignore[method-assign]  # FastAPI's documented way to replace the generator
