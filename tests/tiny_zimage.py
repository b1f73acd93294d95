"""A tiny random Z-Image pipeline of the real classes (no downloads), for tests/test_family_zimage.py and
tests/test_zimage_distill.py.

* :func:`qwen_tokenizer` -- a real-format Qwen2Tokenizer read from a ``vocab.json`` + ``merges.txt`` written on the
  fly (256 byte tokens, 4 merges, the Qwen specials ``<|endoftext|>`` (padding), ``<|im_start|>``, ``<|im_end|>``:
  263 tokens) with a Qwen3-style chat template (``enable_thinking`` false adds the empty think block).
* :func:`zimage_pipeline` -- ZImagePipeline: ZImageTransformer2DModel (dim 32, 2 heads of 16 = RoPE axes 4+6+6,
  1 refiner + 2 main layers, 4 latent channels), Qwen3Model (hidden 32, 2 layers), tests/tiny_models' FLUX-style
  AutoencoderKL (scaling 0.3611, shift 0.1159; factor 2, or 1 with ``vae_blocks=1``), Z-Image's scheduler
  (FlowMatchEulerDiscreteScheduler, fixed shift 6 -- the base model's; Z-Image-Turbo's is 3 --, no dynamic shifting).
* :func:`session_folders` -- the saved folders, built once per test process.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

import tiny_models as tm

MERGES = [("t", "h"), ("th", "e"), ("Ġ", "a"), ("i", "n")]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = ("{%- for message in messages %}{{- '<|im_start|>' + message.role + '\\n' + message.content + "
                 "'<|im_end|>\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
                 "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}"
                 "{%- endif %}{%- endif %}")
TEXT_DIM = 32
SHIFT = 6.0  # Tongyi-MAI/Z-Image's scheduler_config.json
_BUILT: dict[str, dict] = {}


def qwen_tokenizer(folder: Path):
    """A Qwen2Tokenizer from vocab.json + merges.txt + tokenizer_config.json written into ``folder``."""
    from transformers import Qwen2Tokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokens = tm._bytes_to_unicode() + [a + b for a, b in MERGES]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in MERGES), encoding="utf-8")
    added = {str(len(tokens) + i): {"content": s, "lstrip": False, "normalized": False, "rstrip": False,
                                    "single_word": False, "special": True} for i, s in enumerate(SPECIALS)}
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "Qwen2Tokenizer", "model_max_length": 131072, "errors": "replace",
        "added_tokens_decoder": added, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "unk_token": None,
        "bos_token": None, "chat_template": CHAT_TEMPLATE}), encoding="utf-8")
    return Qwen2Tokenizer.from_pretrained(str(folder))


def qwen3_encoder(vocab_size: int, pad_id: int, seed: int = 0):
    """Qwen3Model (what ZImagePipeline's text_encoder is): hidden 32, 2 layers, 2 query heads, 1 KV head of 16."""
    from transformers import Qwen3Config, Qwen3Model

    torch.manual_seed(seed)
    cfg = Qwen3Config(vocab_size=vocab_size, hidden_size=TEXT_DIM, intermediate_size=37, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=1024,
                      pad_token_id=pad_id, tie_word_embeddings=True)
    return Qwen3Model(cfg).eval()


def zimage_transformer(seed: int = 0):
    """ZImageTransformer2DModel: dim 32 (2 heads of 16 = RoPE axes 4 + 6 + 6), 1 refiner and 2 main layers."""
    from diffusers import ZImageTransformer2DModel

    torch.manual_seed(seed)
    return ZImageTransformer2DModel(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=32, n_layers=2,
                                    n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=TEXT_DIM,
                                    axes_dims=[4, 6, 6], axes_lens=[1024, 512, 512])


def zimage_scheduler(dynamic: bool = False):
    """Z-Image's scheduler config (fixed shift 6); ``dynamic``: resolution-dependent shift instead."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    if dynamic:
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                               base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                               max_image_seq_len=4096)
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=SHIFT, use_dynamic_shifting=False)


def zimage_pipeline(tmp: Path, seed: int = 0, vae_blocks: int = 2, dynamic: bool = False):
    """A complete tiny ZImagePipeline (see the module docstring)."""
    from diffusers import ZImagePipeline

    tok = qwen_tokenizer(Path(tmp) / "qwen_vocab")
    pipe = ZImagePipeline(scheduler=zimage_scheduler(dynamic), vae=tm.flux_vae(seed, vae_blocks),
                          text_encoder=qwen3_encoder(len(tok), tok.pad_token_id, seed + 30), tokenizer=tok,
                          transformer=zimage_transformer(seed))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def session_folders(tmp_path_factory) -> dict:
    """{"zimage": the factor-2 folder (its pipeline object under "pipe"), "zimage128": a factor-1 VAE folder (default
    resolution 128 px: what `flashdmd reward train` works at), "dynamic": the factor-2 folder with a dynamically
    shifting scheduler} -- built once per test process and shared (read only)."""
    if "folders" not in _BUILT:
        tmp = tmp_path_factory.mktemp("tiny_zimage")
        pipe = zimage_pipeline(tmp)
        _BUILT["folders"] = {"pipe": pipe, "zimage": tm.save_pipeline(pipe, tmp / "zimage"),
                             "zimage128": tm.save_pipeline(zimage_pipeline(tmp, vae_blocks=1), tmp / "zimage128"),
                             "dynamic": tm.save_pipeline(zimage_pipeline(tmp, dynamic=True), tmp / "dynamic")}
    return _BUILT["folders"]
