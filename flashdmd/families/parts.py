"""What every family shares besides the protocol: a pipeline folder's parts and the calls around a network.

* :class:`Conditioning` -- text conditioning of a batch in the denoiser's input format; :class:`TextCache` -- the
  embeddings of a known prompt set (``model_text_cache``);
* loading -- :func:`read_model_index`, :func:`component_class`, :func:`load_component` (a part of a diffusers
  pipeline folder by ``from_pretrained``, safetensors only, one-line errors for what is missing);
* around a network call -- :func:`network_call` (a dtype mismatch inside a network as one line naming the part,
  named by :func:`name_part`), :func:`input_dtype`, :func:`unwrap`, :func:`forward_hooks`.
"""
from __future__ import annotations

import importlib
import re
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors import SafetensorError
from torch import Tensor, nn

from flashdmd import FlashDMDError, io

MIN_TOKENIZER_LEN = 100
WEIGHT_SUFFIXES = (".safetensors", ".bin")
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
    ``prompt_mask`` (B, L) or None: 1 for a real token, 0 for padding, for families whose text encoder is a
    language model whose embeddings are padded (Qwen-Image, FLUX.2, Z-Image); None where every row is full length.
    Families without a pooled text encoder give ``pooled_embeds`` = :func:`masked_mean` of the token embeddings
    (flashdmd's choice: only the LRM's text branch and the text-conditioned Pixel-GAN head read it, never the
    network).
    """

    prompt_embeds: Tensor
    pooled_embeds: Tensor
    add_time_ids: Tensor | None = None
    prompt_mask: Tensor | None = None

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
        """Concatenate along the batch; each optional field must be all present or all None. Masked token
        embeddings of different lengths are padded to the longest (zeros, mask 0)."""
        conds = list(conds)
        for f in fields(Conditioning):
            if len({getattr(c, f.name) is not None for c in conds}) > 1:
                raise FlashDMDError(f"Conditioning.cat: some conditionings have {f.name} and some do not")
        if conds[0].prompt_mask is not None:
            conds = pad_tokens(conds)
        return Conditioning(*(None if getattr(conds[0], f.name) is None else
                              torch.cat([getattr(c, f.name) for c in conds]) for f in fields(Conditioning)))


def pad_tokens(conds: Sequence[Conditioning]) -> list[Conditioning]:
    """Masked conditionings padded to the longest token length (zero embeddings, mask 0)."""
    n = max(c.prompt_embeds.shape[1] for c in conds)

    def pad(c: Conditioning) -> Conditioning:
        extra = n - c.prompt_embeds.shape[1]
        if extra == 0:
            return c
        return replace(c, prompt_embeds=torch.nn.functional.pad(c.prompt_embeds, (0, 0, 0, extra)),
                       prompt_mask=torch.nn.functional.pad(c.prompt_mask, (0, extra)))
    return [pad(c) for c in conds]


def masked_mean(embeds: Tensor, mask: Tensor | None) -> Tensor:
    """(B, L, D) token embeddings -> (B, D): their mean over the real tokens (all of them without a mask), in
    float32 and back to ``embeds``' dtype. The pooled text embedding of families without a pooled encoder."""
    if mask is None:
        return embeds.float().mean(dim=1).to(embeds.dtype)
    m = mask.to(torch.float32).unsqueeze(-1)
    return ((embeds.float() * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)).to(embeds.dtype)


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


def meta_component(path: Path, index: dict, name: str, dtype: torch.dtype, required: bool = True) -> Any:
    """:func:`load_component` without weights: a network built on the meta device from its config file (in
    ``dtype``), tokenizers and schedulers loaded as they are (they hold no weights). What a :class:`Family` on the
    meta device loads (`flashdmd plan`)."""
    cls = component_class(path, index, name)
    if cls is None or not issubclass(cls, nn.Module):
        return load_component(path, index, name, dtype, required=required)
    folder = path / name
    if not (folder / "config.json").is_file():
        raise FlashDMDError(f"{folder}/config.json is missing: {name} has no model config")
    with torch.device("meta"):
        if cls.__module__.startswith("diffusers"):
            net = cls.from_config(cls.load_config(folder))
        else:
            net = cls(cls.config_class.from_pretrained(folder))
    return cast_as_loaded(net, dtype).requires_grad_(False).eval()


def cast_as_loaded(net: nn.Module, dtype: torch.dtype) -> nn.Module:
    """``net`` in ``dtype`` as ``from_pretrained(torch_dtype=dtype)`` leaves it: parameters under a module named in
    the class's ``_keep_in_fp32_modules`` stay float32 when ``dtype`` is float16 (diffusers and transformers; T5's
    ``wo``), under ``_keep_in_fp32_modules_strict`` also when it is bfloat16 (transformers). nn.Module.to, not the
    model's own ``to``, which warns on every cast of a class that has such a list, even an empty one."""
    keep = set(getattr(net, "_keep_in_fp32_modules", None) or []) if dtype == torch.float16 else set()
    if dtype in (torch.float16, torch.bfloat16):
        keep |= set(getattr(net, "_keep_in_fp32_modules_strict", None) or [])
    nn.Module.to(net, dtype)
    for name, p in net.named_parameters():
        if keep.intersection(name.split(".")):
            p.data = p.data.to(torch.float32)
    return net


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
    """Prompt -> (embeds (L,D), pooled (P,), mask (L,) or None) rows, held on the CPU in the encoders' dtype (see
    :meth:`Family.cache_prompts`). Masked rows of chunks with different token lengths are padded to the longest
    (zero embeddings, mask 0: what a batch of them gets from the family's encoder)."""

    def __init__(self):
        self.index: dict[str, int] = {}
        self._chunks: list[Conditioning] = []
        self._all: Conditioning | None = None

    def add(self, prompts: list[str], embeds: Tensor, pooled: Tensor, mask: Tensor | None = None) -> None:
        for p in prompts:
            self.index[p] = len(self.index)
        self._chunks.append(Conditioning(embeds.detach().cpu(), pooled.detach().cpu(), None,
                                         None if mask is None else mask.detach().cpu()))
        self._all = None

    def holds(self, prompts: Sequence[str]) -> bool:
        return all(p in self.index for p in prompts)

    def lookup(self, prompts: Sequence[str], device) -> tuple[Tensor, Tensor, Tensor | None]:
        missing = next((p for p in prompts if p not in self.index), None)
        if missing is not None:
            shown = missing if len(missing) <= 80 else missing[:77] + "..."
            raise FlashDMDError(f"prompt {shown!r} is not in the text cache and the text encoders were released "
                                f"(model_text_cache; {len(self.index)} prompts cached at start): only the run's "
                                "training, evaluation and grid prompts can be encoded")
        if not prompts:
            raise FlashDMDError("encode_prompts: no prompts given")
        if self._all is None and self._chunks:
            self._all = Conditioning.cat(self._chunks)
            self._chunks = [self._all]
        rows = torch.tensor([self.index[p] for p in prompts], dtype=torch.long)
        got = self._all[rows].to(device)
        return got.prompt_embeds, got.pooled_embeds, got.prompt_mask
