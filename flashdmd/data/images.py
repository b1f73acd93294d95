"""Decoding one image file and turning any image into a training tensor (3, R, R) in [-1, 1].

Convention: RGB, channel-first float32, value = pixel / 127.5 - 1. The short side is resized to R (PIL bicubic,
which low-pass filters when it shrinks), then an R x R square is cut out: centred, or at an offset drawn from the
caller's ``random.Random`` (so the crop of a sample depends only on how the caller seeds it).
"""
from __future__ import annotations

import io
import random
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from torch import Tensor

# What decoding a broken file raises (PIL raises SyntaxError / EOFError for some truncated PNGs and GIFs).
UNREADABLE = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


def load_image(source: str | Path | bytes) -> Image.Image:
    """Decode a file path or encoded bytes fully now (so a truncated file fails here, not later), EXIF-upright.
    Raises one of :data:`UNREADABLE` for a file that is not a readable image."""
    fh = io.BytesIO(source) if isinstance(source, bytes) else open(source, "rb")
    with fh:
        im = Image.open(fh)
        im.load()
    try:
        # camera photos store their rotation in EXIF; in place: otherwise every upright image is copied
        ImageOps.exif_transpose(im, in_place=True)
    except UNREADABLE:
        pass  # a broken EXIF block is no reason to drop the pixels
    return im


def to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode as 8-bit RGB: transparency composited on white, 16-bit / 32-bit / float scaled to 8 bits."""
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        arr = np.asarray(im, dtype=np.float64)
        if im.mode.startswith("I;16") or (im.mode == "I" and arr.max(initial=0) > 255):
            arr = arr / 257.0  # 16-bit range 0..65535 onto 0..255
        im = Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8), "L")
    if (im.mode == "P" and "transparency" in im.info) or im.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im if im.mode == "RGB" else im.convert("RGB")


def _crop_box(w: int, h: int, r: int, crop: str, rng: random.Random) -> tuple[int, int]:
    """(left, top) of the r x r square inside a w x h image."""
    if crop == "center":
        return (w - r) // 2, (h - r) // 2
    return rng.randint(0, w - r), rng.randint(0, h - r)


def _short_side_size(w: int, h: int, r: int) -> tuple[int, int]:
    """(w', h') with min(w', h') == r and the aspect ratio kept (the long side rounded, never below r)."""
    if w <= h:
        return r, max(r, round(h * r / w))
    return max(r, round(w * r / h)), r


def _pil_to_tensor(im: Image.Image, resolution: int, crop: str, rng: random.Random) -> Tensor:
    im = to_rgb(im)
    if min(im.size) != resolution:
        im = im.resize(_short_side_size(*im.size, resolution), Image.Resampling.BICUBIC)
    left, top = _crop_box(*im.size, resolution, crop, rng)
    # one uint8 view and one float copy: fewer full-size temporaries for the allocator to juggle
    hwc = np.asarray(im)[top:top + resolution, left:left + resolution]
    x = torch.empty(3, resolution, resolution)
    x.numpy()[...] = hwc.transpose(2, 0, 1)  # uint8 -> float32 in one copy
    return x.div_(127.5).sub_(1.0)


def _tensor_to_tensor(x: Tensor, resolution: int, crop: str, rng: random.Random) -> Tensor:
    if x.ndim != 3 or x.shape[0] != 3 or not x.is_floating_point():
        raise ValueError(f"an in-memory image must be a float tensor (3, H, W) in [-1, 1], got {tuple(x.shape)} "
                         f"{x.dtype}")
    h, w = x.shape[1:]
    if (h, w) == (resolution, resolution):
        return x.float()
    if min(h, w) != resolution:
        w2, h2 = _short_side_size(w, h, resolution)
        x = F.interpolate(x[None].float(), size=(h2, w2), mode="bicubic", antialias=True, align_corners=False)[0]
        x = x.clamp(-1, 1)  # bicubic overshoots at edges
    left, top = _crop_box(x.shape[2], x.shape[1], resolution, crop, rng)
    return x[:, top:top + resolution, left:left + resolution].float().contiguous()


def to_training_tensor(img: Image.Image | Tensor, resolution: int, crop: Literal["center", "random"] = "center",
                       rng: random.Random | None = None) -> Tensor:
    """A PIL image (any mode, any size) or a float tensor (3, H, W) in [-1, 1] as a (3, R, R) float32 tensor in
    [-1, 1], R = ``resolution``: short side resized to R, then a centre or random (offsets from ``rng``) crop."""
    if crop not in ("center", "random"):
        raise ValueError(f"crop must be 'center' or 'random', not {crop!r}")
    rng = rng if rng is not None else random.Random(0)
    if isinstance(img, Tensor):
        return _tensor_to_tensor(img, resolution, crop, rng)
    return _pil_to_tensor(img, resolution, crop, rng)
