"""Step-level DPO (SPO / LPO style) for a few-step student whose transition is the LCM step.

The student at x_t predicts x0_theta and moves to the next student step t' by
    x_{t'} = alpha' * x0_theta + sigma' * n,  n ~ N(0, I)
so the transition density is Gaussian:  p_theta(x_{t'} | x_t) = N(alpha' x0_theta, sigma'^2 I) and

    log p_theta(x_{t'} | x_t) = -||x_{t'} - alpha' x0_theta||^2 / (2 sigma'^2) + const.

We return it *per element* (divided by the number of latent elements), as DDPO / SPO / LPO compute
their step log-probabilities, so that beta means the same thing at any resolution (LPO: beta = 500).

For a winner/loser pair (x_w, x_l) of next latents drawn from the same x_t, with a frozen reference
policy, the DPO objective is
    H = [log p_theta(x_w) - log p_ref(x_w)] - [log p_theta(x_l) - log p_ref(x_l)]
    L = -log sigmoid(beta * H).
The constants cancel inside each log-ratio.

The KL-anchored alternative to ongoing distillation (``step_kl``) penalises the same Gaussian step policy's
divergence from the reference, KL(p_theta(. | x_t) || p_ref(. | x_t)) = alpha'^2 ||x0_theta - x0_ref||^2 / (2 sigma'^2),
also per element -- the explicit KL term that DPO's objective only implies (DPOK's and ReFL-style anchors).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


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
