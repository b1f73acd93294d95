"""Losses as pure functions of tensors: one file, so that a Stage-1 iteration is followed from the CLI to its losses
in five files (docs/ARCHITECTURE.md). Each returns a per-sample tensor of shape (B,); the caller reduces (usually
``.mean()``) and weights. No optimiser, I/O or config in here.

* :func:`dmd_loss` / :func:`dmd_gradient` -- distribution matching (the generator's high-noise steps);
* :func:`denoising_loss` -- the fake score's diffusion loss;
* :func:`d_loss` / :func:`g_loss` -- the GAN losses of the discriminator and the generator's low-noise step;
* :func:`lcm_step_log_prob`, :func:`step_dpo_loss`, :func:`step_kl` -- Stage 2's step-level DPO.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["denoising_loss", "dmd_gradient", "dmd_loss", "lcm_step_log_prob", "step_dpo_loss", "step_kl", "d_loss",
           "g_loss", "GAN_LOSSES"]


# ----------------------------------------------------------------------------------------------------
# Distribution-matching loss (DMD / DMD2), written through x0 so it serves eps and flow teachers.
#
# With x_t = alpha*x + sigma*eps a noised copy of the student's sample x, the score difference is
#     s_real - s_fake = -(x_t - alpha*x0_real)/sigma^2 + (x_t - alpha*x0_fake)/sigma^2
#                     = alpha/sigma^2 * (x0_real - x0_fake).
# DMD2 (``compute_distribution_matching_loss``) drops the time weight and normalises per sample:
#
#     grad = (x0_fake - x0_real) / mean_{C,H,W} |x - x0_real|          (nan_to_num'd)
#     loss = 0.5 * mean_{C,H,W} (x - sg(x - grad))^2
#
# so that d loss / d x = grad / (C*H*W): gradient *descent* moves x toward the teacher's x0 and away
# from the fake score's, i.e. along  -grad  = x0_real - x0_fake  (the sign peers have got wrong).


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


# ----------------------------------------------------------------------------------------------------
# Denoising (diffusion) loss for the fake score: a network's raw prediction against its target.
#
# The target is whatever the network predicts in its own parameterisation -- eps for an eps-UNet (DMD2's
# fake-score loss), u = eps - x0 for a flow transformer -- or x0 if the config asks for the x0 target that
# the Flash-DMD Algorithm-1 transcription writes. Returns the per-sample mean squared error (B,).


def denoising_loss(pred: Tensor, target: Tensor, weight: Tensor | None = None) -> Tensor:
    err = ((pred.float() - target.float()) ** 2).reshape(pred.shape[0], -1).mean(dim=1)
    return err if weight is None else err * weight


# ----------------------------------------------------------------------------------------------------
# GAN losses over one or several discriminator heads.
#
# ``logits`` is a tensor (B, ...) or a list of them (one per head / feature level); every element is a
# logit and each sample's loss is the mean over its logits, averaged across heads.
#
# * ``hinge``  (ADM / Algorithm 1 of Flash-DMD): D: relu(1 - D(real)) + relu(1 + D(fake)); G: -D(fake)
# * ``ns``     non-saturating (Eq. 10, DMD2):     D: softplus(-D(real)) + softplus(D(fake)); G: softplus(-D(fake))


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


# ----------------------------------------------------------------------------------------------------
# Step-level DPO (SPO / LPO style) for a few-step student whose transition is the LCM step.
#
# The student at x_t predicts x0_theta and moves to the next student step t' by
#     x_{t'} = alpha' * x0_theta + sigma' * n,  n ~ N(0, I)
# so the transition density is Gaussian:  p_theta(x_{t'} | x_t) = N(alpha' x0_theta, sigma'^2 I) and
#
#     log p_theta(x_{t'} | x_t) = -||x_{t'} - alpha' x0_theta||^2 / (2 sigma'^2) + const.
#
# We return it *per element* (divided by the number of latent elements), as DDPO / SPO / LPO compute
# their step log-probabilities, so that beta means the same thing at any resolution (LPO: beta = 500).
#
# For a winner/loser pair (x_w, x_l) of next latents drawn from the same x_t, with a frozen reference
# policy, the DPO objective is
#     H = [log p_theta(x_w) - log p_ref(x_w)] - [log p_theta(x_l) - log p_ref(x_l)]
#     L = -log sigmoid(beta * H).
# The constants cancel inside each log-ratio.
#
# The KL-anchored alternative to ongoing distillation (``step_kl``) penalises the same Gaussian step policy's
# divergence from the reference, KL(p_theta(. | x_t) || p_ref(. | x_t)) = alpha'^2 ||x0_theta - x0_ref||^2 / (2 sigma'^2),
# also per element -- the explicit KL term that DPO's objective only implies (DPOK's and ReFL-style anchors).


def lcm_step_log_prob(x_next: Tensor, x0_pred: Tensor, alpha_next: Tensor, sigma_next: Tensor) -> Tensor:
    """log N(x_next; alpha' x0_pred, sigma'^2 I) without its constant, per latent element, per sample (B,).

    alpha_next, sigma_next: (B,) tensors of the next step's schedule values."""
    a = alpha_next.reshape((-1,) + (1,) * (x_next.ndim - 1))
    sq = ((x_next.float() - a * x0_pred.float()) ** 2).reshape(x_next.shape[0], -1).mean(dim=1)
    return -sq / (2 * sigma_next.float() ** 2)


def step_kl(x0_pred: Tensor, x0_ref: Tensor, alpha_next: Tensor, sigma_next: Tensor) -> Tensor:
    """KL(N(alpha' x0_pred, sigma'^2 I) || N(alpha' x0_ref, sigma'^2 I)) per latent element, per sample (B,): the
    student's LCM-step policy against the reference's from the same x_t, in lcm_step_log_prob's units."""
    a = alpha_next.reshape((-1,) + (1,) * (x0_pred.ndim - 1))
    sq = ((a * (x0_pred.float() - x0_ref.float())) ** 2).reshape(x0_pred.shape[0], -1).mean(dim=1)
    return sq / (2 * sigma_next.float() ** 2)


def step_dpo_loss(logp_w: Tensor, logp_ref_w: Tensor, logp_l: Tensor, logp_ref_l: Tensor, beta: float,
                  ratio_clip: float | None = None) -> Tensor:
    """-log sigmoid(beta * H) per sample (B,). ``ratio_clip`` (LPO's 0.1-style clamp) bounds each
    log-ratio to [log(1-c), log(1+c)] (gradient stops outside, as in LPO); None keeps plain DPO."""
    r_w = logp_w - logp_ref_w.detach()
    r_l = logp_l - logp_ref_l.detach()
    if ratio_clip is not None:
        lo, hi = torch.log1p(torch.tensor(-ratio_clip)), torch.log1p(torch.tensor(ratio_clip))
        r_w, r_l = r_w.clamp(lo, hi), r_l.clamp(lo, hi)
    return -F.logsigmoid(beta * (r_w - r_l))
