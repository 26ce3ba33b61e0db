"""What a repository serves, hashed: proof that a refactor changed no image.

Starts `bentoml serve` on a model repository, sends every served model its family's
requests (and every POST endpoint the example body its OpenAPI document carries), with
fixed seeds, and writes the SHA-256 of every returned image, in order, to a JSON file.
Two runs (before and after a change, same repository) compared with `--compare` must
be equal byte for byte.

    python bench/image_fingerprint.py --repository model_repository --out /tmp/before.json
    python bench/image_fingerprint.py --repository model_repository --out /tmp/after.json --compare /tmp/before.json
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import sys
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.fixtures.local_server import LocalServer  # noqa: E402


def image_hashes(body) -> list[str]:
    """SHA-256 of every base64 image in a JSON answer (any depth), in document order."""
    found = []
    if isinstance(body, dict):
        for key, value in body.items():
            if key in ("data", "b64_json", "image", "latents") and isinstance(value, str) and len(value) > 64:
                found.append(hashlib.sha256(base64.b64decode(value)).hexdigest())
            else:
                found += image_hashes(value)
    elif isinstance(body, list):
        for item in body:
            found += image_hashes(item)
    return found


def family_requests(models: list[dict]) -> list[tuple[str, dict]]:
    """(path, body) per served model, by its family, with fixed seeds."""
    requests = []
    for m in models:
        name, family = m["name"], m.get("pipeline") or m.get("family")
        if family in ("gan", "stylegan"):
            requests.append(("/v1/gan/generate", {"model": name, "seed": 7, "num_images": 2}))
            requests.append(("/v1/gan/generate", {"model": name, "seed": 7, "num_images": 1, "truncation_psi": 0.5}))
        elif family in ("stable_diffusion", "stable_diffusion_xl", "flux"):
            requests.append(("/v1/txt2img", {"model": name, "prompt": "a digit seven", "seed": 3,
                                             "num_inference_steps": 4}))
        elif family == "ddpm":
            requests.append(("/v1/ddpm/generate", {"model": name, "seed": 5, "num_inference_steps": 4}))
    return requests


def run(url: str) -> dict[str, list[str]]:
    results: dict[str, list[str]] = {}
    with httpx.Client(base_url=url, timeout=600) as client:
        models = client.get("/v1/models").json()
        models = models["models"]
        requests = family_requests(models)
        doc = client.get("/v1/openapi.json").json()
        for path, ops in doc["paths"].items():
            example = ops.get("post", {}).get("requestBody", {}).get("content", {}).get(
                "application/json", {}).get("example")
            if example is not None and not path.endswith("/stream"):
                requests.append(("/v1" + path, example))
        for path, body in requests:
            answer = client.post(path, json=body)
            key = f"{path} {json.dumps(body, sort_keys=True)[:300]}"
            results[key] = [str(answer.status_code)] + (image_hashes(answer.json()) if answer.status_code == 200
                                                         else [answer.text[:300]])
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repository", type=Path, default=ROOT / "model_repository")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--compare", type=Path, help="an earlier run's output: exit 1 on any difference")
    args = parser.parse_args()
    server = LocalServer({"GENSERVE_MODEL_REPOSITORY": str(args.repository.resolve()),
                          "GENSERVE_BACKEND": "onnxruntime"}, args.out.with_suffix(".log"))
    try:
        server.wait_ready(timeout=600)
        results = run(server.url)
    finally:
        server.stop()
    args.out.write_text(json.dumps(results, indent=1, sort_keys=True))
    images = sum(len(v) - 1 for v in results.values() if v[0] == "200")
    print(f"{len(results)} requests, {images} images -> {args.out}")
    if args.compare:
        before = json.loads(args.compare.read_text())
        differ = sorted(k for k in before.keys() | results.keys() if before.get(k) != results.get(k))
        for key in differ:
            print(f"DIFFERS: {key}\n  before {before.get(key)}\n  after  {results.get(key)}")
        print(f"{len(differ)} of {len(before)} requests differ")
        return 1 if differ else 0
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
