"""Preference judges: who decides which of two images of the same prompt is better.

A judge scores images against their prompts (higher = preferred) and turns two scores into a choice::

    judge.score(images, prompts)                     # images (N, 3, H, W) in [-1, 1], N prompts -> (N,) float
    judge.prefer(a, b, prompts, temperature, gen)    # -> (N,) bool, True where a is preferred

``prefer`` is :func:`choose` of the two scores: at ``temperature`` 0 the higher score wins (ties go to
``a``); at ``temperature`` > 0 a noisy Bradley-Terry rater draws ``a`` with probability
``sigmoid((score(a) - score(b)) / temperature)`` (one uniform per pair from ``generator``, drawn on CPU).
`flashdmd reward make-pairs` relies on that identity: it scores each image once and calls :func:`choose`.

Judges for real models come from local weights through the metric backends
(:mod:`flashdmd.evaluation.backends`): ``pickscore``, ``hpsv2``, ``imagereward``, ``clip`` -- see
:func:`load_judge`. A plug-in may provide its own judge (the embedded world's preference oracle); optional
extras a judge may have:

* ``label_of(prompt) -> int | None``: the class a prompt names; make-pairs then records ``label``;
* ``check_prompts(prompts)``: raise a one-line :class:`flashdmd.FlashDMDError` for prompts it cannot judge
  (called before any sampling).
"""
from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from flashdmd import FlashDMDError
from flashdmd.evaluation.backends import check_images, load_scorer, score_batched

JUDGES = ("pickscore", "hpsv2", "imagereward", "clip")  # metric backends that score (image, prompt) pairs


@runtime_checkable
class Judge(Protocol):
    """A preference judge. ``name`` and ``path`` (its weights, or None) are recorded with the pairs it judges."""

    name: str
    path: str | None

    def score(self, images: Tensor, prompts: list[str]) -> Tensor:
        """(N, 3, H, W) in [-1, 1] and N prompts -> (N,) float32 on CPU, higher = preferred."""
        ...

    def prefer(self, images_a: Tensor, images_b: Tensor, prompts: list[str], temperature: float = 0.0,
               generator: torch.Generator | None = None) -> Tensor:
        """(N,) bool, True where ``images_a`` is preferred: :func:`choose` of the two scores."""
        ...


def choose(score_a: Tensor, score_b: Tensor, temperature: float = 0.0,
           generator: torch.Generator | None = None) -> Tensor:
    """(N,) bool, True where ``a`` is preferred, from the two (N,) scores.

    ``temperature`` <= 0: ``score_a >= score_b`` (ties -> a). ``temperature`` > 0: Bradley-Terry,
    P(a) = sigmoid((score_a - score_b) / temperature), one uniform per pair drawn on CPU from ``generator``.
    """
    if score_a.shape != score_b.shape:
        raise FlashDMDError(f"choose() needs scores of the same shape, got {tuple(score_a.shape)} and "
                            f"{tuple(score_b.shape)}")
    d = score_a - score_b
    if temperature <= 0:
        return (d >= 0).cpu()
    u = torch.rand(d.shape, generator=generator, device="cpu")
    return (u.to(d.device) < torch.sigmoid(d / temperature)).cpu()


class JudgeBase:
    """``prefer`` from ``score`` (subclasses give ``name``, ``path`` and ``score``)."""

    name: str = "judge"
    path: str | None = None

    def score(self, images: Tensor, prompts: list[str]) -> Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def prefer(self, images_a: Tensor, images_b: Tensor, prompts: list[str], temperature: float = 0.0,
               generator: torch.Generator | None = None) -> Tensor:
        if images_a.shape != images_b.shape:
            raise FlashDMDError(f"prefer() needs a and b of the same shape, got {tuple(images_a.shape)} and "
                                f"{tuple(images_b.shape)}")
        return choose(self.score(images_a, prompts), self.score(images_b, prompts), temperature, generator)


class ScorerJudge(JudgeBase):
    """A metric backend (PickScore, HPSv2, ImageReward, CLIP score) from a local folder, as a judge.

    Scores are the backend's own (PickScore: 100 * cos scaled by its logit scale; CLIP: 100 * max(cos, 0);
    ...), computed in batches of ``batch_size``; see :mod:`flashdmd.evaluation.backends` for the folders.
    """

    def __init__(self, name: str, path: str | Path, device="cpu", batch_size: int = 32):
        if name not in JUDGES:
            raise FlashDMDError(f"unknown judge {name!r}; choose one of {', '.join(JUDGES)}")
        self.name, self.path, self.batch_size = name, str(path), batch_size
        self.scorer = load_scorer(name, path, device=device)

    @torch.no_grad()
    def score(self, images: Tensor, prompts: list[str]) -> Tensor:
        check_images(images, prompts)
        return score_batched(self.scorer, images, list(prompts), self.batch_size).float()


def load_judge(name: str, path: str | Path | None, device="cpu") -> ScorerJudge:
    """The judge ``name`` (one of :data:`JUDGES`) from the local folder ``path``; one-line errors for an
    unknown name, a missing path, or a folder that does not hold what that backend needs."""
    if name not in JUDGES:
        raise FlashDMDError(f"unknown judge {name!r}; choose one of {', '.join(JUDGES)}")
    if path is None:
        raise FlashDMDError(f"judge {name} needs its local weights: give --judge-model PATH")
    return ScorerJudge(name, path, device=device)
