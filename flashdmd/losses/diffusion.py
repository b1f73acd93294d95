"""Denoising (diffusion) loss for the fake score: a network's raw prediction against its target.

The target is whatever the network predicts in its own parameterisation -- eps for an eps-UNet (DMD2's
fake-score loss), u = eps - x0 for a flow transformer -- or x0 if the config asks for the x0 target that
the Flash-DMD Algorithm-1 transcription writes. Returns the per-sample mean squared error (B,).
"""
from __future__ import annotations

from torch import Tensor


def denoising_loss(pred: Tensor, target: Tensor, weight: Tensor | None = None) -> Tensor:
    err = ((pred.float() - target.float()) ** 2).reshape(pred.shape[0], -1).mean(dim=1)
    return err if weight is None else err * weight
