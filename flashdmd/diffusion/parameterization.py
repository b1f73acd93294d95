"""Conversions between the network parameterisations, for any x_t = alpha*x0 + sigma*eps.

Four quantities describe a point on the path; given x_t, alpha and sigma, any one determines the rest:

* ``x0``   -- the clean sample
* ``eps``  -- the noise;            x0 = (x_t - sigma*eps) / alpha
* ``v``    -- v-prediction (Salimans & Ho 2022): v = alpha*eps - sigma*x0; for a VP schedule
              (alpha^2 + sigma^2 = 1): x0 = alpha*x_t - sigma*v
* ``flow`` -- rectified-flow velocity u = eps - x0 = d x_t / d sigma when alpha = 1 - sigma;
              in general x0 = (x_t - sigma*u) / (alpha + sigma)

``alpha`` and ``sigma`` are tensors broadcastable to ``x_t`` (use :func:`bcast`). All DMD code asks for
x0 (and eps) and never assumes what the network predicts.
"""
from __future__ import annotations

from torch import Tensor

from flashdmd import FlashDMDError

PREDICTION_TYPES = ("x0", "eps", "v", "flow")


def bcast(v: Tensor, like: Tensor) -> Tensor:
    """(B,) -> (B, 1, 1, 1) so that per-sample alpha/sigma broadcast against ``like``."""
    return v.reshape(v.shape + (1,) * (like.ndim - v.ndim)).to(like.dtype)


def _check(kind: str):
    if kind not in PREDICTION_TYPES:
        raise FlashDMDError(f"unknown prediction type {kind!r}; expected one of {PREDICTION_TYPES}")


def x0_from_eps(x_t, eps, alpha, sigma):
    return (x_t - sigma * eps) / alpha


def eps_from_x0(x_t, x0, alpha, sigma):
    return (x_t - alpha * x0) / sigma


def v_from_x0_eps(x0, eps, alpha, sigma):
    return alpha * eps - sigma * x0


def flow_from_x0_eps(x0, eps):
    return eps - x0


def to_x0_eps(pred: Tensor, kind: str, x_t: Tensor, alpha: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
    """Network output of parameterisation ``kind`` -> (x0, eps). alpha, sigma broadcast to x_t."""
    _check(kind)
    if kind == "x0":
        x0 = pred
        return x0, eps_from_x0(x_t, x0, alpha, sigma)
    if kind == "eps":
        return x0_from_eps(x_t, pred, alpha, sigma), pred
    if kind == "v":
        # x_t = a x0 + s eps, v = a eps - s x0  =>  [x0; eps] = [a -s; s a] [x_t; v] / (a^2 + s^2)
        norm = alpha ** 2 + sigma ** 2
        x0 = (alpha * x_t - sigma * pred) / norm
        eps = (sigma * x_t + alpha * pred) / norm
        return x0, eps
    # flow: u = eps - x0, x_t = a x0 + s (u + x0)
    x0 = (x_t - sigma * pred) / (alpha + sigma)
    return x0, pred + x0


def from_x0_eps(x0: Tensor, eps: Tensor, kind: str, alpha: Tensor, sigma: Tensor) -> Tensor:
    """(x0, eps) -> the quantity a network of parameterisation ``kind`` predicts."""
    _check(kind)
    if kind == "x0":
        return x0
    if kind == "eps":
        return eps
    if kind == "v":
        return v_from_x0_eps(x0, eps, alpha, sigma)
    return flow_from_x0_eps(x0, eps)


def cfg_combine(uncond: Tensor, cond: Tensor, scale: float) -> Tensor:
    """Classifier-free guidance, Ho & Salimans form: uncond + w * (cond - uncond).

    w = 1 returns ``cond``; diffusers' ``guidance_scale`` is this w. Linear, so it may be applied to
    eps, v, flow or x0 predictions alike (at a fixed x_t they are affine in each other).
    """
    return uncond + scale * (cond - uncond)
