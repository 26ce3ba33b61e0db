"""A CLIP-format BPE tokenizer whose vocabulary is our own captions' words.

CLIP's real vocabulary (49,408 tokens) would make the tiny text encoder's embedding
table larger than the rest of the model, so we build CLIP's file format around a
small vocabulary instead: the 256 byte-level base characters (and their "</w>"
word-final forms) exactly as in CLIP, so that any text still tokenizes, plus the
BPE merges that turn every caption word into a single token, plus
<|startoftext|>/<|endoftext|>. Padding uses <|endoftext|> as in SD 1.x.

The folder gets vocab.json/merges.txt (the slow format) and tokenizer.json (the
`tokenizers` format the torch-free serving side reads). tokenizer.json carries
truncation and padding to `model_max_length`, so that
`tokenizers.Tokenizer.from_file(...).encode(text).ids` gives exactly the ids
StableDiffusionPipeline feeds its text encoder.

transformers 5 no longer ships a pure-Python CLIP tokenizer (CLIPTokenizer is
backed by `tokenizers` itself), so `ReferenceCLIPTokenizer` below re-implements
the BPE of OpenAI's simple_tokenizer from vocab.json/merges.txt as an
independent parity check of the files.
"""

from __future__ import annotations

import json
import unicodedata
from collections import Counter
from functools import lru_cache
from itertools import pairwise
from pathlib import Path

import regex

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
MODEL_MAX_LENGTH = 16  # SD 1.x uses 77; our captions need at most 9 tokens.

# CLIP's pre-tokenizer pattern (the one transformers' CLIPTokenizer uses).
PAT = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)


@lru_cache
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable-character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def normalize(text: str) -> str:
    """What the fast CLIP tokenizer's normalizer does: NFC, collapse whitespace, lowercase."""
    return regex.sub(r"\s+", " ", unicodedata.normalize("NFC", text)).lower()


def pretokens(text: str) -> list[str]:
    """Words after normalization and CLIP's split, byte-encoded to printable characters."""
    b2u = bytes_to_unicode()
    return ["".join(b2u[b] for b in t.encode("utf-8")) for t in PAT.findall(normalize(text))]


def learn_merges(texts: list[str]) -> list[tuple[str, str]]:
    """Classic BPE learning (Sennrich et al.) run until every word is a single symbol.

    Ties break on the pair itself so the result is deterministic.
    """
    words = Counter((*w[:-1], w[-1] + "</w>") for t in texts for w in pretokens(t))
    merges: list[tuple[str, str]] = []
    while True:
        pairs: Counter = Counter()
        for word, freq in words.items():
            for pair in pairwise(word):
                pairs[pair] += freq
        if not pairs:
            return merges
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        merged: Counter = Counter()
        for word, freq in words.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(word[i] + word[i + 1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] += freq
        words = merged


def build_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    """CLIP's vocabulary layout: bytes, bytes+</w>, one token per merge, then specials."""
    base = list(bytes_to_unicode().values())
    tokens = base + [b + "</w>" for b in base] + ["".join(m) for m in merges] + [BOS, EOS]
    return {t: i for i, t in enumerate(tokens)}


def write_tokenizer(folder: str | Path, texts: list[str], max_length: int = MODEL_MAX_LENGTH):
    """Writes vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json and
    tokenizer.json (with padding/truncation) to `folder`; returns the CLIPTokenizer."""
    from tokenizers import Tokenizer
    from transformers import CLIPTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    merges = learn_merges(texts)
    vocab = build_vocab(merges)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False) + "\n")
    (folder / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8"
    )
    tok = CLIPTokenizer(
        vocab=vocab,
        merges=merges,
        model_max_length=max_length,
        unk_token=EOS,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=EOS,
    )
    tok.save_pretrained(folder)
    specials = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
    (folder / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")

    fast = Tokenizer.from_file(str(folder / "tokenizer.json"))
    fast.enable_truncation(max_length=max_length)
    fast.enable_padding(length=max_length, pad_id=vocab[EOS], pad_token=EOS)
    fast.save(str(folder / "tokenizer.json"))
    return CLIPTokenizer.from_pretrained(folder)


class ReferenceCLIPTokenizer:
    """Pure-Python CLIP BPE over vocab.json/merges.txt (an independent check of the files)."""

    def __init__(self, folder: str | Path, max_length: int = MODEL_MAX_LENGTH):
        folder = Path(folder)
        self.encoder = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
        lines = (folder / "merges.txt").read_text(encoding="utf-8").strip().split("\n")[1:]
        self.ranks = {tuple(line.split()): i for i, line in enumerate(lines)}
        self.max_length = max_length

    def bpe(self, token: str) -> list[str]:
        word = (*token[:-1], token[-1] + "</w>")
        while len(word) > 1:
            pair = min(pairwise(word), key=lambda p: self.ranks.get(p, float("inf")))
            if pair not in self.ranks:
                break
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
                    out.append(word[i] + word[i + 1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            word = tuple(out)
        return list(word)

    def __call__(self, text: str) -> list[int]:
        """Ids as StableDiffusionPipeline sees them: bos, tokens, eos, truncated and
        padded with eos to max_length."""
        unk = self.encoder[EOS]
        ids = []
        for t in pretokens(text):
            if t in (BOS, EOS):
                ids.append(self.encoder[t])
            else:
                ids += [self.encoder.get(p, unk) for p in self.bpe(t)]
        ids = [self.encoder[BOS], *ids[: self.max_length - 2], self.encoder[EOS]]
        return ids + [self.encoder[EOS]] * (self.max_length - len(ids))
