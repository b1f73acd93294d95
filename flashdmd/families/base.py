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

import importlib
import inspect
import json
import re
import weakref
from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, ClassVar, Sequence

import torch
from torch import Tensor, nn

from flashdmd import FlashDMDError, io
from flashdmd.diffusion import bcast, cfg_combine, samplers, to_x0_eps

MIN_TOKENIZER_LEN = 100
WEIGHT_SUFFIXES = (".safetensors", ".bin")
INIT_RULES = ("pipeline", "noise", "sigma")
# LoRA targets: the attention projections, named alike in diffusers' UNet2DConditionModel and SD3 transformer
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


# ----------------------------------------------------------------------------------------------------
# Conditioning


@dataclass
class Conditioning:
    """Text conditioning of a batch, in the denoiser's own input format.

    ``prompt_embeds`` (B, L, D): the token embeddings fed to cross / joint attention.
    ``pooled_embeds`` (B, P): pooled text embedding (SDXL ``text_embeds``; SD3 ``pooled_projections``).
    ``add_time_ids`` (B, 6) or None: SDXL micro-conditioning (orig_h, orig_w, crop_top, crop_left,
    target_h, target_w); None for families without it.
    """

    prompt_embeds: Tensor
    pooled_embeds: Tensor
    add_time_ids: Tensor | None = None

    def _map(self, fn) -> "Conditioning":
        return Conditioning(*(None if getattr(self, f.name) is None else fn(getattr(self, f.name))
                              for f in fields(self)))

    def __len__(self) -> int:
        return self.prompt_embeds.shape[0]

    def __getitem__(self, idx) -> "Conditioning":
        """Batch indexing; an int keeps the batch dimension (returns a batch of one)."""
        if isinstance(idx, int):
            idx = slice(idx, idx + 1 if idx != -1 else None)
        return self._map(lambda v: v[idx])

    def to(self, device=None, dtype: torch.dtype | None = None) -> "Conditioning":
        """Move every tensor to ``device``; cast the floating ones to ``dtype``."""
        def move(v: Tensor) -> Tensor:
            return v.to(device=device, dtype=dtype if dtype is not None and v.is_floating_point() else None)
        return self._map(move)

    def repeat(self, n: int) -> "Conditioning":
        """Each row repeated ``n`` times in place (row-major: a a b b), like ``num_images_per_prompt``."""
        return self._map(lambda v: v.repeat_interleave(n, dim=0))

    @staticmethod
    def cat(conds: Sequence["Conditioning"]) -> "Conditioning":
        """Concatenate along the batch; ``add_time_ids`` must be all present or all None."""
        has_ids = {c.add_time_ids is not None for c in conds}
        if len(has_ids) > 1:
            raise FlashDMDError("Conditioning.cat: some conditionings have add_time_ids and some do not")
        ids = torch.cat([c.add_time_ids for c in conds]) if has_ids == {True} else None
        return Conditioning(torch.cat([c.prompt_embeds for c in conds]),
                            torch.cat([c.pooled_embeds for c in conds]), ids)


# ----------------------------------------------------------------------------------------------------
# Loading a diffusers pipeline folder


def read_model_index(path: Path) -> dict:
    """The folder's ``model_index.json`` as a dict; FlashDMDError if the folder is not a diffusers pipeline."""
    if not path.is_dir():
        raise FlashDMDError(f"model folder {path} does not exist; pass a local diffusers pipeline folder "
                            "(one written by save_pretrained)")
    index = path / "model_index.json"
    if not index.is_file():
        raise FlashDMDError(f"{path} is not a diffusers pipeline folder: model_index.json is missing")
    data = io.read_json(index, want=None)
    if not isinstance(data, dict):
        raise FlashDMDError(f"{index} is not a JSON object of pipeline components (got {type(data).__name__})")
    return data


