"""Exponential moving averages of weights: one update, three users.

    average <- decay * average + (1 - decay) * value          (:func:`lerp_`: ``average.lerp_(value, 1 - decay)``)

* :func:`ema_pull_` -- Flash-DMD's stabilised score estimator: after every generator update the fake score's
  trainable weights are pulled toward the student's (``fake_score_ema``), matched by name.
* :class:`StudentEMA` -- the student's average (``student_ema``) that evaluations, sample grids and the saved student
  use while training continues on the raw weights; by canonical name, each rank its own shards under FSDP2.
* the embedded world's pretraining averages its networks with :func:`lerp_` (flashdmd/world/pretrain.py).
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import Tensor, nn

from flashdmd.training.parallel import canonical, full_tensor, like


@torch.no_grad()
def lerp_(averages: Iterable[Tensor], values: Iterable[Tensor], decay: float) -> None:
    """``average <- decay * average + (1 - decay) * value`` for each pair, in the average's dtype."""
    for avg, value in zip(averages, values, strict=True):
        avg.lerp_(value.detach().to(avg.dtype), 1.0 - decay)


@torch.no_grad()
def ema_pull_(target: nn.Module, source: nn.Module, lam: float) -> None:
    """Flash-DMD's stabilised score estimator: psi <- lam * psi + (1 - lam) * theta over the trainable
    parameters (all weights for a full fine-tune, the LoRA weights for LoRA), matched by name."""
    src = dict(source.named_parameters())
    pairs = [(p, src[name]) for name, p in target.named_parameters() if p.requires_grad]
    lerp_([p for p, _ in pairs], [s for _, s in pairs], lam)


class StudentEMA:
    """Exponential moving average of the student's trainable weights (``student_ema``), by canonical name; under
    FSDP2 each rank keeps the EMA of its own shards. Training continues on the raw weights; evaluations, grids
    and the saved student use these."""

    def __init__(self, student: nn.Module, decay: float):
        self.decay = decay
        self.params = {canonical(n): p.detach().clone() for n, p in student.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, student: nn.Module) -> None:
        trained = [(canonical(n), p) for n, p in student.named_parameters() if p.requires_grad]
        lerp_([self.params[n] for n, _ in trained], [p for _, p in trained], self.decay)

    @torch.no_grad()
    def copy_to(self, student: nn.Module) -> None:
        """Load the EMA weights into the student's trainable ones (each rank its own shards under FSDP2)."""
        for n, p in student.named_parameters():
            if p.requires_grad:
                p.copy_(self.params[canonical(n)].to(p.dtype))

    def full_state(self) -> dict:
        """Full CPU tensors (a collective under FSDP: every rank calls it)."""
        return {n: full_tensor(t) for n, t in self.params.items()}

    @torch.no_grad()
    def load_full_state(self, state: dict) -> None:
        for n, t in self.params.items():
            t.copy_(like(state[n], t))
