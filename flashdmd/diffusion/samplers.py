"""Samplers written once in x0/eps form, so they serve eps-UNets and flow transformers alike.

A *denoiser* is any callable ``denoise(x_t, t) -> (x0, eps)`` with ``t`` a (B,) tensor of model
timesteps. One step from t_k to t_{k+1} re-noises the clean estimate:

    x_{k+1} = alpha_{k+1} * x0_k + sigma_{k+1} * n_k

* ``n_k = eps_k`` (deterministic) is DDIM; for a VP schedule it is exactly Euler on the probability
  flow ODE in sigma/alpha coordinates (diffusers' EulerDiscreteScheduler), and for a flow schedule it is
  exactly FlowMatchEulerDiscreteScheduler's Euler step x + (sigma' - sigma) * u.
* ``n_k ~ N(0, I)`` fresh (stochastic) is the few-step consistency / DMD2 student sampler (LCM-style).

The last step returns its x0 (the step to sigma = 0). :func:`backward_simulate` runs the same loop
with the same random draws and stops early, so a training input at student step k is distributed
exactly like the student sampler's latent at that step (DMD2 ``sample_backward``).
"""
from __future__ import annotations

from typing import Callable, Iterator, Sequence

import torch
from torch import Tensor

from flashdmd.diffusion.parameterization import bcast

Denoiser = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]


def _t(t: float, x: Tensor) -> Tensor:
    return torch.full((x.shape[0],), float(t), device=x.device, dtype=torch.float32)


def renoise(x0: Tensor, eps: Tensor, t_next: float, schedule, *, stochastic: bool,
            generator: torch.Generator | None = None) -> Tensor:
    """x_{k+1} = alpha(t_next) x0 + sigma(t_next) n, n = eps (ODE) or fresh N(0, I) (stochastic)."""
    a, s = schedule.alpha_sigma(_t(t_next, x0))
    if not stochastic:
        noise = eps
    elif hasattr(generator, "randn_like"):  # flashdmd.training.rng.SampleRNG: per-sample indexed draws
        noise = generator.randn_like(x0)
    else:
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    return bcast(a, x0) * x0 + bcast(s, x0) * noise


def trajectory(denoise: Denoiser, x_T: Tensor, timesteps: Sequence[float], schedule, *,
               stochastic: bool, generator: torch.Generator | None = None) -> Iterator[tuple[int, Tensor, Tensor]]:
    """Yield (k, x_t at timesteps[k], x0 predicted there) for every step, in order.

    Re-noising draws *fresh* noise from ``generator`` (stochastic) -- never the training noise.
    """
    x = x_T
    for k, t in enumerate(timesteps):
        x0, eps = denoise(x, _t(t, x))
        yield k, x, x0
        if k + 1 < len(timesteps):
            x = renoise(x0, eps, timesteps[k + 1], schedule, stochastic=stochastic, generator=generator)


@torch.no_grad()
def sample(denoise: Denoiser, x_T: Tensor, timesteps: Sequence[float], schedule, *,
           stochastic: bool = False, generator: torch.Generator | None = None) -> Tensor:
    """Run all steps and return the final clean estimate x0 (latent)."""
    x0 = None
    for _, _, x0 in trajectory(denoise, x_T, timesteps, schedule, stochastic=stochastic, generator=generator):
        pass
    return x0


@torch.no_grad()
def backward_simulate(denoise: Denoiser, x_T: Tensor, timesteps: Sequence[float], schedule, k: int, *,
                      generator: torch.Generator | None = None) -> Tensor:
    """The student's latent at step ``k`` (x_T itself for k = 0), by the stochastic student sampler.

    Runs k no-grad student steps from ``x_T`` with fresh re-noising -- the same draws, in the same order,
    as :func:`sample` with ``stochastic=True`` and the same generator.
    """
    if not 0 <= k < len(timesteps):
        raise ValueError(f"backward_simulate: step index {k} outside 0..{len(timesteps) - 1}")
    x = x_T
    for j in range(k):
        x0, eps = denoise(x, _t(timesteps[j], x))
        x = renoise(x0, eps, timesteps[j + 1], schedule, stochastic=True, generator=generator)
    return x
