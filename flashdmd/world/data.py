"""Fashion-MNIST (Zalando, MIT licence) from the Debian package ``dataset-fashion-mnist``.

Images are 28x28 uint8, zero-padded to 32x32 (2 pixels on each side) and returned as float tensors
in [-1, 1] with shape (N, 1, 32, 32). Colour pipelines (the VAE) see the grey image replicated to
3 channels (:func:`to_rgb`).
"""
from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from flashdmd import FlashDMDError

if TYPE_CHECKING:  # torch loads with the first split: the class names come free (the world's prompts, a command line)
    from torch import Tensor

DEFAULT_DIRS = ("/usr/share/datasets/fashion-mnist",)
ENV_VAR = "FLASHDMD_FASHION_MNIST"
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
CLASS_NAMES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
               "ankle boot")
IMAGE_SIZE = 32


@dataclass
class Split:
    images: Tensor  # (N, 1, 32, 32) float32 in [-1, 1]
    labels: Tensor  # (N,) int64 in [0, 10)

    def __len__(self) -> int:
        return len(self.labels)


def find_root(root: str | os.PathLike | None = None) -> Path:
    """The folder holding the four IDX files: ``root``, $FLASHDMD_FASHION_MNIST, or the Debian path."""
    candidates = [root] if root else [os.environ.get(ENV_VAR)] + list(DEFAULT_DIRS)
    for c in candidates:
        if c and all((Path(c) / f).is_file() for pair in FILES.values() for f in pair):
            return Path(c)
    where = root or f"${ENV_VAR} or {DEFAULT_DIRS[0]}"
    raise FlashDMDError(f"Fashion-MNIST IDX files not found in {where}: run `apt-get install dataset-fashion-mnist` "
                        f"or set {ENV_VAR}=DIR to a folder holding {', '.join(FILES['train'] + FILES['test'])}")


def _read_idx(path: Path, offset: int) -> np.ndarray:
    try:
        with gzip.open(path, "rb") as f:
            return np.frombuffer(f.read(), np.uint8, offset=offset)
    except (OSError, EOFError) as e:
        raise FlashDMDError(f"cannot read IDX file {path}: {e}") from None


@lru_cache(maxsize=4)
def load_split(split: str = "train", root: str | None = None) -> Split:
    """Load ``train`` (60 000) or ``test`` (10 000) as a :class:`Split` of 32x32 images in [-1, 1]."""
    import torch
    if split not in FILES:
        raise FlashDMDError(f"unknown split {split!r}; use 'train' or 'test'")
    d = find_root(root)
    img_f, lab_f = FILES[split]
    raw = _read_idx(d / img_f, 16)
    labels = _read_idx(d / lab_f, 8)
    if raw.size != labels.size * 28 * 28:
        raise FlashDMDError(f"{d / img_f}: {raw.size} bytes of pixels do not match {labels.size} labels of 28x28")
    x = torch.from_numpy(raw.reshape(-1, 1, 28, 28).astype(np.float32) / 127.5 - 1.0)
    x = torch.nn.functional.pad(x, (2, 2, 2, 2), value=-1.0)
    return Split(images=x, labels=torch.from_numpy(labels.astype(np.int64)))


def to_rgb(x: Tensor) -> Tensor:
    """(N, 1, H, W) grey -> (N, 3, H, W) by replication (the VAE works on RGB like the real ones)."""
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


def to_grey(x: Tensor) -> Tensor:
    """(N, 3, H, W) -> (N, 1, H, W) by channel mean; identity on grey input."""
    return x.mean(dim=1, keepdim=True) if x.shape[1] == 3 else x
