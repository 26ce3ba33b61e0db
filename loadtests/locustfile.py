"""Locust scenarios for genserve: a realistic mix of clients.

    .venv/bin/python loadtests/run.py --users 8 --duration 60      # headless, reports, thresholds
    .venv/bin/locust -f loadtests/locustfile.py --host http://127.0.0.1:3000   # web UI

User classes (weights give the mix):
  Txt2ImgUser    txt2img with varied steps, guidance, schedulers and DeepCache intervals:
                 the diffusion engine sees requests at different step counts joining and
                 leaving its batch, some of them taking shallow steps.
  GANBurstUser   bursts of back-to-back GAN requests of 1-16 images, then a pause:
                 exercises Triton's dynamic batcher and the service's adaptive batching.
  StreamingUser  txt2img over server-sent events, hanging up after a few progress
                 events: the engine must cancel the request and free its slot. A 404 (a
                 service without the streaming endpoint) is counted as a success under
                 its own name, so the mix still runs against older builds.

Knobs (environment variables, read once):
  LOADTEST_STEPS      comma list of num_inference_steps to draw from (default 5,10,20,30)
  LOADTEST_CACHE_INTERVALS  comma list of DeepCache cache_interval values to draw from
                      (default 1,1,2,3: half the requests cache; "1" for models without it)
  LOADTEST_MAX_IMAGES most images per GAN request (default 16)
  LOADTEST_ACCEPT     comma list of statuses that count as a definite answer beside 200
                      (the chaos run accepts 429,503: refusals with Retry-After, never 500)
  LOADTEST_TIMEOUT_S  client timeout of every request (default: none); a request with no
                      answer by then is a failure ("hung")
Requests that the service turns away (429 queue_full included) count as failures unless
LOADTEST_ACCEPT names them: the runner's error-rate threshold decides the rest.
"""

from __future__ import annotations

import os
import random
import time

from locust import HttpUser, between, task

STEPS = [int(s) for s in os.environ.get("LOADTEST_STEPS", "5,10,20,30").split(",")]
CACHE_INTERVALS = [int(s) for s in os.environ.get("LOADTEST_CACHE_INTERVALS", "1,1,2,3").split(",")]
GUIDANCE = [0.0, 1.0, 3.5, 7.5, 12.0]   # 0 and 1 skip classifier-free guidance
SCHEDULERS = ["ddim", "euler", "euler_ancestral", "dpmpp_2m", "ddpm"]
# Short phrasings the demo model was trained on (zoo/latent_diffusion/captions.py); they
# also fit the 12-token text encoder of the random test pipelines.
PROMPTS = ["7", "seven", "digit 3", "the number 4", "a photo of the digit 5", "the number nine"]
MAX_GAN_IMAGES = int(os.environ.get("LOADTEST_MAX_IMAGES", "16"))
ACCEPT = {int(s) for s in os.environ.get("LOADTEST_ACCEPT", "").split(",") if s.strip()}
TIMEOUT_S = float(os.environ["LOADTEST_TIMEOUT_S"]) if os.environ.get("LOADTEST_TIMEOUT_S") else None


def _expect(response, status: int = 200) -> None:
    """Mark a catch_response request failed unless it has the expected status (or one
    LOADTEST_ACCEPT allows: then it is a success, reported under its status)."""
    if response.status_code in ACCEPT:
        response.request_meta["name"] += f" [{response.status_code}]"
        response.success()
    elif response.status_code != status:
        response.failure(f"HTTP {response.status_code}: {response.text[:200]}")


def _txt2img_body() -> dict:
    return {
        "prompt": random.choice(PROMPTS),
        "num_inference_steps": random.choice(STEPS),
        "guidance_scale": random.choice(GUIDANCE),
        "scheduler": random.choice(SCHEDULERS),
        "seed": random.randrange(2**32),
        "cache_interval": random.choice(CACHE_INTERVALS),  # full and shallow rows share iterations
    }


class Txt2ImgUser(HttpUser):
    weight = 3
    wait_time = between(0.5, 2.0)

    @task
    def txt2img(self) -> None:
        body = _txt2img_body()
        # Named by step count, so the report shows latency growing with steps.
        name = f"/v1/txt2img [{body['num_inference_steps']} steps]"
        with self.client.post("/v1/txt2img", json=body, name=name, catch_response=True, timeout=TIMEOUT_S) as r:
            _expect(r)


class GANBurstUser(HttpUser):
    weight = 2
    wait_time = between(2.0, 5.0)   # the pause between bursts

    @task
    def burst(self) -> None:
        for _ in range(random.randint(3, 8)):
            body = {"num_images": random.randint(1, MAX_GAN_IMAGES), "seed": random.randrange(2**32)}
            if random.random() < 0.5:
                body["class_label"] = random.randrange(10)
            with self.client.post("/v1/gan/generate", json=body, catch_response=True, timeout=TIMEOUT_S) as r:
                _expect(r)


class StreamingUser(HttpUser):
    weight = 1
    wait_time = between(1.0, 3.0)

    @task
    def stream_and_hang_up(self) -> None:
        body = {**_txt2img_body(), "num_inference_steps": max(STEPS)}
        hang_up_after = random.randint(1, 3)   # progress events read before disconnecting
        start = time.perf_counter()
        # stream=True: locust times the headers; the time to the first progress event is
        # reported separately below.
        with self.client.post("/v1/txt2img/stream", json=body, stream=True, catch_response=True,
                              timeout=TIMEOUT_S) as r:
            if r.status_code == 404:
                # No streaming endpoint on this build: not the service's fault.
                r.success()
                r.request_meta["name"] = "/v1/txt2img/stream [absent: 404]"
                return
            if r.status_code != 200:
                _expect(r)
                return
            progress = 0
            for line in r.iter_lines(decode_unicode=True):
                if line == "event: progress":
                    progress += 1
                    if progress == 1:
                        self._report_first_event(start)
                elif line.startswith("event: error"):
                    r.failure("the stream sent an error event")
                    break
                elif line == "event: result":
                    break   # finished before we hung up: fine, a short request
                if progress >= hang_up_after:
                    break
            # Leaving the block closes the connection: the early disconnect under test.
            r.close()

    def _report_first_event(self, start: float) -> None:
        self.environment.events.request.fire(
            request_type="SSE", name="/v1/txt2img/stream [first progress event]",
            response_time=(time.perf_counter() - start) * 1000, response_length=0,
            exception=None, context={},
        )

