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
from dataclasses import dataclass, fields
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
    if next(net.parameters()).dtype != dtype:
        net = net.to(dtype)
    return net.requires_grad_(False).eval()


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
