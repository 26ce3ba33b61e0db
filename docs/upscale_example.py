"""Makes docs/upscale.png: a real photo (a crop of scikit-image's `astronaut`, reduced to 64x64)
upscaled x4 by a served model through /v1/upscale, beside nearest, bicubic and the original.

  make serve                                   # in another shell
  .venv/bin/python docs/upscale_example.py [--url http://127.0.0.1:3000] [--model realesr_animevideov3_x4]
"""

from __future__ import annotations

import argparse
import base64
import io
from pathlib import Path

import httpx
import numpy as np
from PIL import Image, ImageDraw

SIDE, SCALE = 64, 4


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:3000")
    parser.add_argument("--model", default="realesr_animevideov3_x4")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("upscale.png"))
    args = parser.parse_args()

    from skimage import data

    original = Image.fromarray(data.astronaut()[20:276, 126:382])
    small = original.resize((SIDE, SIDE), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    small.save(buffer, format="PNG")
    r = httpx.post(f"{args.url}/v1/upscale", timeout=300,
                   json={"model": args.model, "image": base64.b64encode(buffer.getvalue()).decode()})
    r.raise_for_status()
    served = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]["data"]))).convert("RGB")
    big = SIDE * SCALE
    panels = [(f"input {SIDE}x{SIDE} (nearest)", small.resize((big, big), Image.Resampling.NEAREST)),
              ("bicubic x4", small.resize((big, big), Image.Resampling.BICUBIC)),
              (f"{args.model} x4", served),
              ("original", original.resize((big, big), Image.Resampling.BICUBIC))]
    label = 18
    sheet = Image.new("RGB", (big * len(panels), big + label), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (title, image) in enumerate(panels):
        sheet.paste(image, (i * big, label))
        draw.text((i * big + 6, 3), title, fill="black")
    sheet.save(args.out, optimize=True)
    print(f"{args.out}: {sheet.size[0]}x{sheet.size[1]}, {args.out.stat().st_size} bytes")


if __name__ == "__main__":
    main()
