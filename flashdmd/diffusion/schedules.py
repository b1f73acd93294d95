"""Noise schedules: one :class:`Schedule` base, two implementations.

Every schedule describes the forward process  x_t = alpha_t * x0 + sigma_t * eps  for a tensor of
timesteps ``t`` given in the *model's own timestep units* (the number the network is conditioned on),
t in [t_min, t_max]:

* :class:`VPSchedule` -- discrete variance-preserving schedule as SDXL / SD1.5 use it
  (``scaled_linear`` betas 0.00085 -> 0.012, 1000 training steps). ``t`` is an integer index in
  [0, 999]; alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t).
* :class:`FlowSchedule` -- rectified flow as SD3 uses it. ``t`` = 1000 * sigma in [0, 1000];
  alpha_t = 1 - sigma, sigma_t = sigma. The SD3 *timestep shift* maps an unshifted sigma ``s`` to
  ``shift * s / (1 + (shift - 1) * s)``; it is applied when timesteps are chosen (for sampling and
  training), never inside ``alpha_sigma``.

What differs is ``alpha_sigma``, ``t_max`` and how a uniform number becomes a timestep
(``timesteps_from_uniform``: a discrete grid or a continuous, shifted sigma); the base writes once what follows
from them: ``add_noise`` and ``sample_timesteps(n, lo, hi)`` (training timesteps from a fraction range of the
schedule, DMD2's [0.02, 0.98]).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import torch
from torch import Tensor

from flashdmd import FlashDMDError


def _bcast(v: Tensor, like: Tensor) -> Tensor:
    """Reshape a per-sample vector (B,) to broadcast against ``like`` (B, ...)."""
    return v.reshape(v.shape + (1,) * (like.ndim - v.ndim)).to(like.dtype)


class Schedule:
    """The forward process x_t = alpha_t x0 + sigma_t eps at model timesteps t in [t_min, t_max].

    An implementation gives ``kind`` ("vp" | "flow"), ``num_train_timesteps``, ``shift`` (its timestep shift; 1 =
    none), ``t_max``, :meth:`alpha_sigma` and :meth:`timesteps_from_uniform`."""

    kind: str
    num_train_timesteps: int
    shift: float

    @property
    def t_min(self) -> float:
        return 0.0

    @property
    def t_max(self) -> float:
        raise NotImplementedError

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """alpha_t, sigma_t (float32, the shape of ``t``)."""
        raise NotImplementedError

    def timesteps_from_uniform(self, u: Tensor, lo: float = 0.0, hi: float = 1.0, inclusive: bool = False,
                               shifted: bool = True) -> Tensor:
        """Map u ~ U[0, 1) to a model timestep drawn uniformly from the fraction range [lo, hi) of the schedule --
        [lo, hi] with ``inclusive`` -- through the schedule's timestep shift when ``shifted`` (a schedule without
        one, shift 1, gives the same timesteps either way)."""
        raise NotImplementedError

    def sample_timesteps(self, n: int, lo: float = 0.0, hi: float = 1.0, generator=None,
                         device="cpu") -> Tensor:
        """``n`` timesteps of :meth:`timesteps_from_uniform` from fresh uniform numbers of ``generator``."""
        return self.timesteps_from_uniform(torch.rand((n,), generator=generator, device=device), lo, hi)

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """x_t = alpha_t x0 + sigma_t noise, per sample (t: (B,))."""
        a, s = self.alpha_sigma(torch.as_tensor(t, device=x0.device))
        return _bcast(a, x0) * x0 + _bcast(s, x0) * noise


@dataclass(frozen=True)
class VPSchedule(Schedule):
    """Discrete VP schedule (DDPM). Defaults are SDXL's scheduler config. No timestep shift (``shift`` is 1)."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    kind: str = field(default="vp", init=False)
    shift: float = field(default=1.0, init=False)

    def __post_init__(self):
        if self.beta_schedule not in ("scaled_linear", "linear"):
            raise FlashDMDError(f"VPSchedule: beta_schedule {self.beta_schedule!r} is not supported "
                                "(use 'scaled_linear' or 'linear')")

    @cached_property
    def alphas_cumprod(self) -> Tensor:
        n = self.num_train_timesteps
        if self.beta_schedule == "scaled_linear":
            betas = torch.linspace(self.beta_start ** 0.5, self.beta_end ** 0.5, n, dtype=torch.float32) ** 2
        else:
            betas = torch.linspace(self.beta_start, self.beta_end, n, dtype=torch.float32)
        return torch.cumprod(1.0 - betas, dim=0)

    @property
    def t_max(self) -> float:
        return float(self.num_train_timesteps - 1)

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """alpha_t, sigma_t for integer timesteps t (any shape). Float t is linearly interpolated in abar."""
        t = torch.as_tensor(t)
        acp = self.alphas_cumprod.to(t.device)
        tf = t.to(torch.float32).clamp(self.t_min, self.t_max)
        lo = tf.floor().long()
        hi = tf.ceil().long()
        w = tf - lo.to(torch.float32)
        abar = acp[lo] * (1 - w) + acp[hi] * w
        return abar.sqrt(), (1 - abar).sqrt()

    def timesteps_from_uniform(self, u: Tensor, lo: float = 0.0, hi: float = 1.0, inclusive: bool = False,
                               shifted: bool = True) -> Tensor:
        """Map u ~ U[0, 1) to a uniform integer timestep in [lo*T, hi*T), or [lo*T, hi*T] with ``inclusive``
        (DMD2's DM loss: ``randint(min_step, max_step + 1)``, so 0.02..0.98 gives 20..980). The upper end never
        passes T - 1, so the full range (0, 1) is 0..T-1 either way. No shift: ``shifted`` gives the same steps."""
        a = int(lo * self.num_train_timesteps)
        b = max(a + 1, int(hi * self.num_train_timesteps) + (1 if inclusive else 0))
        b = min(b, self.num_train_timesteps)
        return (a + (u * (b - a)).floor()).clamp(a, b - 1).long()


