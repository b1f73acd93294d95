"""Model-family adapters: load a diffusers pipeline folder and speak its conventions (see ``base.Family``).

``load_family(path_or_name, family=None, device="cpu", dtype=torch.float32)`` detects the family from
``model_index.json``'s ``_class_name`` (StableDiffusionXLPipeline -> ``sdxl``, StableDiffusion3Pipeline
-> ``sd3``). The names ``world-sdxl`` / ``world-sd3`` resolve to the folders shipped under
``flashdmd/world/assets/``.
"""
from __future__ import annotations

from pathlib import Path

import torch

import flashdmd
from flashdmd import FlashDMDError
from flashdmd.families.base import Conditioning, Family, read_model_index
from flashdmd.families.sd3 import SD3Family
from flashdmd.families.sdxl import SDXLFamily

FAMILIES: dict[str, type[Family]] = {"sdxl": SDXLFamily, "sd3": SD3Family}
PIPELINE_FAMILIES = {cls.pipeline_class: name for name, cls in FAMILIES.items()}
WORLD_NAMES = ("world-sdxl", "world-sd3")
WORLD_ASSETS = Path(flashdmd.__file__).resolve().parent / "world" / "assets"

__all__ = ["Conditioning", "Family", "SDXLFamily", "SD3Family", "FAMILIES", "load_family", "resolve_path",
           "detect_family"]


def resolve_path(path_or_name: str | Path) -> Path:
    """A shipped world name -> its folder under flashdmd/world/assets; anything else -> that path."""
    if str(path_or_name) in WORLD_NAMES:
        return WORLD_ASSETS / str(path_or_name)
    return Path(path_or_name).expanduser()


def detect_family(path: str | Path) -> str:
    """The family name of a pipeline folder, from model_index.json's ``_class_name``."""
    path = Path(path)
    found = read_model_index(path).get("_class_name")
    if found not in PIPELINE_FAMILIES:
        known = ", ".join(f"{k} ({v})" for k, v in PIPELINE_FAMILIES.items())
        raise FlashDMDError(f"{path} holds a {found} pipeline; supported: {known}")
    return PIPELINE_FAMILIES[found]


def load_family(path_or_name: str | Path, family: str | None = None, device: str | torch.device = "cpu",
                dtype: torch.dtype = torch.float32) -> Family:
    """Load a pipeline folder (or a shipped world name) as its :class:`Family` adapter.

    ``family`` None detects it; naming one checks that the folder really is that family.
    """
    path = resolve_path(path_or_name)
    if family is not None and family not in FAMILIES:
        raise FlashDMDError(f"unknown family {family!r}; use one of {sorted(FAMILIES)} or omit it to detect")
    name = family or detect_family(path)
    return FAMILIES[name](path, device=device, dtype=dtype)
