"""GAN losses over one or several discriminator heads.

``logits`` is a tensor (B, ...) or a list of them (one per head / feature level); every element is a
logit and each sample's loss is the mean over its logits, averaged across heads.

* ``hinge``  (ADM / Algorithm 1 of Flash-DMD): D: relu(1 - D(real)) + relu(1 + D(fake)); G: -D(fake)
* ``ns``     non-saturating (Eq. 10, DMD2):     D: softplus(-D(real)) + softplus(D(fake)); G: softplus(-D(fake))
"""
from __future__ import annotations

from typing import Sequence

import torch.nn.functional as F
from torch import Tensor

GAN_LOSSES = ("hinge", "ns")


def _per_sample(logits: Tensor | Sequence[Tensor], fn) -> Tensor:
    heads = [logits] if isinstance(logits, Tensor) else list(logits)
    per_head = [fn(h.float()).reshape(h.shape[0], -1).mean(dim=1) for h in heads]
    return sum(per_head) / len(per_head)


def d_loss(real_logits, fake_logits, kind: str = "hinge") -> Tensor:
    """Discriminator loss per sample (B,); real and fake batches must have the same size."""
    if kind == "hinge":
        return _per_sample(real_logits, lambda r: F.relu(1 - r)) + _per_sample(fake_logits, lambda f: F.relu(1 + f))
    if kind == "ns":
        return _per_sample(real_logits, lambda r: F.softplus(-r)) + _per_sample(fake_logits, F.softplus)
    raise ValueError(f"unknown GAN loss {kind!r}; expected one of {GAN_LOSSES}")


def g_loss(fake_logits, kind: str = "hinge") -> Tensor:
    """Generator loss per sample (B,)."""
    if kind == "hinge":
        return _per_sample(fake_logits, lambda f: -f)
    if kind == "ns":
        return _per_sample(fake_logits, lambda f: F.softplus(-f))
    raise ValueError(f"unknown GAN loss {kind!r}; expected one of {GAN_LOSSES}")
