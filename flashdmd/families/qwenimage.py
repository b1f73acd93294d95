"""Qwen-Image: QwenImageTransformer2DModel (double-stream MMDiT), rectified flow, Qwen2.5-VL text encoder, video VAE.

Conventions, matching ``QwenImagePipeline`` (diffusers 0.42):

* prompt embeds (B, L, D): the Qwen2.5-VL language model's last hidden state of the prompt wrapped in the pipeline's
  chat template (``PROMPT_TEMPLATE``), its first ``DROP_IDX`` (34) tokens -- the template's system part -- dropped,
  each row's real tokens kept and the rows padded with zeros to the longest, then cut at ``max_sequence_length``
  (512, the pipeline's ``__call__`` default; the tokenizer reads up to 1024 + 34 tokens). The mask (B, L) marks
  the real tokens (:attr:`Conditioning.prompt_mask`); the network gets it as ``encoder_hidden_states_mask`` (None
  when every token is real, as the pipeline's encode_prompt gives). There is no pooled text embedding: pooled =
  :func:`~flashdmd.families.parts.masked_mean` of the embeddings (read only by the LRM and the Pixel-GAN head);
* true CFG (``true_cfg_scale``, default 4.0): the pipeline runs its unconditional branch only when a negative
  prompt is given; flashdmd's unconditional branch is the negative prompt ``NEGATIVE_PROMPT`` = " ", the one the
  model's authors use. The pipeline's guided velocity is not plain CFG: it is rescaled per token to the
  conditional prediction's norm, ``comb * |cond| / |comb|`` with ``comb = uncond + w (cond - uncond)`` and the norms
  over each packed token's 4C channels; :meth:`QwenImageFamily.raw_prediction` does exactly that, so a DM loss's
  guided teacher is the pipeline's;
* latents stay (B, C, H/8, W/8) everywhere in flashdmd, C = 16; the video VAE's latents are 5-D (B, C, 1, h, w):
  the frame axis is added and removed inside :meth:`encode_images` / :meth:`decode_latents`, as is the VAE's
  per-channel normalisation ``latents = (z - latents_mean) / latents_std``. Only the network sees the latents
  packed 2x2 into (B, h/2 * w/2, 4C) tokens (FLUX's packing) with ``img_shapes`` [(1, h/2, w/2)] per row; its
  output is unpacked again;
* the network predicts the flow velocity u = eps - x0 at sigma = t / 1000;
* the noise shift is resolution-dependent like FLUX.1's (``calculate_shift`` of the image-token count with
  Qwen-Image's own base/max shift and sequence lengths); :meth:`use_resolution` rebuilds the schedule. The
  scheduler's ``shift_terminal`` (0.02) only stretches the pipeline's own sampling grid
  (:meth:`scheduler_timesteps` reproduces it); flashdmd's student timesteps and DM-loss noise use the shift alone;
* the default resolution is the pipeline's ``default_sample_size`` 128 x the VAE factor 8 = 1024 px (the model card
  also lists 1328 px for 1:1; the pipeline defaults to 1024).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from flashdmd import FlashDMDError
from flashdmd.families.flux import STUDENT_SIGMAS, FluxFamily, pack, unpack
from flashdmd.families.parts import Conditioning, input_dtype, masked_mean, network_call, unwrap

PROMPT_TEMPLATE = ("<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, "
                   "text, spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}"
                   "<|im_end|>\n<|im_start|>assistant\n")
DROP_IDX = 34                 # QwenImagePipeline.prompt_template_encode_start_idx
TOKENIZER_MAX_LENGTH = 1024   # QwenImagePipeline.tokenizer_max_length
MAX_SEQUENCE_LENGTH = 512     # QwenImagePipeline.__call__'s max_sequence_length default
TRUE_CFG_SCALE = 4.0          # QwenImagePipeline.__call__'s true_cfg_scale default
NEGATIVE_PROMPT = " "         # the model card's negative prompt ("using an empty string if you do not have ...")


def rescaled_cfg(uncond: Tensor, cond: Tensor, scale: float) -> Tensor:
    """QwenImagePipeline's true CFG on (B, C, h, w) velocities: ``comb = uncond + w (cond - uncond)``, then each
    packed token (2x2 patch x C channels) rescaled to the conditional prediction's norm, ``comb * |cond| / |comb|``
    (the same operations, in the pipeline's packed layout)."""
    h, w = cond.shape[-2:]
    cond_t, comb_t = pack(cond), pack(uncond + scale * (cond - uncond))
    cond_norm = torch.norm(cond_t, dim=-1, keepdim=True)
    noise_norm = torch.norm(comb_t, dim=-1, keepdim=True)
    return unpack(comb_t * (cond_norm / noise_norm), h, w)


def _split_real_tokens(hidden: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
    """QwenImagePipeline._get_qwen_prompt_embeds after the encoder: each row's real tokens less the template's first
    DROP_IDX, zero-padded to the longest row; and their mask (1 real, 0 padding)."""
    keep = attention_mask.bool()
    rows = [e[DROP_IDX:] for e in torch.split(hidden[keep], keep.sum(dim=1).tolist(), dim=0)]
    longest = max(r.size(0) for r in rows)
    embeds = torch.stack([torch.cat([r, r.new_zeros(longest - r.size(0), r.size(1))]) for r in rows])
    mask = torch.stack([torch.cat([torch.ones(r.size(0), dtype=torch.long, device=r.device),
                                   torch.zeros(longest - r.size(0), dtype=torch.long, device=r.device)])
                        for r in rows])
    return embeds, mask


class QwenImageFamily(FluxFamily):
    """QwenImagePipeline folders (see the module docstring for the conventions). Packing, the dynamic shift, the
    pipeline's timestep grid and per-step noise are FLUX.1's (:class:`~flashdmd.families.flux.FluxFamily`)."""
    offload_blocks = ("QwenImageTransformerBlock",)

    name = "qwenimage"
    pipeline_class = "QwenImagePipeline"
    denoiser_subfolder = "transformer"
    text_parts = ("text_encoder",)
    tokenizer_parts = ("tokenizer",)
    max_sequence_length = MAX_SEQUENCE_LENGTH
    pipeline_guidance_default = TRUE_CFG_SCALE
    pipeline_guidance_kwarg = "true_cfg_scale"
    pipeline_sigma_grid = "linspace"  # QwenImagePipeline hands its scheduler sigmas linspace(1, 1/K, K) and mu

    @classmethod
    def exported_guidance(cls, info: dict, teacher) -> float:
        """1: the teacher's true CFG is distilled in (the exported pipeline runs no CFG without a negative prompt)."""
        return 1.0

    def _load_parts(self) -> None:
        super()._load_parts()
        if unwrap(self.denoiser).config.get("guidance_embeds", False):
            raise FlashDMDError(f"{self.path}/transformer/config.json sets guidance_embeds, which QwenImagePipeline "
                                "does not support yet; use a true-CFG Qwen-Image transformer")

    @property
    def vae_scale_factor(self) -> int:
        """2 ** len(vae.temperal_downsample), as QwenImagePipeline (8 for Qwen-Image's VAE)."""
        return 2 ** len(self.vae.temperal_downsample)

    @property
    def default_student_timesteps(self) -> list[float]:
        """Uniform unshifted sigmas (1, 0.75, 0.5, 0.25) through the resolution's shift k = exp(mu), computed as the
        scheduler's exponential time shift does -- k / (k + (1/s - 1)) in float64, then float32 times 1000 -- so
        that sigma 1 stays exactly 1000 (the float32 form k s / (1 + (k - 1) s) can round it above 1000)."""
        k, n = self.schedule.shift, self.schedule.num_train_timesteps
        return [float(torch.tensor(k / (k + (1 / s - 1)), dtype=torch.float32) * n) for s in STUDENT_SIGMAS]

    # -- text --------------------------------------------------------------------------------------

    def _encode_text(self, prompts: list[str]) -> tuple[Tensor, Tensor, Tensor]:
        """QwenImagePipeline.encode_prompt (``_get_qwen_prompt_embeds``, cut at max_sequence_length) + the mask."""
        (tok,), (enc,) = self.tokenizers, self.text_encoders
        tokens = tok([PROMPT_TEMPLATE.format(p) for p in prompts], max_length=TOKENIZER_MAX_LENGTH + DROP_IDX,
                     padding=True, truncation=True, return_tensors="pt")
        full = bool(tokens.attention_mask.all())
        # on the meta device (`flashdmd plan`) the language model's mask handling reads values; an unpadded batch
        # (the plan's) needs no mask: the causal attention is the same
        meta = enc.device.type == "meta"
        attention = None if meta and full else tokens.attention_mask.to(self.device)
        hidden = enc(input_ids=tokens.input_ids.to(self.device), attention_mask=attention,
                     output_hidden_states=True).hidden_states[-1]
        if full:  # every row is its real tokens: the pipeline's split-and-stack is this slice
            embeds = hidden[:, DROP_IDX:]
            mask = torch.ones(embeds.shape[:2], dtype=torch.long)
        else:
            embeds, mask = _split_real_tokens(hidden, tokens.attention_mask.to(hidden.device))
        embeds = embeds.to(dtype=enc.dtype)[:, :self.max_sequence_length].to(self.device)
        mask = mask[:, :self.max_sequence_length].to(self.device)
        return embeds, masked_mean(embeds, mask), mask

    def _null_text(self) -> tuple[Tensor, ...]:
        return self._encode_text([NEGATIVE_PROMPT])

    # -- network -----------------------------------------------------------------------------------

    def raw_prediction(self, net: nn.Module, x_t: Tensor, t: Tensor, cond: Conditioning,
                       guidance_scale: float = 1.0, uncond: Conditioning | None = None) -> Tensor:
        """One conditional forward at w = 1; otherwise one batched forward of [uncond; cond] combined by
        :func:`rescaled_cfg` (the pipeline's true CFG with its norm rescaling)."""
        t = self._timesteps(t, x_t)
        if guidance_scale == 1.0:
            return self._forward(net, x_t, t, cond)
        uncond = self._default_uncond(cond) if uncond is None else uncond
        both = self._forward(net, torch.cat([x_t, x_t]), torch.cat([t, t]), Conditioning.cat([uncond, cond]))
        pred_uncond, pred_cond = both.chunk(2)
        return rescaled_cfg(pred_uncond, pred_cond, guidance_scale)

    def _forward(self, net: nn.Module, x_t: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        dtype = input_dtype(net)
        b, _, h, w = x_t.shape
        mask = cond.prompt_mask
        # no padding: no mask, as QwenImagePipeline.encode_prompt hands the network (on the meta device of `flashdmd
        # plan` the values are unknown and the mask goes in: the planner traces masked attention as fused)
        if mask is not None and mask.device.type != "meta" and bool(mask.all()):
            mask = None
        out = net(hidden_states=pack(x_t.to(dtype)), timestep=t.to(dtype) / 1000,
                  encoder_hidden_states=cond.prompt_embeds.to(dtype), encoder_hidden_states_mask=mask,
                  img_shapes=[[(1, h // 2, w // 2)]] * b, return_dict=False)[0]
        return unpack(out, h, w).to(x_t.dtype)

    def _feature_modules(self, net: nn.Module) -> list[nn.Module]:
        """Every double-stream block (each returns (text tokens, image tokens), as FLUX's)."""
        return list(net.transformer_blocks)

    # -- latent space ------------------------------------------------------------------------------

    def _latent_stats(self, like: Tensor) -> tuple[Tensor, Tensor]:
        """The VAE's per-channel latents_mean and 1 / latents_std, (1, C, 1, 1, 1), as the pipelines build them."""
        c = self.vae.config
        mean = torch.tensor(c.latents_mean).view(1, c.z_dim, 1, 1, 1).to(like.device, like.dtype)
        inv_std = 1.0 / torch.tensor(c.latents_std).view(1, c.z_dim, 1, 1, 1).to(like.device, like.dtype)
        return mean, inv_std

    @property
    def scaling_factor(self) -> float:
        return 1.0  # per-channel: latents_std (see encode_images)

    @property
    def shift_factor(self) -> float:
        return 0.0  # per-channel: latents_mean

    def encode_images(self, pixels: Tensor, sample: bool = False,
                      generator: torch.Generator | None = None) -> Tensor:
        """Pixels (B,3,H,W) in [-1,1] -> latents (z - latents_mean) / latents_std (B,C,h,w), as the Qwen-Image img2img
        pipeline's ``_encode_vae_image``; z (one frame) is the posterior mode unless ``sample``."""
        with network_call("VAE encoder", self.vae, pixels):
            dist = self.vae.encode(pixels.to(self.device, self.vae.dtype).unsqueeze(2)).latent_dist
        z = dist.sample(generator) if sample else dist.mode()
        mean, inv_std = self._latent_stats(z)
        return ((z - mean) * inv_std)[:, :, 0].to(pixels.dtype)

    def decode_latents(self, latents: Tensor) -> Tensor:
        """Latents (B,C,h,w) -> pixels (B,3,H,W), as QwenImagePipeline's decode: z = latents / (1 / latents_std) +
        latents_mean on one frame, in the VAE's dtype."""
        z = latents.to(self.device, self.vae.dtype).unsqueeze(2)
        mean, inv_std = self._latent_stats(z)
        with network_call("VAE decoder", self.vae, latents):
            return self.vae.decode(z / inv_std + mean, return_dict=False)[0][:, :, 0].to(latents.dtype)
