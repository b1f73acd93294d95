"""The ``Family`` protocol: everything DMD / RL code needs to know about a model family, in one place.

A family adapter loads a local diffusers pipeline folder (``model_index.json`` + one subfolder per part),
and speaks for the family's conventions so that nothing outside ``flashdmd/families`` branches on the
family:

* text conditioning  -- :meth:`Family.encode_prompts` / :meth:`Family.null_conditioning` give a
  :class:`Conditioning` (prompt embeds (B,L,D), pooled embeds (B,P), SDXL micro-conditioning (B,6));
* the network call   -- :meth:`Family.predict` runs *any* network of the family's architecture (teacher,
  fake score, student) at model timesteps ``t`` (B,) and returns ``(x0, eps)`` with
  ``x_t = alpha_t * x0 + sigma_t * eps`` for the family's :attr:`schedule`; CFG is one batched forward of
  ``[uncond; cond]`` combined on the raw prediction with :func:`flashdmd.diffusion.cfg_combine`;
* the latent space   -- :meth:`Family.encode_images` / :meth:`Family.decode_latents` apply the VAE's
  ``latents = (z - shift_factor) * scaling_factor`` convention (shift 0 where the VAE has none);
* sampling           -- :meth:`Family.sample_latents` runs :func:`flashdmd.diffusion.samplers.sample`
  from an initial latent built by :meth:`Family.initial_latents` (rule documented there);
* feature taps       -- :meth:`Family.features` returns intermediate activations as (B,C,h,w) maps;
* dtypes             -- every part is loaded in :attr:`Family.frozen_dtype` (default: :attr:`Family.dtype`, the
  dtype of latents and conditioning micro-ids); :meth:`Family.load_denoiser` gives a fresh copy of the denoiser in
  another dtype (a full fine-tune's trainable student); networks are fed in their base weights' dtype
  (:func:`input_dtype`) and answer in the caller's;
* text cache         -- :meth:`Family.cache_prompts` + :meth:`Family.release_text_encoders`: embeddings of a
  known prompt set kept, the text encoders freed; :meth:`Family.encode_prompts` answers from the cache.

Every boundary error is a :class:`flashdmd.FlashDMDError` whose one-line message names the path and what
is missing.
"""
from __future__ import annotations

import copy
import gc
import inspect
from abc import ABC, abstractmethod
from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar, Sequence

import torch
from diffusers.utils.torch_utils import randn_tensor
from torch import Tensor, nn

from flashdmd import FlashDMDError, io
from flashdmd.diffusion import bcast, cfg_combine, samplers, to_x0_eps
from flashdmd.families.parts import (Conditioning, TextCache, component_class, forward_hooks, load_component,
                                     meta_component, network_call, part_name, read_model_index, unwrap)

INIT_RULES = ("pipeline", "noise", "sigma")


# ----------------------------------------------------------------------------------------------------
# The protocol


