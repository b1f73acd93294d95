"""Metric backends for real (non-world) models: FID Inception, CLIP score, PickScore, HPSv2, ImageReward.

Every backend loads from a *local* path (no hub download, no torchvision) and never unpickles arbitrary
objects. A scoring backend is a small class with::

    backend = Cls.from_pretrained(path, device="cpu")      # one-line FlashDMDError if path is missing / wrong
    scores = backend.score(images, prompts)                 # images (N, 3, H, W) in [-1, 1] -> (N,) float32 CPU

FID is not a per-image score: :class:`flashdmd.evaluation.backends.fid.FIDInception` gives (N, 2048)
features and the Fréchet distance comes from :mod:`flashdmd.evaluation.metrics`.

Images are first quantised to 8-bit levels (as they would be after saving a PNG, which is what the
reference implementations read), then resized / cropped / normalised in torch exactly as each model's
own preprocessing describes (read from its ``preprocessor_config.json`` when the folder has one).
What each backend expects on disk is in its module docstring and in docs/EVALUATION.md.
"""
from __future__ import annotations

import importlib
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import AutoTokenizer
from transformers.utils import logging as hf_logging

from flashdmd import FlashDMDError, io
from flashdmd.families import network_call

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# name -> (module, class); the CLI flag is --NAME, the JSON key is METRIC_KEYS[name]
SCORERS = {
    "clip": ("flashdmd.evaluation.backends.clip_score", "CLIPScore"),
    "pickscore": ("flashdmd.evaluation.backends.pickscore", "PickScore"),
    "hpsv2": ("flashdmd.evaluation.backends.hpsv2", "HPSv2"),
    "imagereward": ("flashdmd.evaluation.backends.imagereward", "ImageReward"),
}
METRIC_KEYS = {"clip": "clip_score", "pickscore": "pickscore", "hpsv2": "hpsv2", "imagereward": "imagereward"}


def scorer_class(name: str):
    # by name (a lazy import: each scorer module imports its transformers model, which a run that does not use
    # that metric never needs; the modules import this package's helpers)
    if name not in SCORERS:
        raise FlashDMDError(f"unknown metric backend {name!r}; known: {', '.join(SCORERS)}")
    module, cls = SCORERS[name]
    return getattr(importlib.import_module(module), cls)


def load_scorer(name: str, path: str | Path, device="cpu"):
    """``scorer_class(name).from_pretrained(path, device)``."""
    return scorer_class(name).from_pretrained(path, device=device)


# ---------------------------------------------------------------------------------------------------
# Shared checks and preprocessing


def require_folder(path: str | Path, what: str, needs: tuple[str, ...] = ("config.json",), hint: str = "") -> Path:
    """A local folder holding every file in ``needs``; otherwise a one-line FlashDMDError naming ``what``."""
    p = Path(path).expanduser()
    tail = f" ({hint})" if hint else ""
    if not p.is_dir():
        raise FlashDMDError(f"{what} folder {p} not found{tail}")
    missing = [n for n in needs if not (p / n).is_file()]
    if missing:
        raise FlashDMDError(f"{what} folder {p} has no {', '.join(missing)}{tail}")
    if not any(p.glob("*.safetensors")) and not any(p.glob("*.bin")):
        raise FlashDMDError(f"{what} folder {p} holds no weights (*.safetensors){tail}")
    return p


def check_images(images: Tensor, prompts=None) -> Tensor:
    if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise FlashDMDError(f"metric backends take images (N, 3, H, W) in [-1, 1], got {shape}")
    if prompts is not None and len(prompts) != images.shape[0]:
        raise FlashDMDError(f"got {len(prompts)} prompts for {images.shape[0]} images")
    return images


def quantize(images: Tensor) -> Tensor:
    """[-1, 1] -> [0, 1] on the 256 levels of an 8-bit PNG (rounding like diffusers' image processor)."""
    return ((images.float() / 2 + 0.5).clamp(0, 1) * 255).round() / 255


def _size(v, default: int) -> tuple[int | None, tuple[int, int] | None]:
    """An image-processor size entry -> (shortest_edge, (h, w)); exactly one of them is set."""
    if v is None:
        return default, None
    if isinstance(v, int):
        return v, None
    if "shortest_edge" in v:
        return int(v["shortest_edge"]), None
    return None, (int(v["height"]), int(v["width"]))


