"""Training inputs: prompt sources and real-image sources (for the GAN), infinite and seeded.

* prompts: ``world`` (class templates of the embedded world) or a UTF-8 text file, one prompt per line.
* real images: ``world`` (Fashion-MNIST train split, grey replicated to RGB) or a folder of images that
  must already have the model's resolution (we never silently rescale a user's data).
Both yield tensors on CPU; the loop moves them.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from flashdmd import FlashDMDError

MAX_PROMPT_CHARS = 2000
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def read_prompt_file(path: str | Path) -> list[str]:
    """Non-empty lines of a UTF-8 text file. One-line errors for missing, binary, empty or absurd files."""
    p = Path(path)
    if not p.is_file():
        raise FlashDMDError(f"prompt file {p} not found")
    raw = p.read_bytes()
    if b"\x00" in raw:
        raise FlashDMDError(f"prompt file {p} looks binary (contains NUL bytes): give a UTF-8 text file, one prompt per line")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise FlashDMDError(f"prompt file {p} is not UTF-8 text (byte {e.start}): re-save it as UTF-8") from None
    prompts = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not prompts:
        raise FlashDMDError(f"prompt file {p} has no prompts: write one prompt per line")
    for i, ln in enumerate(prompts):
        if len(ln) > MAX_PROMPT_CHARS:
            raise FlashDMDError(f"prompt file {p}: prompt {i + 1} has {len(ln)} characters (max {MAX_PROMPT_CHARS})")
    return prompts


class PromptSource:
    """Draws batches of prompts (and, for the world, their class labels), one RNG per sample
    (``rng``: flashdmd.training.rng.SampleRNG, so the draw does not depend on the process split)."""

    def __init__(self, spec: str):
        self.world = spec == "world"
        self.prompts = None if self.world else read_prompt_file(spec)

    def sample(self, n: int, rng) -> tuple[list[str], list[int] | None]:
        rngs = rng.python(n)
        if self.world:
            from flashdmd.world.prompts import prompt_for
            labels = [r.randrange(10) for r in rngs]
            return [prompt_for(y, r) for y, r in zip(labels, rngs)], labels
        return [r.choice(self.prompts) for r in rngs], None


def _load_image_folder(folder: Path, resolution: int) -> Tensor:
    from PIL import Image, UnidentifiedImageError
    files = sorted(f for f in folder.rglob("*") if f.suffix.lower() in IMAGE_EXTS)
    if not files:
        raise FlashDMDError(f"real-image folder {folder} holds no images ({', '.join(IMAGE_EXTS)})")
    out = []
    for f in files:
        try:
            im = Image.open(f)
            im.load()
        except (UnidentifiedImageError, OSError):
            raise FlashDMDError(f"real image {f} cannot be read as an image") from None
        if im.size != (resolution, resolution):
            raise FlashDMDError(f"real image {f} is {im.size[0]}x{im.size[1]}, the model needs {resolution}x{resolution}: "
                                "resize/crop your dataset first")
        arr = np.asarray(im.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
        out.append(torch.from_numpy(arr).permute(2, 0, 1))
    return torch.stack(out)


class RealImageSource:
    """Random batches of real RGB images (B, 3, H, W) in [-1, 1]."""

    def __init__(self, spec: str, resolution: int):
        if spec == "world":
            from flashdmd.world.data import load_split, to_rgb
            imgs = load_split("train").images
            if imgs.shape[-1] != resolution:
                raise FlashDMDError(f"the world's images are {imgs.shape[-1]}px but the teacher works at {resolution}px")
            self.images = to_rgb(imgs)
            self.labels = load_split("train").labels
        else:
            p = Path(spec)
            if not p.is_dir():
                raise FlashDMDError(f"data_real {spec!r} is neither 'world' nor a folder of images")
            self.images = _load_image_folder(p, resolution)
            self.labels = None

    def evenly_spaced(self, n: int) -> Tensor:
        """``n`` images (at most all) evenly spaced through the set: the same on every process, no RNG draw."""
        idx = torch.linspace(0, len(self.images) - 1, min(n, len(self.images))).round().long()
        return self.images[idx].contiguous()

    def sample(self, n: int, rng) -> tuple[Tensor, list[int] | None]:
        """(images (n, 3, H, W) in [-1, 1], their world class labels or None); one index draw per sample."""
        idx = torch.tensor([r.randrange(len(self.images)) for r in rng.python(n)])
        labels = None if self.labels is None else self.labels[idx].tolist()
        return self.images[idx].contiguous(), labels
