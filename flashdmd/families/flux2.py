"""FLUX.2: Flux2Transformer2DModel, AutoencoderKLFlux2, a language-model text encoder; two pipelines.

* ``flux2`` -- ``Flux2Pipeline`` (FLUX.2-dev): Mistral3ForConditionalGeneration (Mistral-Small-3.1) with its
  processor, the system message and chat template of the pipeline, hidden layers (10, 20, 30) stacked; the
  transformer is guidance-distilled (``guidance_embeds``): guidance is an input embedding, never a CFG pair.
* ``flux2-klein`` -- ``Flux2KleinPipeline`` (FLUX.2-klein): Qwen3ForCausalLM with Qwen2Tokenizer, the chat template
  with ``enable_thinking=False`` and the generation prompt, hidden layers (9, 18, 27) stacked; no guidance
  embedding: true CFG against the "" prompt (skipped, as in the pipeline, when the folder says ``is_distilled``).

Conventions shared, matching diffusers 0.42's pipelines:

* prompt embeds (B, 512, 3 D): the three hidden states concatenated per token, padded to ``max_sequence_length``
  512 -- the transformer sees every position, padding included, as the pipelines feed it; the tokenizer's attention
  mask is kept as ``prompt_mask`` for the pooled embedding only (:func:`masked_mean`; the network never reads
  it). Text position ids (B, L, 4) are (0, 0, 0, l);
* latents: the VAE's z (32 channels at H/8) is patchified 2x2 into (B, 128, H/16, W/16) and normalised by the VAE's
  batch-norm running statistics, ``(patchify(z) - mean) / sqrt(var + eps)`` -- what the transformer consumes, and
  the layout flashdmd's latents keep everywhere (so :attr:`vae_scale_factor` is twice the VAE's). Only ``_forward``
  flattens them into (B, h w, 128) tokens with image position ids (0, row, col, 0);
* the network predicts the flow velocity at sigma = t / 1000; the pipelines' noise shift is resolution AND step
  dependent (``compute_empirical_mu(image tokens, steps)``, exponential time shift exp(mu)): the schedule uses the
  shift of the student's 4 steps at the run's resolution (:meth:`use_resolution`) -- exactly the grid the exported
  4-step pipeline runs; :meth:`scheduler_timesteps` uses each step count's own mu.
"""
from __future__ import annotations

import copy
import math
from abc import abstractmethod
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE
from diffusers.utils.torch_utils import randn_tensor
from torch import Tensor, nn
from transformers import AutoTokenizer

from flashdmd import FlashDMDError, io
from flashdmd.diffusion import FlowSchedule
from flashdmd.families.base import Family
from flashdmd.families.parts import (Conditioning, check_tokenizer, input_dtype, masked_mean, network_call,
                                     unwrap)

STUDENT_SIGMAS = (1.0, 0.75, 0.5, 0.25)
DEFAULT_SAMPLE_SIZE = 128  # the pipelines' default_sample_size: 1024 px with the 8x VAE
PIPELINE_GUIDANCE = 4.0    # both pipelines' __call__ default guidance_scale
MAX_SEQUENCE_LENGTH = 512


def empirical_mu(image_seq_len: int, num_steps: int) -> float:
    """The FLUX.2 pipelines' compute_empirical_mu (the same float operations)."""
    a1, b1 = 8.73809524e-05, 1.89833333
    a2, b2 = 0.00016927, 0.45666666
    if image_seq_len > 4300:
        return float(a2 * image_seq_len + b2)
    m_200 = a2 * image_seq_len + b2
    m_10 = a1 * image_seq_len + b1
    a = (m_200 - m_10) / 190.0
    b = m_200 - 200.0 * a
    return float(a * num_steps + b)


def patchify(z: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, 4C, H/2, W/2), as the pipelines' _patchify_latents."""
    b, c, h, w = z.shape
    return z.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, c * 4, h // 2, w // 2)


