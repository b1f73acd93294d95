"""Tiny random-weight Qwen-Image parts, assembled into a real diffusers ``QwenImagePipeline`` (no hub access).

* :func:`qwen2_tokenizer` -- a real-format byte-level BPE ``Qwen2Tokenizer`` (256 byte characters, a few merges, the
  chat specials ``<|endoftext|>`` / ``<|im_start|>`` / ``<|im_end|>``: 267 tokens), written from a small vocab.
* :func:`qwen_text_encoder` -- ``Qwen2_5_VLForConditionalGeneration``: a 2-layer language model (hidden 32, GQA 4/2
  heads, M-RoPE sections (2, 1, 1)) and a 1-block vision tower the text path never runs.
* :func:`qwen_transformer` -- ``QwenImageTransformer2DModel``: patch 2, 4 latent channels (16 packed), 2 blocks of
  2 heads x 8, text dim 32, RoPE axes (2, 2, 4).
* :func:`qwen_vae` -- ``AutoencoderKLQwenImage`` (the video VAE): base dim 8, factor 2, z_dim 4, per-channel
  latents_mean / latents_std.
* :func:`qwen_scheduler` -- Qwen-Image's own FlowMatchEulerDiscreteScheduler config (dynamic exponential shift with
  base 0.5 / max 0.9 over 256..8192 tokens, shift_terminal 0.02).
* :func:`qwenimage_pipeline` -- the whole pipeline (float32, CPU).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from tiny_models import _bytes_to_unicode

QWEN_MERGES = [("t", "h"), ("th", "e"), ("Ġ", "a"), ("i", "n"), ("Ġ", "t"), ("o", "f"), ("Ġ", "c"), ("a", "t")]
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEXT_HIDDEN = 32
LATENT_CHANNELS = 4
# Qwen-Image's published scheduler_config.json (Qwen/Qwen-Image, scheduler/)
QWEN_SCHEDULER = dict(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=8192, max_shift=0.9,
                      num_train_timesteps=1000, shift=1.0, shift_terminal=0.02, time_shift_type="exponential",
                      use_dynamic_shifting=True)


def qwen2_tokenizer(folder: Path):
    """A real-format Qwen2Tokenizer (byte-level BPE, 267 tokens) written into ``folder`` and loaded from it."""
    from transformers import Qwen2Tokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokens = _bytes_to_unicode() + [a + b for a, b in QWEN_MERGES] + QWEN_SPECIALS
    vocab = {t: i for i, t in enumerate(tokens)}
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in QWEN_MERGES),
                                       encoding="utf-8")
    tok = Qwen2Tokenizer(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"), unk_token="<|endoftext|>",
                         eos_token="<|im_end|>", pad_token="<|endoftext|>", model_max_length=131072)
    tok.add_special_tokens({"additional_special_tokens": QWEN_SPECIALS[1:]})
    return tok


def qwen_text_encoder(vocab_size: int, pad: int, seed: int = 0):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    text = dict(vocab_size=vocab_size, hidden_size=TEXT_HIDDEN, intermediate_size=48, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 1, 1]},
                bos_token_id=pad, eos_token_id=pad, pad_token_id=pad)
    vision = dict(depth=1, hidden_size=16, intermediate_size=24, num_heads=2, out_hidden_size=TEXT_HIDDEN,
                  patch_size=2, spatial_merge_size=1, temporal_patch_size=1, window_size=4, fullatt_block_indexes=[0])
    cfg = Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=vocab_size - 1,
                           video_token_id=vocab_size - 1, vision_start_token_id=vocab_size - 1,
                           vision_end_token_id=vocab_size - 1)
    torch.manual_seed(seed)
    return Qwen2_5_VLForConditionalGeneration(cfg).eval()


def qwen_transformer(seed: int = 0, layers: int = 2):
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(seed)
    return QwenImageTransformer2DModel(patch_size=2, in_channels=4 * LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
                                       num_layers=layers, attention_head_dim=8, num_attention_heads=2,
                                       joint_attention_dim=TEXT_HIDDEN, axes_dims_rope=(2, 2, 4))


def qwen_vae(seed: int = 0, blocks: int = 2):
    """The video VAE with non-trivial latent statistics; ``blocks`` 2: factor 2 (one spatial down-sampling, none in
    time), 1: factor 1."""
    from diffusers import AutoencoderKLQwenImage

    torch.manual_seed(seed)
    return AutoencoderKLQwenImage(base_dim=8, z_dim=LATENT_CHANNELS, dim_mult=[1, 2][:blocks], num_res_blocks=1,
                                  attn_scales=[], temperal_downsample=[False][:blocks - 1],
                                  latents_mean=[-0.7571, 0.1075, 0.9653, -0.1517],
                                  latents_std=[2.8184, 1.4541, 1.2196, 2.0743])


def qwen_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(**QWEN_SCHEDULER)


def qwenimage_pipeline(tmp: Path, seed: int = 0, vae_blocks: int = 2):
    """A complete tiny QwenImagePipeline; ``tmp`` receives the tokenizer files; ``vae_blocks`` as :func:`qwen_vae`."""
    from diffusers import QwenImagePipeline

    tok = qwen2_tokenizer(Path(tmp) / "qwen_vocab")
    te = qwen_text_encoder(len(tok), tok.pad_token_id, seed=seed + 50)
    return QwenImagePipeline(scheduler=qwen_scheduler(), vae=qwen_vae(seed, vae_blocks), text_encoder=te, tokenizer=tok,
                             transformer=qwen_transformer(seed))


_BUILT: dict = {}


def qwenimage_folders(tmp_path_factory) -> dict:
    """{"qwenimage": a saved tiny QwenImagePipeline folder, "qwenimage128": one with a factor-1 VAE (default
    resolution 128 px, what `flashdmd reward train` works at), "sam": a tiny SAM (the Pixel-GAN backbone)}, built
    once per test process (read only)."""
    if not _BUILT:
        from tiny_models import sam_vision_folder, save_pipeline
        tmp = tmp_path_factory.mktemp("tiny_qwenimage")
        _BUILT.update(qwenimage=save_pipeline(qwenimage_pipeline(tmp), tmp / "qwenimage"),
                      qwenimage128=save_pipeline(qwenimage_pipeline(tmp, vae_blocks=1), tmp / "qwenimage128"),
                      sam=sam_vision_folder(tmp / "sam"))
    return dict(_BUILT)
