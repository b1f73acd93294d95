"""The Evaluator protocol: held-out metrics of a model, each knowing whether higher is better.

An evaluator samples a :class:`flashdmd.inference.Model` on its own held-out prompts and returns a flat
``{metric: float}`` dict (plus bookkeeping such as ``seconds_per_image`` / ``nfe`` / ``num_images`` that is not
in :attr:`higher_is_better`). Training evaluates the student with one every ``eval_every_steps``; the
reward-hacking guard (:func:`worsened`) and the report read :attr:`higher_is_better` to know which way is
good. Implementations: :class:`flashdmd.evaluation.real.RealEvaluator` (FID, CLIP score, PickScore, HPSv2,
ImageReward from local weights on a prompt file) and the embedded world's (FD, alignment, diversity, oracle).
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable


@runtime_checkable
class Evaluator(Protocol):
    higher_is_better: dict[str, bool]

    def evaluate(self, model, seed: int = 0, steps: int | None = None, guidance_scale: float | None = None,
                 progress: bool = False) -> dict[str, float]:
        """Metrics of ``model`` (sampled with its own defaults unless ``steps`` / ``guidance_scale``)."""
        ...


def worsened(baseline: dict, current: dict, higher_is_better: dict[str, bool], tolerance: float) -> list[str]:
    """The held-out metrics that moved the wrong way by more than ``tolerance`` (a fraction of the baseline's
    magnitude) from ``baseline`` to ``current``, as readable strings; metrics missing from either are skipped."""
    out = []
    for key, higher in higher_is_better.items():
        if key not in baseline or key not in current:
            continue
        b, c = float(baseline[key]), float(current[key])
        margin = tolerance * abs(b)
        if (c < b - margin) if higher else (c > b + margin):
            out.append(f"held-out {key} {b:.4g} -> {c:.4g}")
    return out
