"""SD3: SD3Transformer2DModel (MMDiT), rectified flow, CLIP-L + CLIP-G and an optional T5.

Conventions, matching ``StableDiffusion3Pipeline`` (diffusers 0.42):

* prompt embeds (B, 77 + 256, D_joint): the two CLIP encoders' penultimate hidden states concatenated
  on the feature axis, zero-padded to the T5 width, then concatenated on the sequence axis with the T5
  states (``max_sequence_length`` 256). Without ``text_encoder_3`` the T5 part is zeros of width
  ``transformer.config.joint_attention_dim``, exactly as the pipeline does. Pooled (B, P) = the two CLIP
  ``text_embeds`` concatenated. The unconditional branch is the "" prompt;
* the network predicts the flow velocity u = eps - x0 at t = 1000 * sigma;
  :class:`~flashdmd.diffusion.FlowSchedule` takes ``shift`` from the scheduler config (dynamic shifting
  is not supported);
* latents = (z - shift_factor) * scaling_factor.
"""
from __future__ import annotations

from typing import Any

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flashdmd import FlashDMDError
from flashdmd.diffusion import FlowSchedule
from flashdmd.families.base import Family
from flashdmd.families.parts import Conditioning, input_dtype, unwrap

STUDENT_SIGMAS = (1.0, 0.75, 0.5, 0.25)


class SD3Family(Family):
    """StableDiffusion3Pipeline folders (see the module docstring for the conventions)."""
    offload_blocks = ("JointTransformerBlock",)

    name = "sd3"
    pipeline_class = "StableDiffusion3Pipeline"
    denoiser_subfolder = "transformer"
    pipeline_guidance_default = 7.0
    optional_text_parts = (("text_encoder_3", "tokenizer_3"),)
    max_sequence_length = 256

    def _make_schedule(self, config: dict) -> FlowSchedule:
        if config.get("use_dynamic_shifting"):
            raise FlashDMDError(f"{self.path}/scheduler: use_dynamic_shifting is not supported; "
                                "set it to false and give a fixed shift")
        self.prediction_type = "flow"
        return FlowSchedule(num_train_timesteps=int(config.get("num_train_timesteps", 1000)),
                            shift=float(config.get("shift", 1.0)))

    def check_resolution(self, height: int, width: int) -> None:
        """The transformer crops its positional embeddings from a pos_embed_max_size^2 grid of patches: an image
        beyond that grid cannot be denoised (diffusers raises deep inside the forward)."""
        super().check_resolution(height, width)
        cfg = unwrap(self.denoiser).config
        grid, patch = cfg.get("pos_embed_max_size"), int(cfg.get("patch_size", 1))
        if grid is None:
            return
        most = int(grid) * patch * self.vae_scale_factor
        if max(height, width) > most:
            raise FlashDMDError(f"{height}x{width} px is beyond what this SD3 transformer supports: at most {most} px "
                                f"(pos_embed_max_size {grid} x patch {patch} x VAE factor {self.vae_scale_factor}); "
                                "lower data_resolution")

    @property
    def default_student_timesteps(self) -> list[float]:
        """Uniform unshifted sigmas (1, 0.75, 0.5, 0.25) passed through the scheduler's SD3 shift.

        With SD3's shift 3 this is t = 1000, 900, 750, 500. This is a deliberate choice: the shift moves
        the student's steps toward high noise, as the FLUX / SD3 DMD ports found necessary (the same shift
        the teacher was trained and is sampled with).
        """
        return [float(t) for t in self.schedule.shifted_timesteps(torch.tensor(STUDENT_SIGMAS)).tolist()]

    # -- text --------------------------------------------------------------------------------------

    def _clip(self, tokenizer, encoder, prompts: list[str]) -> tuple[Tensor, Tensor]:
        max_length = self.tokenizers[0].model_max_length  # the pipeline uses tokenizer 1's length for both
        ids = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True,
                        return_tensors="pt").input_ids
        out = encoder(ids.to(self.device), output_hidden_states=True)
        return out.hidden_states[-2].to(self.device, self.text_encoders[0].dtype), out[0].to(self.device)

    def _t5(self, prompts: list[str]) -> Tensor:
        tokenizer, encoder = self.tokenizers[2], self.text_encoders[2]
        if encoder is None:
            width = unwrap(self.denoiser).config.joint_attention_dim
            return torch.zeros(len(prompts), self.max_sequence_length, width, device=self.device,
                               dtype=self.text_encoders[0].dtype)
        ids = tokenizer(prompts, padding="max_length", max_length=self.max_sequence_length, truncation=True,
                        add_special_tokens=True, return_tensors="pt").input_ids
        return encoder(ids.to(self.device))[0].to(self.device, encoder.dtype)

    def _encode_text(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        embeds1, pooled1 = self._clip(self.tokenizers[0], self.text_encoders[0], prompts)
        embeds2, pooled2 = self._clip(self.tokenizers[1], self.text_encoders[1], prompts)
        t5 = self._t5(prompts)
        clip = torch.cat([embeds1, embeds2], dim=-1)
        clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return torch.cat([clip, t5], dim=-2), torch.cat([pooled1, pooled2], dim=-1)

    # -- network -----------------------------------------------------------------------------------

    def _forward(self, net: nn.Module, x_t: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        dtype = input_dtype(net)  # a LoRA net: its base's dtype
        out = net(hidden_states=x_t.to(dtype), timestep=t, encoder_hidden_states=cond.prompt_embeds.to(dtype),
                  pooled_projections=cond.pooled_embeds.to(dtype), return_dict=False)[0]
        return out.to(x_t.dtype)

    def _feature_modules(self, net: nn.Module) -> list[nn.Module]:
        """Every joint transformer block."""
        return list(net.transformer_blocks)

    def _feature_map(self, output: Any, x_t: Tensor) -> Tensor:
        # a joint block returns (context tokens or None, image tokens (B, h*w, C)), tokens row-major
        tokens = output[1]
        b, n, c = tokens.shape
        h, w = x_t.shape[-2:]
        patch = round(math.sqrt(h * w / n))
        return tokens.reshape(b, h // patch, w // patch, c).permute(0, 3, 1, 2)
