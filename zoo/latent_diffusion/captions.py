"""Text prompts for the digits, so the text encoder learns from real phrases.

Each training example gets one caption sampled from several phrasings (number
word or numeral, with or without filler words), so that at serving time prompts
like "the number 7" and "a handwritten digit seven" both work. An empty caption
is used for caption dropout, which is what classifier-free guidance needs as its
unconditional branch (the pipeline encodes negative_prompt="" the same way).

The tokenizer's vocabulary is these captions' words, so other words still tokenize
(byte-level fallback) but into tokens the text encoder never saw in training, and
they derail it: measured at guidance 3, "number seven" / "the handwritten number
seven" / "SEVEN!" (known words, new orders) draw the digit 100% of the time, "a
picture of a seven" 22% and "draw a 7 please" 10%.
"""

from __future__ import annotations

import torch

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

# "{w}" is the number word, "{n}" the numeral.
TEMPLATES = (
    "a handwritten digit {w}",
    "a handwritten digit {n}",
    "the number {n}",
    "the number {w}",
    "{n}",
    "{w}",
    "a photo of the digit {n}",
    "a photo of the digit {w}",
    "handwritten {n}",
    "handwritten {w}",
    "digit {w}",
    "digit {n}",
    "a drawing of the number {w}",
    "an image of a handwritten {n}",
)

# Phrasings the evaluation uses: a mix of numeral and word forms.
EVAL_TEMPLATES = (
    "a handwritten digit {w}",
    "the number {n}",
    "{w}",
    "a photo of the digit {n}",
)


def caption(digit: int, template: str) -> str:
    return template.format(w=DIGIT_WORDS[digit], n=str(digit))


def all_captions() -> list[str]:
    """Every caption the model is trained on (the tokenizer's vocabulary source)."""
    return [caption(d, t) for d in range(10) for t in TEMPLATES]


def sample_captions(
    labels: torch.Tensor, generator: torch.Generator, dropout: float = 0.12
) -> list[str]:
    """One random phrasing per label; with probability `dropout` the empty prompt."""
    n = len(labels)
    which = torch.randint(len(TEMPLATES), (n,), generator=generator)
    drop = torch.rand(n, generator=generator) < dropout
    return [
        "" if drop[i] else caption(int(labels[i]), TEMPLATES[int(which[i])]) for i in range(n)
    ]
