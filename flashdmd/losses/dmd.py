"""Distribution-matching loss (DMD / DMD2), written through x0 so it serves eps and flow teachers.

With x_t = alpha*x + sigma*eps a noised copy of the student's sample x, the score difference is
    s_real - s_fake = -(x_t - alpha*x0_real)/sigma^2 + (x_t - alpha*x0_fake)/sigma^2
                    = alpha/sigma^2 * (x0_real - x0_fake).
DMD2 (``compute_distribution_matching_loss``) drops the time weight and normalises per sample:

    grad = (x0_fake - x0_real) / mean_{C,H,W} |x - x0_real|          (nan_to_num'd)
    loss = 0.5 * mean_{C,H,W} (x - sg(x - grad))^2

so that d loss / d x = grad / (C*H*W): gradient *descent* moves x toward the teacher's x0 and away
from the fake score's, i.e. along  -grad  = x0_real - x0_fake  (the sign peers have got wrong).
"""
from __future__ import annotations

import torch
from torch import Tensor


def _per_sample_mean(x: Tensor) -> Tensor:
    return x.reshape(x.shape[0], -1).mean(dim=1)


def dmd_gradient(x: Tensor, x0_real: Tensor, x0_fake: Tensor, eps: float = 0.0) -> Tensor:
    """The normalised DMD2 gradient (B, ...) -- no graph. ``eps`` guards the normaliser (DMD2 uses 0)."""
    with torch.no_grad():
        norm = _per_sample_mean((x - x0_real).abs()).clamp_min(eps) if eps > 0 else _per_sample_mean((x - x0_real).abs())
        grad = (x0_fake - x0_real) / norm.reshape((-1,) + (1,) * (x.ndim - 1))
        return torch.nan_to_num(grad)


def dmd_loss(x: Tensor, x0_real: Tensor, x0_fake: Tensor, eps: float = 0.0) -> Tensor:
    """Per-sample DM loss (B,). ``x`` carries the student's graph; x0_real (teacher with CFG) and
    x0_fake (fake score, no CFG) are predictions at the same noised x_t and are treated as constants."""
    grad = dmd_gradient(x.detach(), x0_real.detach(), x0_fake.detach(), eps)
    target = (x - grad).detach()
    return 0.5 * _per_sample_mean((x.float() - target.float()) ** 2)
