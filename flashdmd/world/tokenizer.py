"""The embedded world's CLIP tokenizer: a real ``transformers.CLIPTokenizer`` on a small BPE vocabulary.

The vocabulary is written by the project, deterministically, in the layout of OpenAI's CLIP vocab:

* ids 0..255      -- the 256 byte-level unicode characters (GPT-2 ``bytes_to_unicode`` order),
* ids 256..511    -- the same characters with the end-of-word suffix ``</w>``,
* then one token per BPE merge (in merge order) -- the merges build every word of
  :func:`flashdmd.world.prompts.vocabulary` into a single token,
* last two ids    -- ``<|startoftext|>`` (BOS) and ``<|endoftext|>`` (EOS, also PAD and UNK).

EOS has the largest id, as in real CLIP, so both of transformers' pooling rules (argmax id or first
EOS) pick the same position. ``model_max_length`` is 16 (real CLIP uses 77): the longest world prompt
is 12 tokens with BOS/EOS, and a short context keeps the text encoders and cross-attention cheap.
Text outside the vocabulary still tokenizes (byte-level fallback), it just costs more tokens.
"""
from __future__ import annotations

import json
from pathlib import Path

from transformers import CLIPTokenizer

from flashdmd import FlashDMDError
from flashdmd.world.prompts import vocabulary

MODEL_MAX_LENGTH = 16
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
EOW = "</w>"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP map from the 256 byte values to printable unicode characters (same order as CLIP)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _symbols(word: str) -> list[str]:
    """A word's initial BPE symbols: byte-level chars, the last one carrying ``</w>``."""
    byte_chars = bytes_to_unicode()
    chars = [byte_chars[b] for b in word.encode("utf-8")]
    return chars[:-1] + [chars[-1] + EOW]


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's BPE on one word: repeatedly merge the lowest-ranked adjacent pair (all occurrences)."""
    parts = _symbols(word)
    while len(parts) > 1:
        pairs = {(a, b) for a, b in zip(parts, parts[1:]) if (a, b) in ranks}
        if not pairs:
            break
        best = min(pairs, key=ranks.__getitem__)
        merged, i = [], 0
        while i < len(parts):
            if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                merged.append(parts[i] + parts[i + 1])
                i += 2
            else:
                merged.append(parts[i])
                i += 1
        parts = merged
    return parts


def build_merges(words) -> list[tuple[str, str]]:
    """Merges (in rank order) that turn every word into a single token.

    Words are processed in sorted order; a word's missing merges are appended left to right. Appended
    merges rank below all earlier ones, so they never change how an earlier word tokenizes.
    """
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in sorted(set(words)):
        parts = _bpe(word, ranks)
        while len(parts) > 1:
            pair = (parts[0], parts[1])
            ranks[pair] = len(merges)
            merges.append(pair)
            parts = _bpe(word, ranks)
    return merges


def build_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    """CLIP-layout vocab: byte chars, their ``</w>`` variants, one token per merge, BOS, EOS."""
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + EOW for c in chars]
    seen = set(tokens)
    for a, b in merges:
        if a + b not in seen:
            tokens.append(a + b)
            seen.add(a + b)
    tokens += [BOS, EOS]
    return {t: i for i, t in enumerate(tokens)}


def write_tokenizer_files(directory, words=None, model_max_length: int = MODEL_MAX_LENGTH) -> Path:
    """Write vocab.json, merges.txt, tokenizer_config.json and special_tokens_map.json into ``directory``.

    ``words`` defaults to :func:`flashdmd.world.prompts.vocabulary`. Output is byte-for-byte deterministic.
    """
    if words is None:
        words = vocabulary()
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    merges = build_merges(words)
    vocab = build_vocab(merges)
    (d / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, indent=0) + "\n", encoding="utf-8")
    lines = ["#version: 0.2 (flashdmd world vocabulary)"] + [f"{a} {b}" for a, b in merges]
    (d / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": model_max_length, "bos_token": BOS,
              "eos_token": EOS, "pad_token": EOS, "unk_token": EOS, "do_lower_case": True,
              "clean_up_tokenization_spaces": False}
    (d / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    specials = {"bos_token": BOS, "eos_token": EOS, "pad_token": EOS, "unk_token": EOS}
    (d / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n", encoding="utf-8")
    return d


def load_tokenizer(directory):
    """Load a ``CLIPTokenizer`` from ``directory`` and check it has a real vocabulary (len > 100).

    Guards against transformers' offline behaviour of returning an empty tokenizer for a bad path.
    """
    d = Path(directory)
    if not (d / "vocab.json").is_file() or not (d / "merges.txt").is_file():
        raise FlashDMDError(f"no vocab.json/merges.txt in {d}: run `flashdmd world pretrain --only text` first")
    tok = CLIPTokenizer.from_pretrained(str(d))
    if len(tok) <= 100:
        raise FlashDMDError(f"tokenizer in {d} has only {len(tok)} tokens: its vocab.json is broken; rewrite it")
    return tok


def make_tokenizer(directory, words=None):
    """Write the tokenizer files into ``directory`` and load them; checks every word is one token."""
    write_tokenizer_files(directory, words)
    tok = load_tokenizer(directory)
    if words is None:
        words = vocabulary()
    bad = [w for w in words if len(tok(w, add_special_tokens=False).input_ids) != 1]
    if bad:
        raise FlashDMDError(f"tokenizer in {directory} splits words {bad[:5]}: the BPE merges are inconsistent")
    return tok
