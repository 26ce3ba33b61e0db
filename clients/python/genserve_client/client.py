"""`Client` (sync) and `AsyncClient` (asyncio), both on httpx, with one method per endpoint.

Both share the endpoint methods (`_Endpoints`): each builds its JSON body and names the
parser of the answer; the client classes differ only in how they send. So on
`AsyncClient` every method returns an awaitable of the same type, and the `*_stream`
methods an async iterator of the same events.

Retries: 429 and 503 (and connection errors) are retried up to `max_retries` times,
waiting what the server's Retry-After says (at most `max_retry_wait` seconds; without the
header, 0.5 s doubling). Other errors raise at once, typed (genserve_client.errors).
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from pathlib import Path
from typing import Any, Callable, Optional, Union

import httpx

from genserve_client.errors import APIConnectionError, StreamError, error_for
from genserve_client.types import Event, GenerationResult, LatentResult, ModelInfo, Models, Tensor, event_from_sse

ImageInput = Union[bytes, str, Path, Any]  # encoded bytes, a file path, or a PIL image
RETRY_STATUSES = (429, 503)
# Transport errors after which a request certainly never reached the server: the only ones a
# POST is sent again after (a read timeout or a dropped connection may follow work the server
# did, and generation is not idempotent).
NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)


def _retry_after_error(method: str, exc: httpx.TransportError) -> bool:
    return method == "GET" or isinstance(exc, NOT_SENT)
DEFAULT_TIMEOUT_S = 300.0


def encode_image(image: ImageInput) -> str:
    """bytes / path / PIL image -> base64 (PIL images as PNG)."""
    if isinstance(image, (bytes, bytearray)):
        raw = bytes(image)
    elif isinstance(image, (str, Path)):
        raw = Path(image).read_bytes()
    elif hasattr(image, "save"):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        raw = buffer.getvalue()
    else:
        raise TypeError(f"an image is bytes, a path or a PIL image, not {type(image).__name__}")
    return base64.b64encode(raw).decode("ascii")


def _adapters(lora: Optional[Mapping[str, float]]) -> Optional[list]:
    """{adapter name: scale, ...} -> the request's `lora` list, in the mapping's order."""
    if lora is None:
        return None
    return [{"name": name, "scale": float(scale)} for name, scale in lora.items()]


def _body(**fields) -> dict:
    """The JSON body: fields left at None are omitted (the server's defaults apply)."""
    extra = fields.pop("extra", None) or {}
    if "lora" in fields:
        fields["lora"] = _adapters(fields["lora"])
    return {**{k: v for k, v in fields.items() if v is not None}, **extra}


def _models(body: dict) -> Models:
    return Models(default_models=body.get("default_models", {}),
                  models=[ModelInfo.from_json(m) for m in body.get("models", [])])


def _check(response: httpx.Response) -> None:
    if response.status_code >= 400:
        try:
            body = response.json()
        except ValueError:
            body = {"error": {"code": "http_error", "message": response.text[:500]}}
        raise error_for(response.status_code, body, dict(response.headers))


def _parse_sse(lines) -> Iterator[tuple[str, Any]]:
    """Server-sent events from decoded lines: (event name, JSON data)."""
    name, data = "message", []
    for line in lines:
        if line == "":
            if data:
                yield name, json.loads("\n".join(data))
            name, data = "message", []
        elif line.startswith("event:"):
            name = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].lstrip())


def _event(name: str, data: Any) -> Optional[Event]:
    if name == "error":
        raise StreamError(data.get("status", 500), data)
    return event_from_sse(name, data)


