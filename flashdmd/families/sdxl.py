"""SDXL: eps-prediction UNet2DConditionModel (``text_time``), two CLIP text encoders, VP schedule.

Conventions, matching ``StableDiffusionXLPipeline`` (diffusers 0.42):

* prompt embeds (B, 77, D1+D2) = concat of both encoders' penultimate hidden states
  (``hidden_states[-2]``), each tokenized to ``model_max_length`` with padding; pooled (B, P) =
  ``text_encoder_2``'s projected ``text_embeds``;
* ``add_time_ids`` (B, 6) = (orig_h, orig_w, crop_top, crop_left, target_h, target_w) with
  orig = target = the image size and crop (0, 0);
* unconditional branch: zeros when the folder's ``force_zeros_for_empty_prompt`` is true (SDXL base's
  setting, and the pipeline's behaviour when no negative prompt is given), else the "" prompt;
* schedule: :class:`~flashdmd.diffusion.VPSchedule` from the scheduler config; the UNet sees x_VP
  directly (what Euler-type schedulers feed it after ``scale_model_input``);
* student steps: [999, 749, 499, 249] -- ``trailing`` spacing, starting at the top of the schedule.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from flashdmd import FlashDMDError
from flashdmd.diffusion import VPSchedule
from flashdmd.families.base import Family
from flashdmd.families.parts import Conditioning, input_dtype

# diffusers schedulers that work in sigma space (x = x0 + sigma*eps) and set init_noise_sigma by spacing
SIGMA_SPACE_SCHEDULERS = ("EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler",
                          "LMSDiscreteScheduler", "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler")
PREDICTION_TYPES = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}


class SDXLFamily(Family):
    """StableDiffusionXLPipeline folders (see the module docstring for the conventions)."""

    name = "sdxl"
    pipeline_class = "StableDiffusionXLPipeline"
    denoiser_subfolder = "unet"
    export_scheduler = "lcm"
    pipeline_guidance_default = 5.0
    lora_layers_kwarg = "unet"

    def _make_schedule(self, config: dict) -> VPSchedule:
        kind = config.get("prediction_type", "epsilon")
        if kind not in PREDICTION_TYPES:
            raise FlashDMDError(f"{self.path}/scheduler: prediction_type {kind!r} unsupported; "
                                f"use one of {sorted(PREDICTION_TYPES)}")
        if config.get("rescale_betas_zero_snr"):
            raise FlashDMDError(f"{self.path}/scheduler: rescale_betas_zero_snr is not supported; set it to false")
        self.prediction_type = PREDICTION_TYPES[kind]
        return VPSchedule(num_train_timesteps=int(config["num_train_timesteps"]),
                          beta_start=float(config["beta_start"]), beta_end=float(config["beta_end"]),
                          beta_schedule=config["beta_schedule"])

    @property
    def default_student_timesteps(self) -> list[float]:
        """[999, 749, 499, 249] for 1000 training steps: 4 ``trailing`` steps from the top of the schedule."""
        n = self.schedule.num_train_timesteps
        return [float(n - 1 - k * n // 4) for k in range(4)]

    @property
    def force_zeros_for_empty_prompt(self) -> bool:
        return bool(self.index.get("force_zeros_for_empty_prompt", True))

    def _pipeline_init_rule(self) -> str:
        config = self.scheduler.config
        sigma_space = type(self.scheduler).__name__ in SIGMA_SPACE_SCHEDULERS
        return "sigma" if sigma_space and config.get("timestep_spacing") in ("linspace", "trailing") else "noise"

    # -- text --------------------------------------------------------------------------------------

    def _encode_one(self, tokenizer, encoder, prompts: list[str]):
        ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids
        return encoder(ids.to(self.device), output_hidden_states=True)

    def _encode_text(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        (tok1, tok2), (enc1, enc2) = self.tokenizers, self.text_encoders
        out1 = self._encode_one(tok1, enc1, prompts)
        out2 = self._encode_one(tok2, enc2, prompts)
        embeds = torch.cat([out1.hidden_states[-2], out2.hidden_states[-2].to(out1.hidden_states[-2].device)], -1)
        return embeds.to(self.device, enc2.dtype), out2.text_embeds.to(self.device)

    def _null_text(self) -> tuple[Tensor, Tensor]:
        embeds, pooled = self._encode_text([""])
        if self.force_zeros_for_empty_prompt:
            return torch.zeros_like(embeds), torch.zeros_like(pooled)
        return embeds, pooled

    def _time_ids(self, batch: int, height: int, width: int) -> Tensor:
        row = torch.tensor([[height, width, 0, 0, height, width]], dtype=self.dtype, device=self.device)
        return row.repeat(batch, 1)

    # -- network -----------------------------------------------------------------------------------

    def _forward(self, net: nn.Module, x_t: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        if cond.add_time_ids is None:
            raise FlashDMDError("SDXL conditioning needs add_time_ids; build it with Family.encode_prompts")
        dtype = input_dtype(net)  # a LoRA net: its base's dtype
        added = {"text_embeds": cond.pooled_embeds.to(dtype), "time_ids": cond.add_time_ids.to(dtype)}
        out = net(x_t.to(dtype), t, encoder_hidden_states=cond.prompt_embeds.to(dtype),
                  added_cond_kwargs=added, return_dict=False)[0]
        return out.to(x_t.dtype)

    def _feature_modules(self, net: nn.Module) -> list[nn.Module]:
        """Every down block, then the mid block."""
        return list(net.down_blocks) + [net.mid_block]

    def _feature_map(self, output: Any, x_t: Tensor) -> Tensor:
        # down blocks return (hidden_states, residuals); the mid block returns hidden_states
        return output[0] if isinstance(output, tuple) else output
