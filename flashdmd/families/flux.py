"""FLUX.1: FluxTransformer2DModel (double- and single-stream MMDiT), rectified flow, CLIP-L pooled + T5.

Conventions, matching ``FluxPipeline`` (diffusers 0.42):

* prompt embeds (B, L, D_t5): T5's last hidden state (``max_sequence_length`` 512, padded to it); pooled (B, P):
  CLIP-L's ``pooler_output`` (tokenizer length 77). Text position ids are zeros (L, 3). The unconditional branch
  (true CFG, schnell-style models) is the "" prompt;
* latents stay (B, C, H/8, W/8) everywhere in flashdmd, C = the VAE's latent channels (16); only the network sees
  them packed 2x2 into (B, H/16 * W/16, 4C) tokens with image position ids (0, row, col), and its output is
  unpacked again -- so every loss, sampler and schedule works on ordinary latent maps;
* the network predicts the flow velocity u = eps - x0; it is called at sigma = t / 1000 (it scales by 1000
  itself); latents = (z - shift_factor) * scaling_factor;
* the noise shift is resolution-dependent (the scheduler's ``use_dynamic_shifting``): mu is linear in the
  number of image tokens between (base_image_seq_len, base_shift) and (max_image_seq_len, max_shift), and the
  exponential time shift with exp(mu) is exactly :class:`~flashdmd.diffusion.FlowSchedule`'s shift
  s' = k s / (1 + (k - 1) s) with k = exp(mu). :meth:`use_resolution` rebuilds the schedule for a run's
  resolution (the default resolution's at load), so student steps, DM-loss noise and samplers all follow it;
* guidance-distilled models (FLUX.1-dev, ``guidance_embeds``) take guidance as an input embedding, not as a
  CFG pair: a guidance scale w != 1 becomes one conditional forward with guidance w (the DM loss's teacher,
  ``dm_guidance_scale``); w = 1 -- no guidance asked, what the student and the fake score always get -- becomes
  the fixed :attr:`embedded_guidance` (``model_embedded_guidance``, 3.5 by default: FluxPipeline's default).
  Models without it (FLUX.1-schnell) use ordinary CFG with the "" prompt, like SD3.
"""
from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers.utils.torch_utils import randn_tensor
from torch import Tensor, nn

from flashdmd import io
from flashdmd.diffusion import FlowSchedule
from flashdmd.families.base import Family
from flashdmd.families.parts import Conditioning, input_dtype, unwrap

STUDENT_SIGMAS = (1.0, 0.75, 0.5, 0.25)
DEFAULT_SAMPLE_SIZE = 128  # FluxPipeline.default_sample_size: 1024 px with the 8x VAE
DEFAULT_EMBEDDED_GUIDANCE = 3.5  # FluxPipeline's default guidance_scale