def unpatchify(x: Tensor) -> Tensor:
    """(B, 4C, h, w) -> (B, C, 2h, 2w), as the pipelines' _unpatchify_latents."""
    b, c4, h, w = x.shape
    return x.reshape(b, c4 // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, c4 // 4, h * 2, w * 2)


def pack(x: Tensor) -> Tensor:
    """(B, C, h, w) -> (B, h w, C) tokens, row-major, as the pipelines' _pack_latents."""
    b, c, h, w = x.shape
    return x.reshape(b, c, h * w).permute(0, 2, 1)


def unpack(tokens: Tensor, h: int, w: int) -> Tensor:
    """(B, h w, C) -> (B, C, h, w); the inverse of :func:`pack` (the pipelines' scatter by position ids)."""
    b, _, c = tokens.shape
    return tokens.permute(0, 2, 1).reshape(b, c, h, w)


def image_ids(batch: int, h: int, w: int, device) -> Tensor:
    """(B, h w, 4) position ids (0, row, col, 0), as the pipelines' _prepare_latent_ids."""
    ids = torch.cartesian_prod(torch.arange(1), torch.arange(h), torch.arange(w), torch.arange(1))
    return ids.unsqueeze(0).expand(batch, -1, -1).to(device)


def text_ids(batch: int, length: int, device) -> Tensor:
    """(B, L, 4) position ids (0, 0, 0, l), as the pipelines' _prepare_text_ids."""
    ids = torch.cartesian_prod(torch.arange(1), torch.arange(1), torch.arange(1), torch.arange(length))
    return ids.unsqueeze(0).expand(batch, -1, -1).to(device)


class Flux2Base(Family):
    """What both FLUX.2 pipelines share (see the module docstring)."""
    offload_blocks = ("Flux2TransformerBlock", "Flux2SingleTransformerBlock")

    denoiser_subfolder = "transformer"
    text_parts: ClassVar[tuple[str, ...]] = ("text_encoder",)
    tokenizer_parts: ClassVar[tuple[str, ...]] = ("tokenizer",)
    hidden_layers: ClassVar[tuple[int, ...]]
    max_sequence_length = MAX_SEQUENCE_LENGTH
    pipeline_guidance_default = PIPELINE_GUIDANCE
    pipeline_sigma_grid = "linspace"  # the pipelines hand their scheduler sigmas linspace(1, 1/K, K) ...
    pipeline_own_mu = True            # ... and mu from compute_empirical_mu, whatever the scheduler config says

    # -- schedule ------------------------------------------------------------------------------------

    def _make_schedule(self, config: dict) -> FlowSchedule:
        self.prediction_type = "flow"
        self._scheduler_config = config
        self._resolution = (self.default_resolution,) * 2
        return FlowSchedule(num_train_timesteps=int(config.get("num_train_timesteps", 1000)),
                            shift=self.shift_at(*self._resolution, len(STUDENT_SIGMAS)))

    def image_tokens(self, height: int, width: int) -> int:
        f = self.vae_scale_factor
        return (height // f) * (width // f)

    def shift_at(self, height: int, width: int, steps: int) -> float:
        """The flow shift the pipeline applies at (height, width) pixels with ``steps`` steps: exp(mu) (linear time
        shift: mu) with the empirical mu under dynamic shifting, else the scheduler's fixed ``shift``."""
        config = self._scheduler_config
        if not config.get("use_dynamic_shifting", False):
            return float(config.get("shift", 1.0))
        mu = empirical_mu(self.image_tokens(height, width), steps)
        return mu if config.get("time_shift_type", "exponential") == "linear" else math.exp(mu)

    def use_resolution(self, height: int, width: int) -> None:
        """Rebuild the schedule for (height, width): the shift of the student's steps at that token count."""
        self.check_resolution(height, width)
        self._resolution = (height, width)
        self.schedule = FlowSchedule(num_train_timesteps=self.schedule.num_train_timesteps,
                                     shift=self.shift_at(height, width, len(STUDENT_SIGMAS)))

    def scheduler_timesteps(self, steps: int) -> list[float]:
        """The pipeline's: sigmas linspace(1, 1/steps, steps) and mu = compute_empirical_mu(tokens, steps) at the
        current resolution (:meth:`use_resolution`)."""
        sched = copy.deepcopy(self.scheduler)
        mu = empirical_mu(self.image_tokens(*self._resolution), steps)
        sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
        return [float(t) for t in sched.timesteps]

    @property
    def default_student_timesteps(self) -> list[float]:
        """Uniform sigmas (1, 0.75, 0.5, 0.25) through the 4-step shift at the run's resolution: the pipeline's own
        4-step grid."""
        return [float(t) for t in self.schedule.shifted_timesteps(torch.tensor(STUDENT_SIGMAS)).tolist()]

    # -- latent space --------------------------------------------------------------------------------

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent cell: the VAE's factor times the 2x2 patchify."""
        return 2 ** len(self.vae.config.block_out_channels)

    @property
    def latent_channels(self) -> int:
        return int(unwrap(self.denoiser).config.in_channels)

    @property
    def default_resolution(self) -> int:
        return DEFAULT_SAMPLE_SIZE * self.vae_scale_factor // 2

    @property
    def scaling_factor(self) -> float:
        return 1.0  # the batch-norm statistics normalise instead (encode_images / decode_latents)

    def _bn_stats(self, like: Tensor) -> tuple[Tensor, Tensor]:
        bn = self.vae.bn
        mean = bn.running_mean.view(1, -1, 1, 1).to(like.device, like.dtype)
        std = torch.sqrt(bn.running_var.view(1, -1, 1, 1) + self.vae.config.batch_norm_eps).to(like.device, like.dtype)
        return mean, std

    def encode_images(self, pixels: Tensor, sample: bool = False, generator: torch.Generator | None = None) -> Tensor:
        """Pixels (B,3,H,W) in [-1,1] -> (patchify(z) - bn mean) / bn std (the pipelines' _encode_vae_image; z the
        posterior mode unless ``sample``)."""
        with network_call("VAE encoder", self.vae, pixels):
            dist = self.vae.encode(pixels.to(self.device, self.vae.dtype)).latent_dist
        z = patchify(dist.sample(generator) if sample else dist.mode())
        mean, std = self._bn_stats(z)
        return ((z - mean) / std).to(pixels.dtype)

    def vae_latents(self, latents: Tensor) -> Tensor:
        """flashdmd latents -> the VAE's z (B, 32, H/8, W/8): de-normalised and unpatchified, as the pipelines do
        before decoding (Flux2KleinPipeline's ``output_type="latent"``)."""
        mean, std = self._bn_stats(latents)
        return unpatchify(latents * std + mean)

    def decode_latents(self, latents: Tensor) -> Tensor:
        z = self.vae_latents(latents)
        with network_call("VAE decoder", self.vae, latents):
            return self.vae.decode(z.to(self.device, self.vae.dtype)).sample.to(latents.dtype)

    # -- text ----------------------------------------------------------------------------------------

    @abstractmethod
    def _text_inputs(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """(input_ids, attention_mask) (B, max_sequence_length) as the pipeline tokenizes."""

    def _encode_text(self, prompts: list[str]) -> tuple[Tensor, Tensor, Tensor]:
        (enc,) = self.text_encoders
        ids, mask = self._text_inputs(prompts)
        attention = mask.to(self.device)
        if enc.device.type == "meta":  # `flashdmd plan`: transformers' mask builder reads the mask's values; hand it
            # the (B, 1, L, L) boolean mask it would build (the same shape and bytes), which it takes as it is
            attention = torch.ones(ids.shape[0], 1, ids.shape[1], ids.shape[1], dtype=torch.bool, device="meta")
        out = enc(input_ids=ids.to(self.device), attention_mask=attention, output_hidden_states=True, use_cache=False)
        stacked = torch.stack([out.hidden_states[k] for k in self.hidden_layers], dim=1).to(self.device, enc.dtype)
        b, n, seq, dim = stacked.shape
        embeds = stacked.permute(0, 2, 1, 3).reshape(b, seq, n * dim)
        mask = mask.to(self.device)
        return embeds, masked_mean(embeds, mask), mask

    # -- network -------------------------------------------------------------------------------------

    def _forward(self, net: nn.Module, x_t: Tensor, t: Tensor, cond: Conditioning,
                 guidance: float | None = None) -> Tensor:
        dtype = input_dtype(net)
        b, _, h, w = x_t.shape
        kwargs = {}
        if guidance is not None:
            kwargs["guidance"] = torch.full((b,), float(guidance), device=x_t.device, dtype=torch.float32)
        embeds = cond.prompt_embeds.to(dtype)
        out = net(hidden_states=pack(x_t.to(dtype)), timestep=t.to(dtype) / 1000, encoder_hidden_states=embeds,
                  txt_ids=text_ids(b, embeds.shape[1], x_t.device), img_ids=image_ids(b, h, w, x_t.device),
                  return_dict=False, **kwargs)[0]
        return unpack(out, h, w).to(x_t.dtype)

    def step_noise(self, x0: Tensor, generator=None) -> Tensor:
        """The pipelines' scheduler draws each step's noise in the token layout (B, h w, C)."""
        b, c, h, w = x0.shape
        return unpack(randn_tensor((b, h * w, c), generator=generator, device=x0.device, dtype=x0.dtype), h, w)

    def _feature_modules(self, net: nn.Module) -> list[nn.Module]:
        """Every double-stream block, then every single-stream block."""
        return list(net.transformer_blocks) + list(net.single_transformer_blocks)

    def _feature_map(self, output: Any, x_t: Tensor) -> Tensor:
        # double-stream blocks return (text tokens, image tokens); single-stream ones the joint sequence, image last
        tokens = output[1] if isinstance(output, tuple) else output
        h, w = x_t.shape[-2:]
        return unpack(tokens[:, -h * w:], h, w)


class Flux2Family(Flux2Base):
    """Flux2Pipeline folders (FLUX.2-dev): Mistral-3 text encoder, guidance embedding."""

    name = "flux2"
    pipeline_class = "Flux2Pipeline"
    hidden_layers = (10, 20, 30)
    embedded_guidance: float = PIPELINE_GUIDANCE

    def _load(self, name: str, required: bool = True, dtype: torch.dtype | None = None):
        """FLUX.2-dev's tokenizer folder is a PixtralProcessor, which transformers builds only where torchvision is
        installed; its text path is the tokenizer's own chat template, so without torchvision the folder's tokenizer
        is loaded with AutoTokenizer and given the processor's chat template (chat_template.jinja / .json)."""
        try:
            return super()._load(name, required, dtype)
        except ImportError as e:
            if name != "tokenizer":
                raise
            return processor_tokenizer(self.path / name, e)

    @classmethod
    def exported_guidance(cls, info: dict, teacher) -> float:
        """A guidance-distilled student is called with the embedded guidance it was trained with; others with 1."""
        config = io.read_json(Path(teacher) / cls.denoiser_subfolder / "config.json")
        return float(info.get("embedded_guidance", PIPELINE_GUIDANCE)) if config.get("guidance_embeds", True) \
            else 1.0

    def _text_inputs(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        (processor,) = self.tokenizers
        messages = [[{"role": "system", "content": [{"type": "text", "text": SYSTEM_MESSAGE}]},
                     {"role": "user", "content": [{"type": "text", "text": p.replace("[IMG]", "")}]}]
                    for p in prompts]
        inputs = processor.apply_chat_template(messages, add_generation_prompt=False, tokenize=True, return_dict=True,
                                               return_tensors="pt", padding="max_length", truncation=True,
                                               max_length=self.max_sequence_length)
        return inputs["input_ids"], inputs["attention_mask"]

    @staticmethod
    def guidance_embedded(net: nn.Module) -> bool:
        return bool(unwrap(net).config.get("guidance_embeds", True))

    def raw_prediction(self, net: nn.Module, x_t: Tensor, t: Tensor, cond: Conditioning,
                       guidance_scale: float = 1.0, uncond: Conditioning | None = None) -> Tensor:
        """Guidance-distilled nets: one conditional forward with the guidance embedding (w, or the fixed
        :attr:`embedded_guidance` when w = 1); a net without the embedding: the base CFG pair."""
        if not self.guidance_embedded(net):
            return super().raw_prediction(net, x_t, t, cond, guidance_scale, uncond)
        g = self.embedded_guidance if guidance_scale == 1.0 else guidance_scale
        return self._forward(net, x_t, self._timesteps(t, x_t), cond, guidance=g)

    def _forward(self, net: nn.Module, x_t: Tensor, t: Tensor, cond: Conditioning,
                 guidance: float | None = None) -> Tensor:
        if guidance is None and self.guidance_embedded(net):
            guidance = self.embedded_guidance  # a feature tap's forward: the student's embedded value
        return super()._forward(net, x_t, t, cond, guidance)


class Flux2KleinFamily(Flux2Base):
    """Flux2KleinPipeline folders (FLUX.2-klein): Qwen3 text encoder, true CFG with the "" prompt."""

    name = "flux2-klein"
    pipeline_class = "Flux2KleinPipeline"
    hidden_layers = (9, 18, 27)

    @property
    def is_distilled(self) -> bool:
        """model_index.json's ``is_distilled`` (step-distilled klein): the pipeline then ignores guidance."""
        return bool(self.index.get("is_distilled", False))

    def _text_inputs(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        (tok,) = self.tokenizers
        ids, masks = [], []
        for p in prompts:  # one at a time, as Flux2KleinPipeline tokenizes
            text = tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                           add_generation_prompt=True, enable_thinking=False)
            inputs = tok(text, return_tensors="pt", padding="max_length", truncation=True,
                         max_length=self.max_sequence_length)
            ids.append(inputs["input_ids"])
            masks.append(inputs["attention_mask"])
        return torch.cat(ids), torch.cat(masks)

    def raw_prediction(self, net: nn.Module, x_t: Tensor, t: Tensor, cond: Conditioning,
                       guidance_scale: float = 1.0, uncond: Conditioning | None = None) -> Tensor:
        """True CFG (the base pair); a step-distilled folder ignores guidance, as its pipeline does."""
        if self.is_distilled:
            guidance_scale = 1.0
        return super().raw_prediction(net, x_t, t, cond, guidance_scale, uncond)


__all__ = ["Flux2Family", "Flux2KleinFamily", "empirical_mu", "patchify", "unpatchify", "pack", "unpack",
           "image_ids", "text_ids"]


def processor_tokenizer(folder: Path, why: ImportError):
    """The tokenizer of a processor folder, with the processor's chat template where the tokenizer has none."""
    try:
        tok = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as e:
        raise FlashDMDError(f"{folder}: the processor needs torchvision ({str(why).strip().splitlines()[0]}) and its "
                            f"tokenizer alone cannot be loaded ({str(e).splitlines()[0]}); pip install torchvision") \
            from None
    if tok.chat_template is None:  # transformers reads chat_template.jinja itself; a processor's .json it does not
        js = folder / "chat_template.json"
        if js.is_file():
            tok.chat_template = io.read_json(js)["chat_template"]
        else:
            raise FlashDMDError(f"{folder}: the processor needs torchvision and the folder has no chat template for "
                                "its tokenizer (chat_template.jinja / .json); pip install torchvision")
    check_tokenizer(tok, folder)
    return tok