def component_class(path: Path, index: dict, name: str) -> type | None:
    """The class ``model_index.json`` names for component ``name`` (None where it is null or absent)."""
    spec = index.get(name)
    if not spec or spec[0] is None or spec[1] is None:
        return None
    library, cls_name = spec
    if library not in ("diffusers", "transformers"):
        raise FlashDMDError(f"{path}/model_index.json: component {name} comes from library {library!r}; "
                            "only diffusers and transformers components are supported")
    cls = getattr(importlib.import_module(library), cls_name, None)
    if cls is None:
        raise FlashDMDError(f"{path}/model_index.json: {library} has no class {cls_name} (component {name}); "
                            f"upgrade {library} or fix the folder")
    return cls


def check_component_files(folder: Path, cls: type) -> None:
    """The subfolder exists and, for a network, holds a config and a weight file."""
    if not folder.is_dir():
        raise FlashDMDError(f"{folder} is missing: the pipeline folder has no {folder.name}/ subfolder")
    if not issubclass(cls, nn.Module):
        return
    if not (folder / "config.json").is_file():
        raise FlashDMDError(f"{folder}/config.json is missing: {folder.name} has no model config")
    if not any(f.name.endswith(WEIGHT_SUFFIXES + (".safetensors.index.json", ".bin.index.json"))
               for f in folder.iterdir()):
        raise FlashDMDError(f"{folder} has no weight file (*.safetensors or *.bin) for {folder.name}; "
                            "re-save the pipeline with save_pretrained")