class Family(ABC):
    """One model family (SDXL, SD3) loaded from a local diffusers pipeline folder.

    Attributes: ``name``, ``prediction_type`` ("eps" | "v" | "x0" | "flow"), ``schedule``
    (VPSchedule | FlowSchedule), ``default_student_timesteps`` (list of model timesteps, high noise first),
    ``vae``, ``denoiser`` (the teacher network), ``text_encoders``, ``tokenizers`` (both empty lists after
    :meth:`release_text_encoders`), ``scheduler`` (the folder's diffusers scheduler, for reference), ``path``,
    ``device``, ``dtype`` (latents, micro-conditioning), ``frozen_dtype`` (every loaded part; default ``dtype``).

    Shapes: latents (B, C, H/f, W/f) with f = :attr:`vae_scale_factor`; pixels (B, 3, H, W) in [-1, 1];
    model timesteps ``t`` (B,) float32 in the schedule's units.
    """

    name: ClassVar[str]
    pipeline_class: ClassVar[str]
    # guidance-distilled families (FLUX.1-dev): the guidance embedding a net gets when no guidance is asked
    # (guidance_scale 1); set from model_embedded_guidance by a run, unused by the others
    embedded_guidance: float = 3.5
    denoiser_subfolder: ClassVar[str]
    # `flashdmd export` reads these from the class (no folder loaded): the few-step scheduler kind ("lcm": diffusers'
    # LCMScheduler for eps / v UNets; "flow_lcm": FlowMatchLCMScheduler), the pipeline __call__'s guidance_scale
    # default (which the export's README tells users to override), the sigma grid a flow pipeline hands its
    # scheduler ("scheduler": the scheduler's own K-step grid; "linspace": linspace(1, 1/K, K), as FluxPipeline),
    # and the keyword prefix of the pipeline's save_lora_weights (unet_lora_layers / transformer_lora_layers);
    # pipeline_no_guidance: the pipeline's guidance_scale that runs no CFG (1.0 for uncond + g * (cond - uncond);
    # 0.0 where the pipeline's CFG is cond + g * (cond - uncond), as ZImagePipeline's)
    export_scheduler: ClassVar[str] = "flow_lcm"
    pipeline_guidance_default: ClassVar[float] = 1.0
    pipeline_no_guidance: ClassVar[float] = 1.0
    pipeline_guidance_kwarg: ClassVar[str] = "guidance_scale"  # that scale's keyword (Qwen-Image: true_cfg_scale)
    pipeline_sigma_grid: ClassVar[str] = "scheduler"
    # True where the pipeline computes the dynamic shift's mu itself, ignoring the scheduler config's base / max shift
    # (FLUX.2's compute_empirical_mu): the exported scheduler then carries a fixed shift instead
    pipeline_own_mu: ClassVar[bool] = False
    # the transformer's latent patch (FLUX, Qwen-Image, Z-Image: 2x2 patches as tokens): an image side must be a
    # multiple of latent_patch * vae_scale_factor
    latent_patch: ClassVar[int] = 1
    lora_layers_kwarg: ClassVar[str] = "transformer"
    # the denoiser's blocks that gradient checkpointing wraps whole (model_offload base streams them one by one);
    # none: the base cannot be streamed (SDXL's UNet checkpoints parts of its blocks)
    offload_blocks: ClassVar[tuple[str, ...]] = ()
    text_parts: ClassVar[tuple[str, ...]] = ("text_encoder", "text_encoder_2")
    tokenizer_parts: ClassVar[tuple[str, ...]] = ("tokenizer", "tokenizer_2")
    optional_text_parts: ClassVar[tuple[tuple[str, str], ...]] = ()

    def __init__(self, path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 frozen_dtype: torch.dtype | None = None, load_device: str | torch.device | None = None):
        self.path = Path(path)
        self.device = torch.device(device)
        # where the loaded parts are put (model_offload: the CPU, and the run places them); default the device
        self.load_device = torch.device(load_device) if load_device is not None else self.device
        self.dtype = dtype
        self.frozen_dtype = frozen_dtype or dtype
        self.index = read_model_index(self.path)
        self._check_pipeline_class()
        self._load_parts()
        self.schedule = self._make_schedule(dict(self.scheduler.config))
        self._null_cache: Conditioning | None = None
        self._text_cache: TextCache | None = None
        self.text_encoders_released = False

    # -- loading -------------------------------------------------------------------------------------

    def _check_pipeline_class(self) -> None:
        found = self.index.get("_class_name")
        if found != self.pipeline_class:
            raise FlashDMDError(f"{self.path} holds a {found} but family {self.name!r} needs a {self.pipeline_class}; "
                                "omit family= to detect it from model_index.json")

    def _load(self, name: str, required: bool = True, dtype: torch.dtype | None = None):
        # on the meta device (`flashdmd plan`): every network from its config file alone, no weight read
        load = meta_component if self.device.type == "meta" else load_component
        part = load(self.path, self.index, name, dtype or self.frozen_dtype, required=required)
        return part.to(self.load_device) if isinstance(part, nn.Module) else part

    def load_denoiser(self, dtype: torch.dtype) -> nn.Module:
        """A fresh copy of the folder's denoiser in ``dtype`` on the family's device (frozen, eval mode): the
        initial weights of a full fine-tune's student when the teacher is held in a lower precision -- loaded
        from the files, not up-cast from the teacher."""
        return self._load(self.denoiser_subfolder, dtype=dtype)

    def vae_dtype(self) -> torch.dtype:
        """The VAE's dtype: the frozen dtype, except float32 where that is float16 and the VAE's config sets
        ``force_upcast`` (SDXL's VAE overflows in float16; diffusers' pipelines upcast it to float32 to decode). Float32
        rather than bfloat16 (which would not overflow either): the pixels are then what the exported pipeline decodes,
        and the VAE is small (SDXL's: 84 M parameters, 0.17 GB more than in float16)."""
        if self.frozen_dtype != torch.float16:
            return self.frozen_dtype
        cls = component_class(self.path, self.index, "vae")
        config = self.path / "vae" / "config.json"
        default = inspect.signature(cls.__init__).parameters.get("force_upcast") if cls is not None else None
        try:
            force = io.read_json(config).get("force_upcast", default.default if default else False)
        except FlashDMDError:  # load_component reports the missing / broken folder
            force = False
        return torch.float32 if force else self.frozen_dtype

    def _load_parts(self) -> None:
        self.vae = self._load("vae", dtype=self.vae_dtype())
        self.denoiser = self._load(self.denoiser_subfolder)
        self.scheduler = self._load("scheduler")
        self.text_encoders = [self._load(n) for n in self.text_parts]
        self.tokenizers = [self._load(n) for n in self.tokenizer_parts]
        for enc_name, tok_name in self.optional_text_parts:
            enc, tok = self._load(enc_name, required=False), self._load(tok_name, required=False)
            if (enc is None) != (tok is None):
                raise FlashDMDError(f"{self.path}: {enc_name} and {tok_name} must be both present or both absent")
            self.text_encoders.append(enc)
            self.tokenizers.append(tok)

    @abstractmethod
    def _make_schedule(self, config: dict):
        """Build the schedule (and set ``self.prediction_type``) from the scheduler config."""

    # -- family specifics ----------------------------------------------------------------------------

    @property
    @abstractmethod
    def default_student_timesteps(self) -> list[float]:
        """The few-step student's timesteps (model units, high noise first)."""

    @abstractmethod
    def _encode_text(self, prompts: list[str]) -> tuple[Tensor, ...]:
        """prompts -> (prompt_embeds (B,L,D), pooled_embeds (B,P)), exactly as the family's pipeline; a family whose
        embeddings are padded adds their mask: (embeds, pooled, prompt_mask (B,L) integer or bool)."""

    @abstractmethod
    def _forward(self, net: nn.Module, x_t: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        """The network's raw prediction (B,C,h,w) in ``x_t``'s dtype; inputs cast to the net's dtype."""

    @abstractmethod
    def _feature_modules(self, net: nn.Module) -> list[nn.Module]:
        """Modules whose forward outputs are the feature taps."""

    @abstractmethod
    def _feature_map(self, output: Any, x_t: Tensor) -> Tensor:
        """One tapped module output -> a (B,C,h,w) feature map."""

    def _time_ids(self, batch: int, height: int, width: int) -> Tensor | None:
        """Micro-conditioning rows (B,6), or None for families without it."""
        return None

    def _null_text(self) -> tuple[Tensor, ...]:
        """Embeddings (1,L,D), (1,P) (and mask (1,L)) of the unconditional branch: the "" prompt by default."""
        return self._encode_text([""])

    def _pipeline_init_rule(self) -> str:
        """The initial-latent rule of the folder's scheduler (see :meth:`initial_latents`)."""
        return "noise"

    # -- conditioning --------------------------------------------------------------------------------

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str], height: int | None = None,
                       width: int | None = None) -> Conditioning:
        """Encode ``prompts`` (a list of B strings) into a :class:`Conditioning` on the family's device.

        ``height``/``width`` (pixels; default :attr:`default_resolution`) feed SDXL's micro-conditioning.
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        cache = self._text_cache
        if cache is not None and (self.text_encoders_released or cache.holds(prompts)):
            embeds, pooled, mask = cache.lookup(prompts, self.device)
        else:
            with network_call("text encoders", self.text_encoders):
                embeds, pooled, mask = _with_mask(self._encode_text(prompts))
        return Conditioning(embeds, pooled, self._time_ids(len(prompts), *self._hw(height, width)), mask)

    @torch.no_grad()
    def cache_prompts(self, prompts: Sequence[str], batch: int = 32) -> int:
        """Encode ``prompts`` (duplicates and already cached ones skipped) and keep their embeddings, on the CPU
        in the text encoders' dtype, for :meth:`encode_prompts`; the null conditioning is computed too. Every
        prompt is encoded in a batch of exactly ``batch`` rows (the last one padded with repeats), so that the
        cached rows are what encoding training batches of that size gives. Returns the number of prompts cached."""
        if self.text_encoders_released:
            raise FlashDMDError("cache_prompts: the text encoders were released already; cache before releasing them")
        if batch < 1:
            raise FlashDMDError(f"cache_prompts: batch must be >= 1, got {batch}")
        self.null_conditioning(1)
        cache = self._text_cache = self._text_cache or TextCache()
        todo = [p for p in dict.fromkeys(prompts) if p not in cache.index]
        for start in range(0, len(todo), batch):
            chunk = todo[start:start + batch]
            with network_call("text encoders", self.text_encoders):
                embeds, pooled, mask = _with_mask(self._encode_text(chunk + [chunk[-1]] * (batch - len(chunk))))
            cache.add(chunk, embeds[:len(chunk)], pooled[:len(chunk)], None if mask is None else mask[:len(chunk)])
        return len(cache.index)

    def release_text_encoders(self) -> None:
        """Drop the text encoders and tokenizers (their memory goes with the last reference); afterwards
        :meth:`encode_prompts` answers only prompts cached by :meth:`cache_prompts` and raises a one-line
        FlashDMDError for any other. The null conditioning stays available."""
        self.null_conditioning(1)
        self._text_cache = self._text_cache or TextCache()
        self.text_encoders, self.tokenizers = [], []
        self.text_encoders_released = True
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    @property
    def cached_prompts(self) -> int:
        """How many prompts the text cache holds (0 without one)."""
        return 0 if self._text_cache is None else len(self._text_cache.index)

    @torch.no_grad()
    def null_conditioning(self, batch: int, height: int | None = None, width: int | None = None) -> Conditioning:
        """The unconditional (CFG) conditioning for ``batch`` rows, as the family's pipeline builds it when
        no negative prompt is given (the "" prompt; SDXL with ``force_zeros_for_empty_prompt``: zeros)."""
        if self._null_cache is None:
            with network_call("text encoders", self.text_encoders):
                embeds, pooled, mask = _with_mask(self._null_text())
                self._null_cache = Conditioning(embeds, pooled, None, mask)
        null = self._null_cache.repeat(batch)
        return replace(null, add_time_ids=self._time_ids(batch, *self._hw(height, width)))

    def _hw(self, height: int | None, width: int | None) -> tuple[int, int]:
        res = self.default_resolution
        return (height or res, width or res)

    # -- prediction ----------------------------------------------------------------------------------

    def _timesteps(self, t: Tensor | float, x_t: Tensor) -> Tensor:
        t = torch.as_tensor(t, dtype=torch.float32, device=x_t.device)
        return t.expand(x_t.shape[0]) if t.ndim == 0 else t

    def _default_uncond(self, cond: Conditioning) -> Conditioning:
        """Null conditioning sharing ``cond``'s micro-conditioning (the pipeline's negative_add_time_ids)."""
        null = self.null_conditioning(len(cond)).to(cond.prompt_embeds.device)
        return replace(null, add_time_ids=cond.add_time_ids)

    def raw_prediction(self, net: nn.Module, x_t: Tensor, t: Tensor, cond: Conditioning,
                       guidance_scale: float = 1.0, uncond: Conditioning | None = None) -> Tensor:
        """The network's own output (eps / v / flow), CFG-combined; one batched forward of [uncond; cond]."""
        t = self._timesteps(t, x_t)
        if guidance_scale == 1.0:
            return self._forward(net, x_t, t, cond)
        uncond = self._default_uncond(cond) if uncond is None else uncond
        both = self._forward(net, torch.cat([x_t, x_t]), torch.cat([t, t]), Conditioning.cat([uncond, cond]))
        pred_uncond, pred_cond = both.chunk(2)
        return cfg_combine(pred_uncond, pred_cond, guidance_scale)

    def predict(self, net: nn.Module, x_t: Tensor, t: Tensor, cond: Conditioning, guidance_scale: float = 1.0,
                uncond: Conditioning | None = None) -> tuple[Tensor, Tensor]:
        """(x0, eps) predicted by ``net`` at ``x_t`` (B,C,h,w), model timesteps ``t`` (B,) or scalar.

        Guidance ``w`` = 1 is a single conditional forward; otherwise ``uncond + w*(cond - uncond)`` on the
        raw prediction (``uncond`` defaults to :meth:`null_conditioning`). Gradients flow unless the caller
        disables them. ``x_t = alpha*x0 + sigma*eps`` holds for the returned pair.
        """
        t = self._timesteps(t, x_t)
        with network_call(part_name(net, "teacher" if unwrap(net) is unwrap(self.denoiser) else None), net, x_t,
                          cond.prompt_embeds):
            raw = self.raw_prediction(net, x_t, t, cond, guidance_scale, uncond)
        alpha, sigma = self.schedule.alpha_sigma(t)
        return to_x0_eps(raw, self.prediction_type, x_t, bcast(alpha, x_t), bcast(sigma, x_t))

    def denoiser_fn(self, net: nn.Module, cond: Conditioning, guidance_scale: float = 1.0,
                    uncond: Conditioning | None = None):
        """A sampler denoiser ``denoise(x_t, t) -> (x0, eps)`` bound to ``net`` and ``cond``."""
        def denoise(x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
            return self.predict(net, x_t, t, cond, guidance_scale, uncond)
        return denoise

    # -- sampling ------------------------------------------------------------------------------------

    def step_noise(self, x0: Tensor, generator=None) -> Tensor:
        """The fresh N(0, I) noise of one stochastic sampler step, drawn as the family's pipeline's scheduler draws it
        (``randn_tensor`` of the latents' shape; FLUX: of its packed tokens), so that an exported pipeline and
        flashdmd's sampler consume one generator stream identically."""
        return randn_tensor(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)

    def initial_latents(self, noise: Tensor, t0: float, init: str = "pipeline") -> Tensor:
        """The sampler's input x at the first timestep ``t0``, from standard normal ``noise``.

        * ``"noise"``: x = noise. Unit variance -- the forward marginal at the top of a VP schedule and
          exactly the flow marginal at sigma = 1. DDIM/DDPM/DPM-Solver and FlowMatch pipelines start here,
          as do sigma-space (Euler, Heun, LMS, ...) schedulers with ``leading`` spacing: their
          ``init_noise_sigma`` is sqrt(sigma_0^2+1), which is x_VP = noise after the 1/sqrt(sigma^2+1)
          input scaling.
        * ``"sigma"``: x = sigma_VP(t0) * noise -- sigma-space schedulers with ``trailing``/``linspace``
          spacing (init_noise_sigma = sigma_0, i.e. x_VP = sigma_0/sqrt(sigma_0^2+1) * noise).
        * ``"pipeline"``: whichever of the two the folder's own scheduler uses (what diffusers would do).
        """
        if init not in INIT_RULES:
            raise FlashDMDError(f"initial latent rule {init!r} unknown; use one of {INIT_RULES}")
        rule = self._pipeline_init_rule() if init == "pipeline" else init
        if rule == "noise":
            return noise
        _, sigma = self.schedule.alpha_sigma(torch.full((noise.shape[0],), float(t0), device=noise.device))
        return bcast(sigma, noise) * noise

    @torch.no_grad()
    def sample_latents(self, net: nn.Module, cond: Conditioning, noise: Tensor,
                       timesteps: Sequence[float] | None = None, guidance_scale: float = 1.0,
                       uncond: Conditioning | None = None, stochastic: bool = False,
                       generator: torch.Generator | None = None, init: str = "pipeline") -> Tensor:
        """Sample clean latents (B,C,h,w) with :func:`flashdmd.diffusion.samplers.sample`.

        ``timesteps`` default to :attr:`default_student_timesteps`; deterministic (DDIM == Euler) unless
        ``stochastic``; the first latent is ``initial_latents(noise, timesteps[0], init)``.
        """
        steps = list(self.default_student_timesteps if timesteps is None else timesteps)
        steps = [float(s) for s in steps]
        x_T = self.initial_latents(noise, steps[0], init)
        denoise = self.denoiser_fn(net, cond, guidance_scale, uncond)
        return samplers.sample(denoise, x_T, steps, self.schedule, stochastic=stochastic, generator=generator)

    # -- latent space --------------------------------------------------------------------------------

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        return int(unwrap(self.denoiser).config.in_channels)

    @property
    def default_resolution(self) -> int:
        """The pipeline's default image side in pixels: denoiser sample_size * VAE factor."""
        return int(unwrap(self.denoiser).config.sample_size) * self.vae_scale_factor

    @property
    def scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    @property
    def shift_factor(self) -> float:
        return float(getattr(self.vae.config, "shift_factor", None) or 0.0)

    @classmethod
    def exported_guidance(cls, info: dict, teacher: Path) -> float:
        """The guidance_scale an exported student's pipeline must be called with (``info``: the run's run.json):
        :attr:`pipeline_no_guidance` -- the teacher's CFG is distilled in -- unless the family takes guidance as an
        input."""
        return cls.pipeline_no_guidance

    def use_resolution(self, height: int, width: int) -> None:
        """Work at (height, width) pixels from now on: a family whose noise schedule depends on the image size
        (FLUX's dynamic shift) rebuilds :attr:`schedule`; the others only check the size."""
        self.check_resolution(height, width)

    def scheduler_timesteps(self, steps: int) -> list[float]:
        """The folder's own scheduler's timesteps for ``steps`` steps (what its diffusers pipeline uses)."""
        sched = copy.deepcopy(self.scheduler)
        sched.set_timesteps(steps)
        return [float(t) for t in sched.timesteps]

    def check_resolution(self, height: int, width: int) -> None:
        """FlashDMDError (one line) when the denoiser cannot work at (height, width) pixels; the VAE factor is
        checked here, architecture limits by the family (SD3: its positional-embedding grid)."""
        self.latent_shape(height, width)
        step = self.latent_patch * self.vae_scale_factor
        if self.latent_patch > 1 and (height % step or width % step):
            raise FlashDMDError(f"image size {height}x{width} is not a multiple of {step}: the {self.name} "
                                f"transformer takes {self.latent_patch}x{self.latent_patch} latent patches as tokens")

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """(C, H/f, W/f) of the latents of a (height, width) image."""
        f = self.vae_scale_factor
        if height % f or width % f:
            raise FlashDMDError(f"image size {height}x{width} is not a multiple of the VAE factor {f}")
        return (self.latent_channels, height // f, width // f)

    def encode_images(self, pixels: Tensor, sample: bool = False,
                      generator: torch.Generator | None = None) -> Tensor:
        """Pixels (B,3,H,W) in [-1,1] -> latents (z - shift_factor) * scaling_factor; z is the posterior mean
        (mode) unless ``sample``, then a draw with ``generator``."""
        with network_call("VAE encoder", self.vae, pixels):
            dist = self.vae.encode(pixels.to(self.device, self.vae.dtype)).latent_dist
        z = dist.sample(generator) if sample else dist.mode()
        return (z.to(pixels.dtype) - self.shift_factor) * self.scaling_factor

    def decode_latents(self, latents: Tensor) -> Tensor:
        """Latents (B,C,h,w) -> pixels (B,3,H,W), nominally in [-1,1] (not clamped)."""
        z = latents / self.scaling_factor + self.shift_factor
        with network_call("VAE decoder", self.vae, latents):
            return self.vae.decode(z.to(self.device, self.vae.dtype)).sample.to(latents.dtype)

    # -- feature taps --------------------------------------------------------------------------------

    def features(self, net: nn.Module, x_t: Tensor, t: Tensor, cond: Conditioning,
                 return_output: bool = False) -> list[Tensor] | tuple[list[Tensor], Tensor]:
        """Intermediate activations of one conditional forward, each (B,C_i,h_i,w_i), shallow to deep.

        Gradients flow as the caller's context allows (GAN heads train through them). ``return_output`` also
        returns the network's raw output, e.g. so a DDP caller can tie it into its loss with weight 0 (DDP
        expects every parameter on the path to the output to receive a gradient).
        """
        modules = self._feature_modules(unwrap(net))
        with forward_hooks(modules, lambda out: self._feature_map(out, x_t)) as outputs, \
                network_call(part_name(net, "teacher" if unwrap(net) is unwrap(self.denoiser) else None), net, x_t,
                             cond.prompt_embeds):
            raw = self._forward(net, x_t, self._timesteps(t, x_t), cond)
        return (list(outputs), raw) if return_output else list(outputs)

    def run_notes(self) -> list[str]:
        """What this teacher does differently in a run that its user should see in the log (none by default)."""
        return []

    def __repr__(self) -> str:
        return f"{type(self).__name__}(path={str(self.path)!r}, prediction_type={self.prediction_type!r})"


def _with_mask(text: tuple) -> tuple:
    """A family's text encoding as (embeds, pooled, mask or None)."""
    return tuple(text) if len(text) == 3 else (*text, None)
