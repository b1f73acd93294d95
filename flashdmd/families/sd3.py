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

Without T5 the 256 zero T5 tokens are alike at every layer (each context token passes the same per-token
operations, and no position enters them), so as keys and values they weigh as one zero token whose attention logit
gets + log 256: :class:`CountedZeroT5Processor` computes the same output from 1 such token instead of 256, up to
float round-off (``model_zero_t5``: counted / padded / auto, the family's :attr:`SD3Family.zero_t5`).
"""
from __future__ import annotations

from typing import Any

import math

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import JointAttnProcessor2_0
from torch import Tensor, nn

from flashdmd import FlashDMDError
from flashdmd.choices import ZERO_T5_MODES
from flashdmd.diffusion import FlowSchedule
from flashdmd.families.base import Family
from flashdmd.families.parts import Conditioning, input_dtype, unwrap

STUDENT_SIGMAS = (1.0, 0.75, 0.5, 0.25)


class CountedZeroT5Processor:
    """``JointAttnProcessor2_0`` plus an additive per-key logit bias ``attention_mask`` (B, 1, 1, N_img + L_ctx).

    With the context ``[clip_tokens, one zero token]`` and a bias of log(n) on the zero token's key, a transformer
    computes what it computes on ``[clip_tokens, n zero tokens]`` (n identical keys and values contribute
    n * exp(logit)). Without a mask it is the default processor's attention. A block's image-only attention
    (SD3.5's ``attn2``, no context) gets the same keyword arguments and ignores the mask: its keys carry no bias.
    """

    def __call__(self, attn, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                 attention_mask: Tensor | None = None, *args, **kwargs):
        b, n_img = hidden_states.shape[:2]

        def heads(x: Tensor) -> Tensor:
            return x.view(b, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)

        q, k, v = heads(attn.to_q(hidden_states)), heads(attn.to_k(hidden_states)), heads(attn.to_v(hidden_states))
        if attn.norm_q is not None:
            q, k = attn.norm_q(q), attn.norm_k(k)
        if encoder_hidden_states is None:
            out = F.scaled_dot_product_attention(q, k, v)
            return attn.to_out[1](attn.to_out[0](out.transpose(1, 2).reshape(b, -1, attn.heads * q.shape[-1])))
        cq, ck = heads(attn.add_q_proj(encoder_hidden_states)), heads(attn.add_k_proj(encoder_hidden_states))
        cv = heads(attn.add_v_proj(encoder_hidden_states))
        if attn.norm_added_q is not None:
            cq, ck = attn.norm_added_q(cq), attn.norm_added_k(ck)
        q, k, v = torch.cat([q, cq], 2), torch.cat([k, ck], 2), torch.cat([v, cv], 2)
        mask = None if attention_mask is None else attention_mask.to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out = out.transpose(1, 2).reshape(b, -1, attn.heads * q.shape[-1]).to(q.dtype)
        out, ctx = out[:, :n_img], out[:, n_img:]
        if not attn.context_pre_only:
            ctx = attn.to_add_out(ctx)
        return attn.to_out[1](attn.to_out[0](out)), ctx


def count_zero_tokens(context: Tensor, n_img_tokens: int, counts: Tensor) -> tuple[Tensor, Tensor]:
    """(context (B, L + 1, D): ``context`` (B, L, D) and one zero token, the key bias (B, 1, 1, n_img + L + 1) that
    makes that token weigh as ``counts`` (B,) zero tokens (each >= 1)) for :class:`CountedZeroT5Processor`."""
    b, l, d = context.shape
    ctx = torch.cat([context, context.new_zeros(b, 1, d)], dim=1)
    bias = context.new_zeros(b, 1, 1, n_img_tokens + l + 1)
    bias[:, 0, 0, -1] = counts.to(context.dtype).clamp_min(1).log()
    return ctx, bias


def counts_zero_t5_on(mode: str, device_type: str) -> bool:
    """Whether model_zero_t5 ``mode`` counts SD3's zero T5 tokens in a forward on a ``device_type`` device (auto:
    on the CPU only), for a teacher without T5."""
    if mode not in ZERO_T5_MODES:
        raise FlashDMDError(f"model_zero_t5 must be one of {', '.join(ZERO_T5_MODES)}, got {mode!r}")
    return mode == "counted" or (mode == "auto" and device_type == "cpu")


def use_counted_zero_t5(transformer: nn.Module) -> None:
    """Install :class:`CountedZeroT5Processor` in every attention of ``transformer`` (once)."""
    if not getattr(transformer, "_counted_zero_t5", False):
        transformer.set_attn_processor(CountedZeroT5Processor())
        transformer._counted_zero_t5 = True


def use_default_attention(transformer: nn.Module) -> None:
    transformer.set_attn_processor(JointAttnProcessor2_0())
    transformer._counted_zero_t5 = False


class SD3Family(Family):
    """StableDiffusion3Pipeline folders (see the module docstring for the conventions)."""
    offload_blocks = ("JointTransformerBlock",)

    name = "sd3"
    pipeline_class = "StableDiffusion3Pipeline"
    denoiser_subfolder = "transformer"
    pipeline_guidance_default = 7.0
    optional_text_parts = (("text_encoder_3", "tokenizer_3"),)
    max_sequence_length = 256
    # model_zero_t5, set by a run: without T5, the 256 zero T5 tokens as one counted token (counted), as the
    # pipeline passes them (padded), or counted on the CPU and padded on a GPU (auto; see config.model_zero_t5)
    zero_t5: str = "auto"

    def _load_parts(self) -> None:
        super()._load_parts()
        self.has_t5 = self.text_encoders[2] is not None  # known after release_text_encoders too

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

    def counts_zero_t5(self, device: torch.device) -> bool:
        """Whether a forward on ``device`` passes the zero T5 tokens as one counted token (model_zero_t5)."""
        return counts_zero_t5_on(self.zero_t5, device.type) and not self.has_t5

    def run_notes(self) -> list[str]:
        if self.has_t5:
            return []
        mode = "counted as one" if self.counts_zero_t5(self.device) else "padded"
        return [f"no text_encoder_3 (T5): its {self.max_sequence_length} zero tokens {mode} "
                f"(model_zero_t5: {self.zero_t5})"]

    def _forward(self, net: nn.Module, x_t: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        dtype = input_dtype(net)  # a LoRA net: its base's dtype
        context, kwargs = cond.prompt_embeds.to(dtype), None
        if self.counts_zero_t5(x_t.device):
            inner = unwrap(net)
            use_counted_zero_t5(inner)
            patch = int(inner.config.patch_size)
            n_img = (x_t.shape[-2] // patch) * (x_t.shape[-1] // patch)
            n = self.max_sequence_length  # the trailing tokens: zeros without T5 (_t5)
            context, bias = count_zero_tokens(context[:, :-n], n_img, x_t.new_full((len(x_t),), float(n)))
            kwargs = {"attention_mask": bias}  # in the context's dtype
        out = net(hidden_states=x_t.to(dtype), timestep=t, encoder_hidden_states=context,
                  pooled_projections=cond.pooled_embeds.to(dtype), joint_attention_kwargs=kwargs, return_dict=False)[0]
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