class _Endpoints:
    """One method per endpoint. `_call(path, body, parse)` and `_stream(path, body)` are the client's."""

    def _call(self, method: str, path: str, body: Optional[dict], parse: Callable[[dict], Any]):
        raise NotImplementedError

    def _stream(self, path: str, body: dict):
        raise NotImplementedError

    # -- models ---------------------------------------------------------------------------
    def models(self) -> Models:
        """GET /v1/models: every served model, its pipeline and its request limits."""
        return self._call("GET", "/v1/models", None, _models)

    # -- text-conditioned diffusion --------------------------------------------------------
    def txt2img(self, prompt: str, *, model: Optional[str] = None, negative_prompt: Optional[str] = None,
                num_images: Optional[int] = None, num_inference_steps: Optional[int] = None,
                guidance_scale: Optional[float] = None, scheduler: Optional[str] = None,
                height: Optional[int] = None, width: Optional[int] = None, seed: Optional[int] = None,
                output_format: Optional[str] = None, timeout_s: Optional[float] = None,
                cache_interval: Optional[int] = None, lora: Optional[Mapping[str, float]] = None,
                extra: Optional[dict] = None) -> GenerationResult:
        """POST /v1/txt2img. `cache_interval` > 1: DeepCache (faster, approximate; see GET /v1/models).
        `lora`: {adapter name: scale}, the model's LoRA adapters to apply (GET /v1/models lists them)."""
        return self._call("POST", "/v1/txt2img", _body(
            prompt=prompt, model=model, negative_prompt=negative_prompt, num_images=num_images,
            num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, scheduler=scheduler,
            height=height, width=width, seed=seed, output_format=output_format, timeout_s=timeout_s,
            cache_interval=cache_interval, lora=lora, extra=extra),
            GenerationResult.from_json)

    def txt2img_stream(self, prompt: str, *, preview_every: Optional[int] = None, model: Optional[str] = None,
                       negative_prompt: Optional[str] = None, num_images: Optional[int] = None,
                       num_inference_steps: Optional[int] = None, guidance_scale: Optional[float] = None,
                       scheduler: Optional[str] = None, height: Optional[int] = None, width: Optional[int] = None,
                       seed: Optional[int] = None, output_format: Optional[str] = None,
                       timeout_s: Optional[float] = None, cache_interval: Optional[int] = None,
                       lora: Optional[Mapping[str, float]] = None,
                       extra: Optional[dict] = None) -> Iterator[Event]:
        """POST /v1/txt2img/stream: Progress per step, Preview every `preview_every` steps, then
        Result. Leaving the loop early (break, or closing the iterator) cancels the request."""
        return self._stream("/v1/txt2img/stream", _body(
            prompt=prompt, preview_every=preview_every, model=model, negative_prompt=negative_prompt,
            num_images=num_images, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
            scheduler=scheduler, height=height, width=width, seed=seed, output_format=output_format,
            timeout_s=timeout_s, cache_interval=cache_interval, lora=lora, extra=extra))

    def img2img(self, image: ImageInput, prompt: str, *, strength: Optional[float] = None,
                model: Optional[str] = None, negative_prompt: Optional[str] = None, num_images: Optional[int] = None,
                num_inference_steps: Optional[int] = None, guidance_scale: Optional[float] = None,
                scheduler: Optional[str] = None, seed: Optional[int] = None, output_format: Optional[str] = None,
                timeout_s: Optional[float] = None, cache_interval: Optional[int] = None,
                lora: Optional[Mapping[str, float]] = None,
                extra: Optional[dict] = None) -> GenerationResult:
        """POST /v1/img2img: `image` noised to `strength`, then denoised toward the prompt."""
        return self._call("POST", "/v1/img2img", _body(
            image=encode_image(image), prompt=prompt, strength=strength, model=model, negative_prompt=negative_prompt,
            num_images=num_images, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
            scheduler=scheduler, seed=seed, output_format=output_format, timeout_s=timeout_s,
            cache_interval=cache_interval, lora=lora, extra=extra),
            GenerationResult.from_json)

    def inpaint(self, image: ImageInput, mask: ImageInput, prompt: str, *, strength: Optional[float] = None,
                model: Optional[str] = None, negative_prompt: Optional[str] = None, num_images: Optional[int] = None,
                num_inference_steps: Optional[int] = None, guidance_scale: Optional[float] = None,
                scheduler: Optional[str] = None, seed: Optional[int] = None, output_format: Optional[str] = None,
                timeout_s: Optional[float] = None, cache_interval: Optional[int] = None,
                lora: Optional[Mapping[str, float]] = None,
                extra: Optional[dict] = None) -> GenerationResult:
        """POST /v1/inpaint: repaints the white area of `mask` (same size as `image`)."""
        return self._call("POST", "/v1/inpaint", _body(
            image=encode_image(image), mask=encode_image(mask), prompt=prompt, strength=strength, model=model,
            negative_prompt=negative_prompt, num_images=num_images, num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale, scheduler=scheduler, seed=seed, output_format=output_format,
            timeout_s=timeout_s, cache_interval=cache_interval, lora=lora, extra=extra), GenerationResult.from_json)

    # -- pixel-space diffusion --------------------------------------------------------------
    def ddpm_generate(self, *, model: Optional[str] = None, seed: Optional[int] = None,
                      num_images: Optional[int] = None, class_label: Optional[int] = None,
                      num_inference_steps: Optional[int] = None, scheduler: Optional[str] = None,
                      output_format: Optional[str] = None, timeout_s: Optional[float] = None) -> GenerationResult:
        """POST /v1/ddpm/generate."""
        return self._call("POST", "/v1/ddpm/generate", _body(
            model=model, seed=seed, num_images=num_images, class_label=class_label,
            num_inference_steps=num_inference_steps, scheduler=scheduler, output_format=output_format,
            timeout_s=timeout_s), GenerationResult.from_json)

    def ddpm_generate_stream(self, *, preview_every: Optional[int] = None, model: Optional[str] = None,
                             seed: Optional[int] = None, num_images: Optional[int] = None,
                             class_label: Optional[int] = None, num_inference_steps: Optional[int] = None,
                             scheduler: Optional[str] = None, output_format: Optional[str] = None,
                             timeout_s: Optional[float] = None) -> Iterator[Event]:
        """POST /v1/ddpm/generate/stream: Progress, Preview, then Result."""
        return self._stream("/v1/ddpm/generate/stream", _body(
            preview_every=preview_every, model=model, seed=seed, num_images=num_images, class_label=class_label,
            num_inference_steps=num_inference_steps, scheduler=scheduler, output_format=output_format,
            timeout_s=timeout_s))

    # -- GANs ---------------------------------------------------------------------------------
    def gan_generate(self, *, model: Optional[str] = None, seed: Optional[int] = None,
                     num_images: Optional[int] = None, class_label: Optional[int] = None,
                     truncation_psi: Optional[float] = None, output_format: Optional[str] = None) -> GenerationResult:
        """POST /v1/gan/generate."""
        return self._call("POST", "/v1/gan/generate", _body(
            model=model, seed=seed, num_images=num_images, class_label=class_label, truncation_psi=truncation_psi,
            output_format=output_format), GenerationResult.from_json)

    def gan_mix(self, seed: int, style_seed: int, *, model: Optional[str] = None, class_label: Optional[int] = None,
                style_class_label: Optional[int] = None, crossover: Optional[int] = None,
                truncation_psi: Optional[float] = None, include_sources: Optional[bool] = None,
                output_format: Optional[str] = None) -> GenerationResult:
        """POST /v1/gan/mix (StyleGAN): coarse styles from `seed`, fine ones from `style_seed`."""
        return self._call("POST", "/v1/gan/mix", _body(
            seed=seed, style_seed=style_seed, model=model, class_label=class_label,
            style_class_label=style_class_label, crossover=crossover, truncation_psi=truncation_psi,
            include_sources=include_sources, output_format=output_format), GenerationResult.from_json)

    def gan_interpolate(self, seeds: list, *, model: Optional[str] = None, class_labels: Optional[list] = None,
                        frames: Optional[int] = None, space: Optional[str] = None,
                        truncation_psi: Optional[float] = None, output_format: Optional[str] = None
                        ) -> GenerationResult:
        """POST /v1/gan/interpolate (StyleGAN): frames between seeds in Z or W."""
        return self._call("POST", "/v1/gan/interpolate", _body(
            seeds=list(seeds), model=model, class_labels=class_labels, frames=frames, space=space,
            truncation_psi=truncation_psi, output_format=output_format), GenerationResult.from_json)

    def gan_latents(self, seeds: list, *, model: Optional[str] = None, class_labels: Optional[list] = None,
                    truncation_psi: Optional[float] = None) -> LatentResult:
        """POST /v1/gan/latents (StyleGAN): the seeds' w vectors."""
        return self._call("POST", "/v1/gan/latents", _body(
            seeds=list(seeds), model=model, class_labels=class_labels, truncation_psi=truncation_psi),
            LatentResult.from_json)

    def gan_synthesize(self, w: Tensor, *, model: Optional[str] = None,
                       output_format: Optional[str] = None) -> GenerationResult:
        """POST /v1/gan/synthesize (StyleGAN): images from w (e.g. gan_latents' tensor, edited)."""
        return self._call("POST", "/v1/gan/synthesize", _body(w=w.to_json(), model=model, output_format=output_format),
                          GenerationResult.from_json)

    def gan_edit(self, seed: int, direction: str, *, strength: Optional[float] = None, model: Optional[str] = None,
                 class_label: Optional[int] = None, truncation_psi: Optional[float] = None,
                 output_format: Optional[str] = None) -> GenerationResult:
        """POST /v1/gan/edit (StyleGAN): w + strength * a stored direction."""
        return self._call("POST", "/v1/gan/edit", _body(
            seed=seed, direction=direction, strength=strength, model=model, class_label=class_label,
            truncation_psi=truncation_psi, output_format=output_format), GenerationResult.from_json)

    # -- VAEs ---------------------------------------------------------------------------------
    def vae_encode(self, image: ImageInput, *, model: Optional[str] = None, sample: Optional[bool] = None,
                   seed: Optional[int] = None) -> LatentResult:
        """POST /v1/vae/encode: an image's latent (posterior mean, or a sample)."""
        return self._call("POST", "/v1/vae/encode", _body(image=encode_image(image), model=model, sample=sample,
                                                          seed=seed), LatentResult.from_json)

    def vae_decode(self, latent: Tensor, *, model: Optional[str] = None,
                   output_format: Optional[str] = None) -> GenerationResult:
        """POST /v1/vae/decode."""
        return self._call("POST", "/v1/vae/decode", _body(latent=latent.to_json(), model=model,
                                                          output_format=output_format), GenerationResult.from_json)

    def vae_sample(self, *, model: Optional[str] = None, seed: Optional[int] = None, num_images: Optional[int] = None,
                   output_format: Optional[str] = None) -> GenerationResult:
        """POST /v1/vae/sample (standalone VAEs): decoded N(0, I) draws."""
        return self._call("POST", "/v1/vae/sample", _body(model=model, seed=seed, num_images=num_images,
                                                          output_format=output_format), GenerationResult.from_json)

    def vae_interpolate(self, *, model: Optional[str] = None, image_a: Optional[ImageInput] = None,
                        image_b: Optional[ImageInput] = None, seed_a: Optional[int] = None,
                        seed_b: Optional[int] = None, frames: Optional[int] = None,
                        output_format: Optional[str] = None) -> GenerationResult:
        """POST /v1/vae/interpolate: between two images, or two seeds (standalone VAEs)."""
        return self._call("POST", "/v1/vae/interpolate", _body(
            model=model, image_a=None if image_a is None else encode_image(image_a),
            image_b=None if image_b is None else encode_image(image_b), seed_a=seed_a, seed_b=seed_b,
            frames=frames, output_format=output_format), GenerationResult.from_json)


