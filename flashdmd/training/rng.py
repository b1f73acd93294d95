"""Randomness indexed by *global sample*, so that a run's draws do not depend on how its global batch is
split across processes, and its whole RNG state is one counter.

Every draw d (a counter, identical on every rank because every rank runs the same code path) of a per-sample
quantity gives sample g of the global batch its own generator seeded from (seed, d, g). Rank r of N holds the
global indices [r*B, (r+1)*B). One process with batch N*B therefore draws exactly what N processes with batch B
draw together, and DDP's gradient average equals the single-process mean over the global batch.
Draws shared by all samples (which student step this iteration trains) use (seed, d) alone.
"""
from __future__ import annotations

import random

import torch
from torch import Tensor

_MASK = (1 << 63) - 1


def _seed(*parts: int) -> int:
    # tuples of ints hash deterministically across processes (PYTHONHASHSEED only salts str/bytes)
    return hash(parts) & _MASK


class SampleRNG:
    def __init__(self, seed: int, rank: int = 0, local_batch: int = 1):
        self.seed, self.offset, self.draw = int(seed), int(rank) * int(local_batch), 0

    def _next(self) -> int:
        self.draw += 1
        return self.draw

    def _gen(self, d: int, g: int) -> torch.Generator:
        return torch.Generator().manual_seed(_seed(self.seed, d, g))

    def randn(self, shape, device="cpu", dtype=torch.float32) -> Tensor:
        """Standard normal (shape[0] = local batch; row j is global sample offset + j)."""
        d = self._next()
        rows = [torch.randn(tuple(shape[1:]), generator=self._gen(d, self.offset + j)) for j in range(shape[0])]
        return torch.stack(rows).to(device=device, dtype=dtype)

    def randn_like(self, x: Tensor) -> Tensor:
        return self.randn(x.shape, x.device, x.dtype)

    def rand(self, n: int, device="cpu") -> Tensor:
        """U[0, 1) per sample, (n,) float32."""
        d = self._next()
        return torch.stack([torch.rand((), generator=self._gen(d, self.offset + j)) for j in range(n)]).to(device)

    def python(self, n: int) -> list[random.Random]:
        """One python RNG per sample (for prompt templates and the like)."""
        d = self._next()
        return [random.Random(_seed(self.seed, d, self.offset + j)) for j in range(n)]

    def shared_randrange(self, n: int) -> int:
        """An integer in [0, n) that every rank draws identically."""
        return random.Random(_seed(self.seed, self._next(), -1)).randrange(n)

    def state_dict(self) -> dict:
        return {"seed": self.seed, "offset": self.offset, "draw": self.draw}

    def load_state_dict(self, s: dict):
        """Continue the draws of ``s``. The offset (where this process's samples sit in the global batch) stays
        this generator's own: a run resumed on another number of processes with the same global batch draws
        what the saved run would have drawn."""
        self.seed, self.draw = s["seed"], s["draw"]