def load_component(path: Path, index: dict, name: str, dtype: torch.dtype, required: bool = True) -> Any:
    """Load one part the way DiffusionPipeline.from_pretrained does (the class named in model_index.json).

    Networks come back in ``dtype``, frozen (requires_grad False) and in eval mode; tokenizers are checked
    for a real vocabulary (offline hub loads silently return a 2-token tokenizer).
    """
    cls = component_class(path, index, name)
    if cls is None:
        if required:
            raise FlashDMDError(f"{path}/model_index.json names no {name}; this family needs one")
        return None
    folder = path / name
    check_component_files(folder, cls)
    is_net = issubclass(cls, nn.Module)
    kwargs = {}
    if is_net:
        kwargs = {"torch_dtype": dtype} if cls.__module__.startswith("diffusers") else {"dtype": dtype}
    from safetensors import SafetensorError
    try:
        part = cls.from_pretrained(folder, **kwargs)
    except (OSError, ValueError, RuntimeError, KeyError, SafetensorError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FlashDMDError(f"could not load {folder} as {cls.__name__}: {first}") from None
    if is_net:
        part.requires_grad_(False).eval()
    if hasattr(part, "convert_tokens_to_ids"):
        check_tokenizer(part, folder)
    return part


def check_tokenizer(tok, folder: Path) -> None:
    if len(tok) <= MIN_TOKENIZER_LEN:
        raise FlashDMDError(f"tokenizer at {folder} has only {len(tok)} tokens (an empty placeholder); "
                            "the folder's vocab files are missing or unreadable")


def input_dtype(net: nn.Module) -> torch.dtype:
    """The dtype a network's inputs are cast to: that of its first non-adapter parameter. For a LoRA network whose
    frozen base is held in a lower precision than its adapters (``model_frozen_dtype``) this is the base's dtype:
    peft's LoRA layers cast their input to the adapters' dtype themselves and return the base layer's dtype."""
    for name, p in net.named_parameters():
        if "lora_" not in name:
            return p.dtype
    return next(net.parameters()).dtype


# what torch says when tensors of different dtypes meet inside an op (or an op has no kernel for a dtype)
DTYPE_ERROR = re.compile(r"same dtype|should be the same|expected scalar type|scalar type of|mixed dtype|"
                         r"expected dtype|found dtype|dtypes match|ScalarType|can't be cast to the desired output type|"
                         r"not implemented for '(Half|BFloat16|Float|Double)'", re.IGNORECASE)
_PART_NAMES: "weakref.WeakKeyDictionary[nn.Module, str]" = weakref.WeakKeyDictionary()


def name_part(net: nn.Module, name: str) -> nn.Module:
    """Record what ``net`` is in the run ("student", "fake score", ...), which a dtype error inside it names; returns
    ``net``."""
    _PART_NAMES[unwrap(net)] = name
    return net


def part_name(net: nn.Module, default: str | None = None) -> str:
    """The name :func:`name_part` gave ``net`` (else ``default``, else its class name)."""
    return _PART_NAMES.get(unwrap(net)) or default or type(unwrap(net)).__name__


def _dtypes(tensors) -> str:
    found = []
    for t in tensors:
        if isinstance(t, Tensor) and t.is_floating_point() and str(t.dtype) not in found:
            found.append(str(t.dtype))
    return " + ".join(d.removeprefix("torch.") for d in found) or "none"


@contextmanager
def network_call(part: str, net: nn.Module | Sequence[nn.Module] | None = None, *inputs):
    """Around one call of a network: a RuntimeError that is a dtype mismatch inside it (torch's "mat1 and mat2 must
    have the same dtype", "Input type (float) and bias type (c10::BFloat16) should be the same", ...) becomes a one-line
    FlashDMDError that names ``part``, the inputs' and weights' dtypes and autocast's, instead of a traceback from
    deep inside diffusers. Any other error passes unchanged; a FlashDMDError from an inner call (a part inside this
    one) is already the one line."""
    try:
        yield
    except RuntimeError as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        if not DTYPE_ERROR.search(first):
            raise
        nets = [] if net is None else [net] if isinstance(net, nn.Module) else [m for m in net if m is not None]
        weights = _dtypes(p for m in nets for p in m.parameters())
        cast = [f"autocast {str(torch.get_autocast_dtype(d)).removeprefix('torch.')}" for d in ("cpu", "cuda")
                if torch.is_autocast_enabled(d)]
        raise FlashDMDError(f"{part}: dtype mismatch inside the network (input {_dtypes(inputs)}, weights {weights}"
                            f"{', ' + cast[0] if cast else ''}): {first[:200]}; check model_frozen_dtype / "
                            "model_mixed_precision, or report it") from None


def unwrap(net: nn.Module) -> nn.Module:
    """The bare network inside a DDP / compile wrapper (``.module`` / ``._orig_mod``)."""
    for attr in ("module", "_orig_mod"):
        inner = getattr(net, attr, None)
        if isinstance(inner, nn.Module):
            return unwrap(inner)
    return net


@contextmanager
def forward_hooks(modules: Sequence[nn.Module], transform):
    """Collect ``transform(output)`` of every module's forward, in module order, into the yielded list."""
    outputs: list[Tensor | None] = [None] * len(modules)

    def hook_for(i):
        def hook(_module, _inputs, output):
            outputs[i] = transform(output)
        return hook

    handles = [m.register_forward_hook(hook_for(i)) for i, m in enumerate(modules)]
    try:
        yield outputs
    finally:
        for h in handles:
            h.remove()


class TextCache:
    """Prompt -> (embeds (L,D), pooled (P,)) rows, held on the CPU in the encoders' dtype (see
    :meth:`Family.cache_prompts`)."""

    def __init__(self):
        self.index: dict[str, int] = {}
        self._chunks: list[tuple[Tensor, Tensor]] = []
        self._embeds: Tensor | None = None
        self._pooled: Tensor | None = None

    def add(self, prompts: list[str], embeds: Tensor, pooled: Tensor) -> None:
        for p in prompts:
            self.index[p] = len(self.index)
        self._chunks.append((embeds.detach().cpu(), pooled.detach().cpu()))
        self._embeds = self._pooled = None

    def holds(self, prompts: Sequence[str]) -> bool:
        return all(p in self.index for p in prompts)

    def lookup(self, prompts: Sequence[str], device) -> tuple[Tensor, Tensor]:
        missing = next((p for p in prompts if p not in self.index), None)
        if missing is not None:
            shown = missing if len(missing) <= 80 else missing[:77] + "..."
            raise FlashDMDError(f"prompt {shown!r} is not in the text cache and the text encoders were released "
                                f"(model_text_cache; {len(self.index)} prompts cached at start): only the run's "
                                "training, evaluation and grid prompts can be encoded")
        if self._embeds is None:
            self._embeds = torch.cat([e for e, _ in self._chunks]) if self._chunks else None
            self._pooled = torch.cat([p for _, p in self._chunks]) if self._chunks else None
            self._chunks = [(self._embeds, self._pooled)] if self._chunks else []
        if not prompts:
            raise FlashDMDError("encode_prompts: no prompts given")
        rows = torch.tensor([self.index[p] for p in prompts], dtype=torch.long)
        return self._embeds.index_select(0, rows).to(device), self._pooled.index_select(0, rows).to(device)


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
    # and the keyword prefix of the pipeline's save_lora_weights (unet_lora_layers / transformer_lora_layers)
    export_scheduler: ClassVar[str] = "flow_lcm"
    pipeline_guidance_default: ClassVar[float] = 1.0
    pipeline_sigma_grid: ClassVar[str] = "scheduler"
    lora_layers_kwarg: ClassVar[str] = "transformer"
    text_parts: ClassVar[tuple[str, ...]] = ("text_encoder", "text_encoder_2")
    tokenizer_parts: ClassVar[tuple[str, ...]] = ("tokenizer", "tokenizer_2")
    optional_text_parts: ClassVar[tuple[tuple[str, str], ...]] = ()

    def __init__(self, path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 frozen_dtype: torch.dtype | None = None):
        self.path = Path(path)
        self.device = torch.device(device)
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
        part = load_component(self.path, self.index, name, dtype or self.frozen_dtype, required=required)
        return part.to(self.device) if isinstance(part, nn.Module) else part

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
        except (OSError, ValueError):  # load_component reports the missing / broken folder
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
    def _encode_text(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """prompts -> (prompt_embeds (B,L,D), pooled_embeds (B,P)), exactly as the family's pipeline."""

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

    def _null_text(self) -> tuple[Tensor, Tensor]:
        """Embeddings (1,L,D), (1,P) of the unconditional branch: the "" prompt by default."""
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
            embeds, pooled = cache.lookup(prompts, self.device)
        else:
            with network_call("text encoders", self.text_encoders):
                embeds, pooled = self._encode_text(prompts)
        return Conditioning(embeds, pooled, self._time_ids(len(prompts), *self._hw(height, width)))

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
                embeds, pooled = self._encode_text(chunk + [chunk[-1]] * (batch - len(chunk)))
            cache.add(chunk, embeds[:len(chunk)], pooled[:len(chunk)])
        return len(cache.index)

    def release_text_encoders(self) -> None:
        """Drop the text encoders and tokenizers (their memory goes with the last reference); afterwards
        :meth:`encode_prompts` answers only prompts cached by :meth:`cache_prompts` and raises a one-line
        FlashDMDError for any other. The null conditioning stays available."""
        import gc
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
                self._null_cache = Conditioning(*self._null_text())
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
        from diffusers.utils.torch_utils import randn_tensor
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
        1.0 -- the teacher's CFG is distilled in -- unless the family takes guidance as an input."""
        return 1.0

    def use_resolution(self, height: int, width: int) -> None:
        """Work at (height, width) pixels from now on: a family whose noise schedule depends on the image size
        (FLUX's dynamic shift) rebuilds :attr:`schedule`; the others only check the size."""
        self.check_resolution(height, width)

    def scheduler_timesteps(self, steps: int) -> list[float]:
        """The folder's own scheduler's timesteps for ``steps`` steps (what its diffusers pipeline uses)."""
        import copy
        sched = copy.deepcopy(self.scheduler)
        sched.set_timesteps(steps)
        return [float(t) for t in sched.timesteps]

    def check_resolution(self, height: int, width: int) -> None:
        """FlashDMDError (one line) when the denoiser cannot work at (height, width) pixels; the VAE factor is
        checked here, architecture limits by the family (SD3: its positional-embedding grid)."""
        self.latent_shape(height, width)

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

    def __repr__(self) -> str:
        return f"{type(self).__name__}(path={str(self.path)!r}, prediction_type={self.prediction_type!r})"