class _Settings:
    def __init__(self, base_url: str, api_key: Optional[str], timeout: float, max_retries: int,
                 max_retry_wait: float, headers: Optional[dict]):
        self.base_url = base_url.rstrip("/")
        self.max_retries = max_retries
        self.max_retry_wait = max_retry_wait
        self.headers = {**({"Authorization": f"Bearer {api_key}"} if api_key else {}), **(headers or {})}
        self.timeout = timeout

    def wait_s(self, attempt: int, response: Optional[httpx.Response]) -> float:
        """What the server asked (Retry-After), else 0.5 s doubling; capped."""
        asked = response.headers.get("retry-after") if response is not None else None
        try:
            wait = float(asked) if asked is not None else 0.5 * 2 ** attempt
        except ValueError:
            wait = 0.5 * 2 ** attempt
        return min(max(wait, 0.0), self.max_retry_wait)


class Client(_Endpoints):
    """Synchronous client. `with Client(url, api_key=...) as c: c.txt2img("...")`."""

    def __init__(self, base_url: str = "http://127.0.0.1:3000", *, api_key: Optional[str] = None,
                 timeout: float = DEFAULT_TIMEOUT_S, max_retries: int = 2, max_retry_wait: float = 30.0,
                 headers: Optional[dict] = None, transport: Optional[httpx.BaseTransport] = None):
        self._s = _Settings(base_url, api_key, timeout, max_retries, max_retry_wait, headers)
        self._http = httpx.Client(base_url=self._s.base_url, headers=self._s.headers, timeout=timeout,
                                  transport=transport)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _send(self, method: str, path: str, body: Optional[dict], stream: bool = False) -> httpx.Response:
        attempt = 0
        while True:
            response = None
            try:
                request = self._http.build_request(method, path, json=body)
                response = self._http.send(request, stream=stream)
                if response.status_code not in RETRY_STATUSES or attempt >= self._s.max_retries:
                    if stream and response.status_code >= 400:
                        response.read()
                    return response
                response.close()
            except httpx.TransportError as exc:
                if attempt >= self._s.max_retries or not _retry_after_error(method, exc):
                    raise APIConnectionError(f"{method} {path}: {exc}") from exc
            time.sleep(self._s.wait_s(attempt, response))
            attempt += 1

    def _call(self, method, path, body, parse):
        response = self._send(method, path, body)
        _check(response)
        return parse(response.json())

    def _stream(self, path, body) -> Iterator[Event]:
        response = self._send("POST", path, body, stream=True)
        _check(response)

        def events() -> Iterator[Event]:
            try:
                for name, data in _parse_sse(response.iter_lines()):
                    event = _event(name, data)
                    if event is not None:
                        yield event
            except httpx.TransportError as exc:
                raise APIConnectionError(f"POST {path}: the stream broke: {exc}") from exc
            finally:
                response.close()  # closing early is the server's signal to cancel

        return events()