def shift_sigma(s: Tensor | float, shift: float):
    """SD3 timestep shift: s -> shift*s / (1 + (shift-1)*s). Identity for shift == 1."""
    return shift * s / (1 + (shift - 1) * s)


@dataclass(frozen=True)
class FlowSchedule(Schedule):
    """Rectified-flow schedule: x_t = (1 - sigma) x0 + sigma eps, t = 1000 * sigma. SD3 uses shift 3."""

    num_train_timesteps: int = 1000
    shift: float = 3.0
    kind: str = field(default="flow", init=False)

    def __post_init__(self):
        if self.shift <= 0:
            raise FlashDMDError(f"FlowSchedule: shift must be > 0, got {self.shift}")

    @property
    def t_max(self) -> float:
        return float(self.num_train_timesteps)

    def sigma(self, t: Tensor) -> Tensor:
        return torch.as_tensor(t).to(torch.float32) / self.num_train_timesteps

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        s = self.sigma(t).clamp(0.0, 1.0)
        return 1.0 - s, s

    def shifted_timesteps(self, unshifted_sigmas: Tensor) -> Tensor:
        """Model timesteps (1000*sigma) of unshifted sigmas after the SD3 shift. The shift maps [0, 1] onto itself; in
        float32 k*1 / (1 + (k-1)*1) can round above 1 (k = 2.0008: 1.0000001), so the result is clamped to 1 -- exact
        for sigma 1, and no other value moves."""
        s = shift_sigma(torch.as_tensor(unshifted_sigmas, dtype=torch.float32), self.shift).clamp(max=1.0)
        return s * self.num_train_timesteps

    def timesteps_from_uniform(self, u: Tensor, lo: float = 0.0, hi: float = 1.0, inclusive: bool = False,
                               shifted: bool = True) -> Tensor:
        """Map u ~ U[0, 1) to the shifted model timestep 1000*shift(lo + (hi - lo) u), or with ``shifted=False``
        to 1000*(lo + (hi - lo) u), sigma uniform (FastGen's draw for flow teachers). The draw is continuous: the
        range with or without its upper end (``inclusive``) has the same distribution."""
        s = lo + (hi - lo) * torch.as_tensor(u, dtype=torch.float32)
        return self.shifted_timesteps(s) if shifted else s * self.num_train_timesteps
