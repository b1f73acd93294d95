"""Configs and builders of the embedded world's generative models (real diffusers/transformers classes).

Both world families share one VAE and two CLIP text encoders, like SDXL and SD3 do:

* ``AutoencoderKL``: RGB 32x32 pixels in [-1, 1] -> latents (B, 4, 8, 8) (3 down blocks, factor 4).
  Latents are scaled as in diffusers: SDXL ``z = scaling_factor * x``, SD3
  ``z = scaling_factor * (x - shift_factor)``; the pretraining sets them from latent statistics.
* Two CLIP text encoders (hidden 64, projection 64, 16 positions). As in the real models, encoder 1 is
  a ``CLIPTextModelWithProjection`` in the SD3 folder and the same weights without the projection
  (``CLIPTextModel``) in the SDXL folder; encoder 2 is a ``CLIPTextModelWithProjection`` in both. The
  pipelines use each encoder's penultimate hidden states, concatenated along features: (B, 16, 128);
  pooled embeddings are ``text_embeds_2`` (B, 64) for SDXL and [text_embeds_1, text_embeds_2] (B, 128) for SD3.
* SDXL teacher: ``UNet2DConditionModel`` on (B, 4, 8, 8), eps prediction, ``text_time`` added
  conditioning with add_time_ids (orig_h, orig_w, crop_top, crop_left, target_h, target_w) = (32, 32, 0, 0, 32, 32).
* SD3 teacher: ``SD3Transformer2DModel`` (MMDiT, patch 2) on (B, 4, 8, 8), flow (u = eps - x0) prediction.
  Without T5, ``StableDiffusion3Pipeline`` feeds 16 CLIP tokens followed by ``max_sequence_length`` (default
  256) all-zero "T5" tokens. All zero tokens are identical throughout the network, so they act like one
  token whose attention logit is raised by log(count); the SD3 family's ``CountedZeroT5Processor`` uses that to
  train (and the family to distil) at the cost of 17 context tokens, computing what the pipeline computes.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from diffusers import (AutoencoderKL, EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                       UNet2DConditionModel)
from torch import Tensor, nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from flashdmd import FlashDMDError

LATENT_CHANNELS = 4
IMAGE_SIZE = 32
LATENT_SIZE = 8
TIME_IDS = (IMAGE_SIZE, IMAGE_SIZE, 0, 0, IMAGE_SIZE, IMAGE_SIZE)  # SDXL add_time_ids at 32x32, no crop
SD3_T5_TOKENS = 256  # StableDiffusion3Pipeline's default max_sequence_length (zero T5 tokens without T5)

VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=LATENT_CHANNELS, sample_size=IMAGE_SIZE,
    down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(32, 64, 64), layers_per_block=1, norm_num_groups=32, act_fn="silu",
    force_upcast=False,
)

TEXT_ENCODER_CONFIG = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                           projection_dim=64, hidden_act="quick_gelu")
TEXT_ENCODER_2_CONFIG = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                             projection_dim=64, hidden_act="quick_gelu")

ADDITION_TIME_EMBED_DIM = 16


def text_dims() -> dict[str, int]:
    """Feature sizes the teachers are built for: token (concat), SDXL pooled, SD3 pooled."""
    h1, h2 = TEXT_ENCODER_CONFIG["hidden_size"], TEXT_ENCODER_2_CONFIG["hidden_size"]
    p2 = TEXT_ENCODER_2_CONFIG["projection_dim"]
    p1 = TEXT_ENCODER_CONFIG["projection_dim"]
    return {"tokens": h1 + h2, "sdxl_pooled": p2, "sd3_pooled": p1 + p2}


def unet_config() -> dict:
    """SDXL-style UNet for 8x8x4 latents: levels 8x8 (64 ch, no attention), 4x4 and 2x2 (96 ch, cross-attention)."""
    dims = text_dims()
    return dict(
        sample_size=LATENT_SIZE, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(64, 96, 96), layers_per_block=1, transformer_layers_per_block=1,
        attention_head_dim=(2, 3, 3), norm_num_groups=32, cross_attention_dim=dims["tokens"],
        use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=ADDITION_TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=6 * ADDITION_TIME_EMBED_DIM + dims["sdxl_pooled"],
    )


def transformer_config() -> dict:
    """SD3-style MMDiT for 8x8x4 latents: patch 2 (16 image tokens), width 128 (4 heads x 32), 8 blocks."""
    dims = text_dims()
    return dict(
        sample_size=LATENT_SIZE, patch_size=2, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
        num_layers=8, attention_head_dim=32, num_attention_heads=4, joint_attention_dim=dims["tokens"],
        caption_projection_dim=128, pooled_projection_dim=dims["sd3_pooled"], pos_embed_max_size=LATENT_SIZE // 2,
    )


SDXL_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    prediction_type="epsilon", timestep_spacing="leading", steps_offset=1, interpolation_type="linear",
    use_karras_sigmas=False,
)
SD3_SCHEDULER_CONFIG = dict(num_train_timesteps=1000, shift=3.0)


# ---------------------------------------------------------------------------------------------- builders

def build_vae():
    return AutoencoderKL(**VAE_CONFIG)


def _clip_config(base: dict, tokenizer):
    return CLIPTextConfig(vocab_size=len(tokenizer), max_position_embeddings=tokenizer.model_max_length,
                          bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id, **base)


def build_text_encoders(tokenizer):
    """Two ``CLIPTextModelWithProjection`` sized for ``tokenizer`` (vocab, 16 positions, EOS id)."""
    if len(tokenizer) <= 100:
        raise FlashDMDError(f"tokenizer has only {len(tokenizer)} tokens: build it with flashdmd.world.tokenizer")
    return (CLIPTextModelWithProjection(_clip_config(TEXT_ENCODER_CONFIG, tokenizer)),
            CLIPTextModelWithProjection(_clip_config(TEXT_ENCODER_2_CONFIG, tokenizer)))


def without_projection(encoder):
    """The ``CLIPTextModel`` sharing ``encoder``'s transformer weights (SDXL's text_encoder layout)."""
    model = CLIPTextModel(encoder.config)
    target = set(model.state_dict())
    state = {}
    for k, v in encoder.state_dict().items():  # key prefixes differ between transformers versions
        name = k if k in target else k.removeprefix("text_model.")
        if name in target:
            state[name] = v
    model.load_state_dict(state, strict=True)
    return model


def build_unet():
    return UNet2DConditionModel(**unet_config())


def build_transformer():
    return SD3Transformer2DModel(**transformer_config())


def sdxl_scheduler():
    return EulerDiscreteScheduler(**SDXL_SCHEDULER_CONFIG)


def sd3_scheduler():
    return FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER_CONFIG)


def num_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ------------------------------------------------------------------------------------- text conditioning

@torch.no_grad()
def encode_text(tokenizer, text_encoder, text_encoder_2, prompts: list[str]) -> dict[str, Tensor]:
    """Encode prompts exactly as the SDXL/SD3 pipelines do (no clip_skip).

    Returns ``tokens`` (B, 16, h1+h2): concatenated penultimate hidden states; ``pooled_1`` (B, p1):
    text_encoder's text_embeds (None for a ``CLIPTextModel``); ``pooled_2`` (B, p2): text_encoder_2's.
    """
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    dev = next(text_encoder.parameters()).device
    out1 = text_encoder(ids.to(dev), output_hidden_states=True)
    out2 = text_encoder_2(ids.to(dev), output_hidden_states=True)
    tokens = torch.cat([out1.hidden_states[-2], out2.hidden_states[-2]], dim=-1)
    pooled_1 = out1[0] if out1[0].ndim == 2 else None
    return {"tokens": tokens, "pooled_1": pooled_1, "pooled_2": out2[0]}


def sdxl_time_ids(batch: int, device=None) -> Tensor:
    """(B, 6) SDXL add_time_ids for 32x32 generation without crop."""
    return torch.tensor(TIME_IDS, dtype=torch.float32, device=device).expand(batch, -1)


def sd3_conditioning(text: dict[str, Tensor], joint_attention_dim: int) -> tuple[Tensor, Tensor]:
    """(CLIP tokens padded to joint_attention_dim (B, 16, D), pooled (B, h1+p2)), as the SD3 pipeline builds
    them before appending the zero T5 tokens."""
    tokens = F.pad(text["tokens"], (0, joint_attention_dim - text["tokens"].shape[-1]))
    return tokens, torch.cat([text["pooled_1"], text["pooled_2"]], dim=-1)


# ------------------------------------------------------------- SD3 zero-T5 padding at the cost of one token
# (the SD3 family's counted zero T5 tokens: flashdmd.families.sd3.CountedZeroT5Processor)

def image_tokens(transformer) -> int:
    c = transformer.config
    return (c.sample_size // c.patch_size) ** 2


def log_uniform_counts(batch: int, hi: int = SD3_T5_TOKENS, p_default: float = 0.75,
                       generator: torch.Generator | None = None) -> Tensor:
    """Zero-T5 token counts to train on: ``hi`` (the pipeline default) with prob ``p_default``, else
    log-uniform in [1, hi], so the teacher also tolerates a shorter ``max_sequence_length``."""
    u = torch.rand(batch, generator=generator)
    other = torch.exp(torch.rand(batch, generator=generator) * math.log(hi)).round()
    return torch.where(u < p_default, torch.full_like(u, float(hi)), other)