class ImagePreprocess:
    """CLIP/BLIP-style preprocessing in torch: resize (shortest side, or to a fixed (h, w)), centre crop,
    normalise. Bicubic with antialiasing, as PIL does; clamped to [0, 1] after resizing as 8-bit would be."""

    def __init__(self, size: int | None = 224, resize_hw: tuple[int, int] | None = None,
                 crop: tuple[int, int] | None = (224, 224), mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD,
                 mode: str = "bicubic"):
        self.size, self.resize_hw, self.crop, self.mode = size, resize_hw, crop, mode
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)

    @classmethod
    def from_folder(cls, folder: Path, image_size: int, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD):
        """Read ``preprocessor_config.json`` when present; else resize+crop to ``image_size`` with mean/std."""
        f = folder / "preprocessor_config.json"
        if not f.is_file():
            return cls(image_size, None, (image_size, image_size), mean, std)
        c = io.read_json(f)
        short, hw = _size(c.get("size"), image_size) if c.get("do_resize", True) else (None, None)
        crop = None
        if c.get("do_center_crop", "crop_size" in c):
            cs, chw = _size(c.get("crop_size"), image_size)
            crop = chw or (cs, cs)
        mode = {2: "bilinear", 3: "bicubic"}.get(c.get("resample", 3), "bicubic")
        return cls(short, hw, crop, c.get("image_mean", mean), c.get("image_std", std), mode)

    def __call__(self, images: Tensor) -> Tensor:
        x = quantize(images)
        h, w = x.shape[-2:]
        if self.resize_hw is not None:
            size = self.resize_hw
        elif self.size is not None:
            # transformers' get_resize_output_image_size / torchvision Resize(int): short side = size,
            # long side = int(size * long / short) (floored)
            size = (self.size, max(1, int(self.size * w / h))) if h <= w else (max(1, int(self.size * h / w)), self.size)
        else:
            size = (h, w)
        if size != (h, w):
            x = F.interpolate(x, size=size, mode=self.mode, align_corners=False, antialias=True).clamp(0, 1)
        if self.crop is not None:
            ch, cw = self.crop
            h, w = x.shape[-2:]
            if h < ch or w < cw:
                x = F.pad(x, (max(0, (cw - w) // 2), max(0, cw - w - (cw - w) // 2),
                              max(0, (ch - h) // 2), max(0, ch - h - (ch - h) // 2)))
                h, w = x.shape[-2:]
            top, left = (h - ch) // 2, (w - cw) // 2
            x = x[..., top:top + ch, left:left + cw]
        return (x - self.mean.to(x.device)) / self.std.to(x.device)


def load_tokenizer(folder: Path, what: str):
    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FlashDMDError(f"{what} folder {folder} has no usable tokenizer files ({first[:160]})") from None


def load_transformers_model(cls, folder: Path, what: str, device, model_type: str):
    """``cls.from_pretrained(folder)`` offline, in float32, eval mode, frozen. One-line errors for a folder
    of another model type or with weights missing (never silently scores with random weights)."""
    cfg = io.read_json(folder / "config.json", f"{what} folder {folder}: config.json")
    if cfg.get("model_type") != model_type:
        raise FlashDMDError(f"{what} folder {folder} holds a {cfg.get('model_type')!r} model, expected a "
                            f"transformers {cls.__name__} (model_type {model_type!r})")
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model, info = cls.from_pretrained(str(folder), local_files_only=True, output_loading_info=True)
    except (OSError, ValueError, KeyError, RuntimeError, TypeError, AttributeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FlashDMDError(f"{what} folder {folder} does not load as a {cls.__name__} ({first[:200]})") from None
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    missing = [k for k in info.get("missing_keys", []) if not k.endswith("position_ids")]
    if missing or info.get("mismatched_keys"):
        bad = missing or [m[0] if isinstance(m, (tuple, list)) else m for m in info["mismatched_keys"]]
        raise FlashDMDError(f"{what} folder {folder}: {len(bad)} weights missing or mis-shaped "
                            f"(first: {bad[0]}); is it a complete {cls.__name__} checkpoint?")
    return model.eval().requires_grad_(False).to(device=device, dtype=torch.float32)


@torch.no_grad()
def score_batched(scorer, images: Tensor, prompts: list[str], batch_size: int = 32) -> Tensor:
    """``scorer.score`` over batches; (N,) float32 on CPU."""
    nets = [m for m in (getattr(scorer, a, None) for a in ("model", "blip", "head")) if isinstance(m, torch.nn.Module)]
    with network_call(getattr(scorer, "WHAT", type(scorer).__name__), nets, images):
        out = [scorer.score(images[i:i + batch_size], prompts[i:i + batch_size])
               for i in range(0, images.shape[0], batch_size)]
    return torch.cat(out) if out else torch.zeros(0)
