"""Model-family adapters: load a diffusers pipeline folder and speak its conventions (see ``base.Family``).

``load_family(path_or_name, family=None, device="cpu", dtype=torch.float32)`` detects the family from
``model_index.json``'s ``_class_name`` (StableDiffusionXLPipeline -> ``sdxl``, StableDiffusion3Pipeline
-> ``sd3``, FluxPipeline -> ``flux``). :func:`resolve_path` turns a spec into a folder: a model name a plug-in registered
(``world-sdxl``; see :mod:`flashdmd.plugins`), a local folder, or a hub id (a snapshot in the local hub
cache, downloaded first when ``HF_HUB_OFFLINE=0``).
"""
from __future__ import annotations

from pathlib import Path

import torch

from flashdmd import FlashDMDError, plugins
from flashdmd.families.base import Family
from flashdmd.families.parts import (LORA_TARGETS, Conditioning, masked_mean, name_part, network_call, part_name,
                                    read_model_index)
from flashdmd.families.flux import FluxFamily
from flashdmd.families.flux2 import Flux2Family, Flux2KleinFamily
from flashdmd.families.hub import hub_snapshot
from flashdmd.families.qwenimage import QwenImageFamily
from flashdmd.families.sd3 import ZERO_T5_MODES, SD3Family, counts_zero_t5_on
from flashdmd.families.sdxl import SDXLFamily
from flashdmd.families.zimage import ZImageFamily

FAMILIES: dict[str, type[Family]] = {"sdxl": SDXLFamily, "sd3": SD3Family, "flux": FluxFamily,
                                     "qwenimage": QwenImageFamily, "zimage": ZImageFamily}
FAMILIES.update({"flux2": Flux2Family, "flux2-klein": Flux2KleinFamily})
PIPELINE_FAMILIES = {cls.pipeline_class: name for name, cls in FAMILIES.items()}

__all__ = ["LORA_TARGETS", "Conditioning", "masked_mean", "Family", "SDXLFamily", "SD3Family", "FluxFamily", "FAMILIES",
           "load_family", "resolve_path", "detect_family", "name_part", "network_call", "part_name", "ZERO_T5_MODES",
           "counts_zero_t5_on"]


def resolve_path(path_or_name: str | Path) -> Path:
    """A plug-in's model name -> its folder; an existing path -> itself; a hub id -> its local snapshot
    folder (see :func:`flashdmd.families.hub.hub_snapshot`); anything else -> that path (whose absence the
    loaders report)."""
    named = plugins.model_folder(path_or_name)
    if named is not None:
        return Path(named)
    path = Path(path_or_name).expanduser()
    if path.exists():
        return path
    return hub_snapshot(str(path_or_name)) or path


def detect_family(path: str | Path) -> str:
    """The family name of a pipeline folder, from model_index.json's ``_class_name``."""
    path = Path(path)
    found = read_model_index(path).get("_class_name")
    if found not in PIPELINE_FAMILIES:
        known = ", ".join(f"{k} ({v})" for k, v in PIPELINE_FAMILIES.items())
        raise FlashDMDError(f"{path} holds a {found} pipeline; supported: {known}")
    return PIPELINE_FAMILIES[found]


def load_family(path_or_name: str | Path, family: str | None = None, device: str | torch.device = "cpu",
                dtype: torch.dtype = torch.float32, frozen_dtype: torch.dtype | None = None,
                load_device: str | torch.device | None = None) -> Family:
    """Load a pipeline folder (or a plug-in's model name, or a hub id) as its :class:`Family` adapter.

    ``family`` None detects it; naming one checks that the folder really is that family. ``dtype``: latents and
    micro-conditioning; ``frozen_dtype`` (default ``dtype``): every part loaded from the folder; ``load_device``
    (default ``device``): where the loaded parts are put (``model_offload`` loads them on the CPU).
    """
    path = resolve_path(path_or_name)
    if family is not None and family not in FAMILIES:
        raise FlashDMDError(f"unknown family {family!r}; use one of {sorted(FAMILIES)} or omit it to detect")
    name = family or detect_family(path)
    return FAMILIES[name](path, device=device, dtype=dtype, frozen_dtype=frozen_dtype, load_device=load_device)
