"""How often the digits ControlNet makes sd_digits draw the outline's digit, judged by the digit
classifier (zoo/classifier.py), against the same requests without the control image.

    python -m zoo.controlnet.evaluate [--repository model_repository] [--count 100] [--record]

Runs the served, torch-free pipeline (ONNX Runtime, the step engine batching the requests) on
the held-out outlines of the edges2digits split, with the empty prompt (what the ControlNet was
trained with), guidance 1, 20 DDIM steps, seed i for outline i; prints both rates as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path

import numpy as np

PIPELINE, CONTROLNET = "sd_digits", "outline"


def generate(repository: Path, controls: np.ndarray | None, count: int, steps: int = 20) -> np.ndarray:
    """[count, C, H, W] images in [-1, 1]: request i with seed i, and control image i when given."""
    from services.engine.engine import DiffusionEngine, EngineConfig
    from services.pipelines.controlnet import ControlUnit
    from services.pipelines.pipeline_stable_diffusion import DiffusionRequest, pipelines
    from services.runtime.onnxruntime_backend import OnnxRuntimeBackend
    from services.runtime.repository import ModelRepository

    pipeline = pipelines(OnnxRuntimeBackend(ModelRepository(repository)))[PIPELINE]

    async def run():
        engine = DiffusionEngine(pipeline, EngineConfig(max_batch_rows=32, max_queued_image_steps=10**7))
        units = (lambda i: [ControlUnit(CONTROLNET, controls[i])]) if controls is not None else (lambda i: [])
        out = await asyncio.gather(*(engine.generate(DiffusionRequest(
            prompt="", guidance_scale=1.0, num_inference_steps=steps, scheduler="ddim", seed=i,
            controlnet=units(i)), 3600) for i in range(count)))
        await engine.close()
        return np.concatenate([o.images for o in out])
    return asyncio.run(run())


def judge(repository: Path, count: int, classify) -> dict:
    """{"with_control": rate, "without_control": rate, "count": n}: how often the classifier
    names the outline's digit. `classify`: [N, 1, 32, 32] in [-1, 1] -> digits."""
    from zoo.controlnet import control_images
    from zoo.translator.data import edges2digits

    sketches, _, labels = edges2digits()["test"]
    count = min(count, len(labels))
    controls = control_images(sketches[:count]).numpy()
    labels = labels[:count].numpy()
    rates = {}
    for key, given in (("with_control", controls), ("without_control", None)):
        rates[key] = float(np.mean(classify(generate(repository, given, count)) == labels))
    return {**rates, "count": count}


def main(argv=None) -> int:
    import torch

    from zoo.checkpoint import load_checkpoint

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repository", type=Path, default=Path("model_repository"))
    parser.add_argument("--count", type=int, default=100)
    parser.add_argument("--record", action="store_true",
                        help="also write the rates into the checkpoint's training.json (\"judged\")")
    args = parser.parse_args(argv)
    model = load_checkpoint("digit_classifier")

    def classify(images):
        with torch.no_grad():
            return model(torch.from_numpy(images.astype("float32"))).argmax(1).numpy()
    rates = judge(args.repository, args.count, classify)
    print(json.dumps(rates))
    if args.record:
        from zoo.controlnet import CHECKPOINT

        path = CHECKPOINT / "training.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "judged": rates}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