def pack(latents: Tensor) -> Tensor:
    """(B, C, h, w) -> (B, h/2 * w/2, 4C), as FluxPipeline._pack_latents."""
    b, c, h, w = latents.shape
    return latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: Tensor, h: int, w: int) -> Tensor:
    """(B, h/2 * w/2, 4C) -> (B, C, h, w), as FluxPipeline._unpack_latents."""
    b, _, c4 = tokens.shape
    return tokens.view(b, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c4 // 4, h, w)


def image_ids(h: int, w: int, device, dtype) -> Tensor:
    """(h/2 * w/2, 3) position ids (0, row, col) of the packed tokens, as FluxPipeline._prepare_latent_image_ids."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] += torch.arange(h // 2)[:, None]
    ids[..., 2] += torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


class FluxFamily(Family):
    """FluxPipeline folders (see the module docstring for the conventions)."""
    offload_blocks = ("FluxTransformerBlock", "FluxSingleTransformerBlock")

    name = "flux"
    pipeline_class = "FluxPipeline"
    denoiser_subfolder = "transformer"
    max_sequence_length = 512
    embedded_guidance: float = DEFAULT_EMBEDDED_GUIDANCE
    pipeline_guidance_default = DEFAULT_EMBEDDED_GUIDANCE
    pipeline_sigma_grid = "linspace"  # FluxPipeline hands its scheduler sigmas linspace(1, 1/K, K) and mu
    latent_patch = 2  # the transformer takes 2x2 latent patches as tokens

    @classmethod
    def exported_guidance(cls, info: dict, teacher) -> float:
        """A guidance-distilled student is called with the embedded guidance it was trained with; others with 1."""
        config = io.read_json(Path(teacher) / cls.denoiser_subfolder / "config.json")
        return float(info.get("embedded_guidance", DEFAULT_EMBEDDED_GUIDANCE)) if config.get("guidance_embeds") \
            else 1.0

    def _make_schedule(self, config: dict) -> FlowSchedule:
        self.prediction_type = "flow"
        self._scheduler_config = config
        side = DEFAULT_SAMPLE_SIZE * self.vae_scale_factor
        return FlowSchedule(num_train_timesteps=int(config.get("num_train_timesteps", 1000)),
                            shift=self.shift_at(side, side, config))

    def shift_at(self, height: int, width: int, config: dict | None = None) -> float:
        """The flow shift at (height, width) pixels: exp(mu(image tokens)) with dynamic shifting (FluxPipeline's
        calculate_shift), else the scheduler's fixed ``shift``."""
        config = config if config is not None else self._scheduler_config
        if not config.get("use_dynamic_shifting", False):
            return float(config.get("shift", 1.0))
        f = self.vae_scale_factor
        seq = (height // f // 2) * (width // f // 2)
        base_len, max_len = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
        base, top = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
        m = (top - base) / (max_len - base_len)
        return math.exp(seq * m + base - m * base_len)

    def use_resolution(self, height: int, width: int) -> None:
        """Rebuild the schedule for (height, width): the dynamic shift depends on the image's token count."""
        self.check_resolution(height, width)
        self.schedule = FlowSchedule(num_train_timesteps=self.schedule.num_train_timesteps,
                                     shift=self.shift_at(height, width))

    def scheduler_timesteps(self, steps: int) -> list[float]:
        """FluxPipeline's: sigmas linspace(1, 1/steps, steps) through the scheduler with mu = ln(shift) at the
        current resolution (``use_resolution``)."""

        sched = copy.deepcopy(self.scheduler)
        kwargs = {"mu": math.log(self.schedule.shift)} if self._scheduler_config.get("use_dynamic_shifting") else {}
        sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), **kwargs)
        return [float(t) for t in sched.timesteps]

    @property
    def default_resolution(self) -> int:
        return DEFAULT_SAMPLE_SIZE * self.vae_scale_factor

    @property
    def latent_channels(self) -> int:
        return int(unwrap(self.denoiser).config.in_channels) // 4

    @property
    def default_student_timesteps(self) -> list[float]:
        """Uniform unshifted sigmas (1, 0.75, 0.5, 0.25) through the resolution's shift (as SD3's adapter does with
        its fixed shift; FluxPipeline shifts its own sigmas the same way)."""
        return [float(t) for t in self.schedule.shifted_timesteps(torch.tensor(STUDENT_SIGMAS)).tolist()]

    # -- text --------------------------------------------------------------------------------------

    def _encode_text(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        (tok1, tok2), (clip, t5) = self.tokenizers, self.text_encoders
        ids = tok1(prompts, padding="max_length", max_length=tok1.model_max_length, truncation=True,
                   return_tensors="pt").input_ids
        pooled = clip(ids.to(self.device), output_hidden_states=False).pooler_output
        ids = tok2(prompts, padding="max_length", max_length=self.max_sequence_length, truncation=True,
                   return_tensors="pt").input_ids
        embeds = t5(ids.to(self.device), output_hidden_states=False)[0]
        return embeds.to(self.device, t5.dtype), pooled.to(self.device, clip.dtype)

    # -- network -----------------------------------------------------------------------------------

    @staticmethod
    def guidance_embedded(net: nn.Module) -> bool:
        return bool(unwrap(net).config.get("guidance_embeds", False))

    def raw_prediction(self, net: nn.Module, x_t: Tensor, t: Tensor, cond: Conditioning,
                       guidance_scale: float = 1.0, uncond: Conditioning | None = None) -> Tensor:
        """Guidance-distilled nets: one conditional forward with the guidance embedding (w, or the fixed
        :attr:`embedded_guidance` when w = 1); other nets: the base CFG pair."""
        if not self.guidance_embedded(net):
            return super().raw_prediction(net, x_t, t, cond, guidance_scale, uncond)
        g = self.embedded_guidance if guidance_scale == 1.0 else guidance_scale
        return self._forward(net, x_t, self._timesteps(t, x_t), cond, guidance=g)

    def _forward(self, net: nn.Module, x_t: Tensor, t: Tensor, cond: Conditioning,
                 guidance: float | None = None) -> Tensor:
        dtype = input_dtype(net)
        b, _, h, w = x_t.shape
        kwargs = {}
        if self.guidance_embedded(net):
            g = self.embedded_guidance if guidance is None else guidance
            kwargs["guidance"] = torch.full((b,), float(g), device=x_t.device, dtype=torch.float32)
        txt_ids = torch.zeros(cond.prompt_embeds.shape[1], 3, device=x_t.device, dtype=dtype)
        out = net(hidden_states=pack(x_t.to(dtype)), timestep=(t / 1000).to(dtype),
                  pooled_projections=cond.pooled_embeds.to(dtype), encoder_hidden_states=cond.prompt_embeds.to(dtype),
                  txt_ids=txt_ids, img_ids=image_ids(h, w, x_t.device, dtype), return_dict=False, **kwargs)[0]
        return unpack(out, h, w).to(x_t.dtype)

    def step_noise(self, x0: Tensor, generator=None) -> Tensor:
        """FluxPipeline's scheduler draws each step's noise in the packed token layout."""
        b, c, h, w = x0.shape
        return unpack(randn_tensor((b, (h // 2) * (w // 2), 4 * c), generator=generator, device=x0.device,
                                   dtype=x0.dtype), h, w)

    def _feature_modules(self, net: nn.Module) -> list[nn.Module]:
        """Every double-stream block, then every single-stream block."""
        return list(net.transformer_blocks) + list(net.single_transformer_blocks)

    def _feature_map(self, output: Any, x_t: Tensor) -> Tensor:
        # both block kinds return (context tokens, image tokens (B, h/2 * w/2, C)), tokens row-major
        tokens = output[1]
        b, _, c = tokens.shape
        h, w = x_t.shape[-2:]
        return tokens.reshape(b, h // 2, w // 2, c).permute(0, 3, 1, 2)