class AsyncClient(_Endpoints):
    """asyncio client: the same methods, awaited (`*_stream`: `async for`)."""

    def __init__(self, base_url: str = "http://127.0.0.1:3000", *, api_key: Optional[str] = None,
                 timeout: float = DEFAULT_TIMEOUT_S, max_retries: int = 2, max_retry_wait: float = 30.0,
                 headers: Optional[dict] = None, transport: Optional[httpx.AsyncBaseTransport] = None):
        self._s = _Settings(base_url, api_key, timeout, max_retries, max_retry_wait, headers)
        self._http = httpx.AsyncClient(base_url=self._s.base_url, headers=self._s.headers, timeout=timeout,
                                       transport=transport)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    async def _send(self, method: str, path: str, body: Optional[dict], stream: bool = False) -> httpx.Response:
        attempt = 0
        while True:
            response = None
            try:
                request = self._http.build_request(method, path, json=body)
                response = await self._http.send(request, stream=stream)
                if response.status_code not in RETRY_STATUSES or attempt >= self._s.max_retries:
                    if stream and response.status_code >= 400:
                        await response.aread()
                    return response
                await response.aclose()
            except httpx.TransportError as exc:
                if attempt >= self._s.max_retries or not _retry_after_error(method, exc):
                    raise APIConnectionError(f"{method} {path}: {exc}") from exc
            await asyncio.sleep(self._s.wait_s(attempt, response))
            attempt += 1

    async def _call(self, method, path, body, parse):
        response = await self._send(method, path, body)
        _check(response)
        return parse(response.json())

    def _stream(self, path, body) -> AsyncIterator[Event]:
        async def events() -> AsyncIterator[Event]:
            response = await self._send("POST", path, body, stream=True)
            _check(response)
            try:
                lines = []
                async for line in response.aiter_lines():
                    lines.append(line)
                    if line == "":
                        for name, data in _parse_sse(lines):
                            event = _event(name, data)
                            if event is not None:
                                yield event
                        lines = []
            except httpx.TransportError as exc:
                raise APIConnectionError(f"POST {path}: the stream broke: {exc}") from exc
            finally:
                await response.aclose()

        return events()
