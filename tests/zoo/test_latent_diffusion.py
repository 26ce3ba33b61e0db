"""The committed text-to-image digit model (zoo/checkpoints/sd_digits/) as diffusers sees it.

The folder is what the exporter and the serving pipeline consume, so these tests pin
the facts they rely on: a StableDiffusionPipeline loads it offline, 1-channel 32x32
images come from 4x8x8 latents (VAE factor 4), the tokenizer files agree with each
other, and prompts naming a digit produce that digit.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from zoo.latent_diffusion import CHECKPOINT, load_pipeline  # noqa: E402
from zoo.latent_diffusion.captions import DIGIT_WORDS, all_captions  # noqa: E402
from zoo.latent_diffusion.tokenizer import EOS, ReferenceCLIPTokenizer  # noqa: E402

BEST_GUIDANCE = 3.0  # 1.00 at 3, 5 and 7.5 (0.885 at 1): `python -m zoo.latent_diffusion.evaluate`
TEXTS = [
    *all_captions(),
    "",
    "Hello, World!  it's 42 \u00fcnic\u00f8de \U0001f600",
    "A  HANDWRITTEN\tdigit SEVEN",
    "a photo of the digit seven and a photo of the digit three",  # longer than 16 tokens
    "x" * 40,
    "eighteen sevens, thirty-one",
]


@pytest.fixture(scope="module")
def pipe():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: one thread is fastest on a shared CPU
    yield load_pipeline()
    torch.set_num_threads(threads)


def test_folder_is_a_small_safetensors_sd_folder():
    index = json.loads((CHECKPOINT / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["safety_checker"] == [None, None] and index["feature_extractor"] == [None, None]
    assert index["requires_safety_checker"] is False
    files = [p for p in CHECKPOINT.rglob("*") if p.is_file()]
    assert not [p for p in files if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]
    assert {p.parent.name for p in files if p.suffix == ".safetensors"} == {"text_encoder", "unet", "vae"}
    assert sum(p.stat().st_size for p in files) < 5_000_000
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.json"):
        assert (CHECKPOINT / "tokenizer" / name).exists()
    from safetensors import safe_open

    with safe_open(str(CHECKPOINT / "text_encoder" / "model.safetensors"), "pt") as f:
        assert all(k.startswith("text_model.") for k in f.keys())  # SD 1.x / transformers 4 layout


def test_components_and_shapes(pipe):
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    assert isinstance(pipe.vae, AutoencoderKL) and isinstance(pipe.unet, UNet2DConditionModel)
    assert isinstance(pipe.text_encoder, CLIPTextModel) and isinstance(pipe.tokenizer, CLIPTokenizer)
    assert isinstance(pipe.scheduler, DDIMScheduler) and pipe.safety_checker is None
    assert pipe.vae_scale_factor == 4
    vae, unet, te = pipe.vae.config, pipe.unet.config, pipe.text_encoder.config
    assert (vae.in_channels, vae.out_channels, vae.latent_channels) == (1, 1, 4)
    assert 0.1 < vae.scaling_factor < 10 and vae.scaling_factor != 0.18215  # measured, not SD's
    assert (unet.sample_size, unet.in_channels, unet.out_channels) == (8, 4, 4)
    assert unet.cross_attention_dim == te.hidden_size
    assert te.max_position_embeddings == pipe.tokenizer.model_max_length == 16
    assert te.vocab_size == len(pipe.tokenizer)
    assert te.eos_token_id == pipe.tokenizer.eos_token_id == pipe.tokenizer.pad_token_id
    s = pipe.scheduler.config
    assert (s.prediction_type, s.beta_schedule) == ("epsilon", "scaled_linear")
    assert (s.beta_start, s.beta_end) == (0.00085, 0.012)
    assert (s.num_train_timesteps, s.steps_offset, s.set_alpha_to_one, s.clip_sample) == (1000, 1, False, False)

    with torch.no_grad():
        x = torch.zeros(2, 1, 32, 32)
        z = pipe.vae.encode(x).latent_dist.mean
        assert z.shape == (2, 4, 8, 8)
        assert pipe.vae.decode(z).sample.shape == (2, 1, 32, 32)
    kw = dict(num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    assert pipe("seven", output_type="latent", **kw).images.shape == (1, 4, 8, 8)
    # 1-channel VAE output: diffusers' "np" keeps the channel axis last, "pil" gives mode "L".
    images = pipe("seven", output_type="np", **kw).images
    assert images.shape == (1, 32, 32, 1) and images.dtype == np.float32
    assert 0.0 <= images.min() and images.max() <= 1.0
    pil = pipe("seven", output_type="pil", **kw).images[0]
    assert pil.mode == "L" and pil.size == (32, 32)


def test_tokenizer_files_agree(tmp_path):
    """transformers' CLIPTokenizer (from tokenizer.json, and rebuilt from vocab.json/merges.txt
    alone), tokenizers' tokenizer.json and a pure-Python BPE over vocab.json/merges.txt give
    the same padded, truncated ids."""
    import shutil

    from tokenizers import Tokenizer
    from transformers import CLIPTokenizer

    folder = CHECKPOINT / "tokenizer"
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(folder / name, tmp_path / name)
    tok = CLIPTokenizer.from_pretrained(folder)
    from_bpe_files = CLIPTokenizer.from_pretrained(tmp_path)
    fast = Tokenizer.from_file(str(folder / "tokenizer.json"))  # padding/truncation built in
    ref = ReferenceCLIPTokenizer(folder)
    n = tok.model_max_length
    assert n == from_bpe_files.model_max_length == 16
    for text in TEXTS:
        want = tok(text, padding="max_length", max_length=n, truncation=True).input_ids
        assert len(want) == n
        assert fast.encode(text).ids == want == ref(text), text
        assert from_bpe_files(text, padding="max_length", max_length=n, truncation=True).input_ids == want
    vocab = tok.get_vocab()
    assert tok.pad_token == tok.eos_token == tok.unk_token == EOS
    # Every caption word is one token; digits are CLIP's single-character tokens.
    for word in set(" ".join(all_captions()).split()):
        assert word + "</w>" in vocab, word
    assert fast.encode("seven").ids[:4] == [vocab["<|startoftext|>"], vocab["seven</w>"], vocab[EOS], vocab[EOS]]


def test_serving_tokenization_reproduces_the_pipeline_prompt_embeddings(pipe):
    from tokenizers import Tokenizer

    fast = Tokenizer.from_file(str(CHECKPOINT / "tokenizer" / "tokenizer.json"))
    prompts = ["a handwritten digit three", "the number 7", ""]
    ids = torch.tensor([e.ids for e in fast.encode_batch(prompts)])
    with torch.no_grad():
        ours = pipe.text_encoder(ids)[0]
        theirs, _ = pipe.encode_prompt(prompts, "cpu", 1, False)
    torch.testing.assert_close(ours, theirs)


def test_generation_is_seeded(pipe):
    kw = dict(num_inference_steps=4, guidance_scale=BEST_GUIDANCE, output_type="np")
    a = pipe(["a handwritten digit three"] * 2, generator=torch.Generator().manual_seed(3), **kw).images
    b = pipe(["a handwritten digit three"] * 2, generator=torch.Generator().manual_seed(3), **kw).images
    np.testing.assert_array_equal(a, b)
    assert np.abs(a[0] - a[1]).max() > 0.05  # different noise per image


@pytest.fixture(scope="module")
def judge():
    """The committed digit classifier: [N, 1, 32, 32] in [-1, 1] -> logits."""
    from zoo.checkpoint import load_checkpoint

    return load_checkpoint("digit_classifier")


def _accuracy(pipe, judge, per_digit: int, steps: int) -> float:
    from zoo.latent_diffusion.evaluate import digit_accuracy

    return digit_accuracy(pipe, judge, BEST_GUIDANCE, per_digit=per_digit, steps=steps)["accuracy"]


def test_prompts_draw_the_digit_they_name(pipe, judge):
    """3 images per digit, 10 DDIM steps: a coarse floor (the full table is >= 0.8)."""
    assert _accuracy(pipe, judge, per_digit=3, steps=10) >= 0.6


@pytest.mark.slow
def test_digit_accuracy_at_the_evaluated_setting(pipe, judge):
    """The evaluation's setting: 20 images per digit, DDIM 20 steps."""
    assert _accuracy(pipe, judge, per_digit=20, steps=20) >= 0.8


def test_digit_words_and_numerals_both_tokenize_to_known_tokens():
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(CHECKPOINT / "tokenizer")
    unk = tok.unk_token_id
    for d, w in enumerate(DIGIT_WORDS):
        for text in (w, str(d)):
            ids = tok(text).input_ids
            assert len(ids) == 3 and ids[1] != unk, text
