"""Sample-quality metrics of the embedded world, all on the frozen evaluation classifier.

* **FD** (Fréchet distance, the world's FID): between Gaussians fitted to the classifier's penultimate
  features of generated images and of the 10 000-image test split. Lower is better; :func:`floor` gives
  the value a perfect generator gets at the same N (real train images vs test).
* **alignment**: share of generated images the classifier assigns to the prompted class. On real test images
  it equals the classifier's test accuracy.
* **diversity**: within-class spread (mean pairwise Euclidean feature distance between images of the same
  class, averaged over classes) of the generated images divided by the same quantity on the test split for
  the same classes. 1.0 = as diverse as real data, 0 = every class collapsed to one image.

The pure functions live in :mod:`flashdmd.evaluation.metrics`; this module wires them to the shipped
classifier, caches the test-split statistics per classifier, and :func:`evaluate_world` samples a model on the
world's held-out prompts.
"""
from __future__ import annotations

import time
import weakref
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from flashdmd import FlashDMDError
from flashdmd.evaluation.metrics import alignment, diversity, feature_stats, frechet_distance, within_class_spread
from flashdmd.inference import Model, nfe, sample_images
from flashdmd.world.classifier import load_eval_classifier
from flashdmd.world.data import load_split
from flashdmd.world.oracle import Oracle
from flashdmd.world.prompts import class_of_prompt, eval_prompts

# ---------------------------------------------------------------------------------------------------
# Wiring to the shipped classifier


@torch.no_grad()
def classifier_outputs(classifier: nn.Module, images: Tensor, batch_size: int = 500) -> tuple[Tensor, Tensor]:
    """(N, 1|3, 32, 32) in [-1, 1] -> (features (N, D), logits (N, C)) on CPU, batched, no grad.

    ``classifier`` needs ``features(x) -> (B, D)`` and ``head(features) -> (B, C)`` (as :class:`EvalClassifier`).
    """
    if images.ndim != 4 or images.shape[1] not in (1, 3) or images.shape[-2:] != (32, 32):
        raise FlashDMDError(f"evaluation expects (N, 1 or 3, 32, 32) images in [-1, 1], got {tuple(images.shape)}")
    device = next(classifier.parameters()).device
    feats, logits = [], []
    for i in range(0, images.shape[0], batch_size):
        x = images[i:i + batch_size].to(device, torch.float32)
        x = x.mean(1, keepdim=True) if x.shape[1] == 3 else x
        f = classifier.features(x.clamp(-1, 1))
        feats.append(f.cpu())
        logits.append(classifier.head(f).cpu())
    return torch.cat(feats), torch.cat(logits)


@dataclass
class ReferenceStats:
    """Test-split statistics under one classifier."""
    mu: Tensor                 # (D,) float64
    cov: Tensor                # (D, D) float64
    spread: dict[int, float]   # per-class within-class spread
    accuracy: float            # classifier accuracy on the test split

    def to_tensors(self) -> dict[str, Tensor]:
        """For safetensors: spread as (C,) with NaN for classes without two images."""
        spread = torch.full((max(self.spread) + 1,), float("nan"), dtype=torch.float64)
        for c, v in self.spread.items():
            spread[c] = v
        return {"mu": self.mu, "cov": self.cov, "spread": spread,
                "accuracy": torch.tensor([self.accuracy], dtype=torch.float64)}

    @classmethod
    def from_tensors(cls, t: dict[str, Tensor]) -> "ReferenceStats":
        spread = {c: v for c, v in enumerate(t["spread"].tolist()) if v == v}
        return cls(t["mu"].double(), t["cov"].double(), spread, float(t["accuracy"][0]))


_REFERENCE: "weakref.WeakKeyDictionary[nn.Module, ReferenceStats]" = weakref.WeakKeyDictionary()


def _default_classifier(classifier):
    if classifier is not None:
        return classifier
    return load_eval_classifier()


def compute_reference_stats(classifier: nn.Module) -> ReferenceStats:
    """Statistics of all 10 000 test-split images under ``classifier`` (about 3 s on 2 CPU cores)."""
    test = load_split("test")
    feats, logits = classifier_outputs(classifier, test.images)
    mu, cov = feature_stats(feats)
    return ReferenceStats(mu, cov, within_class_spread(feats, test.labels), alignment(logits, test.labels))


def reference_stats(classifier: nn.Module | None = None) -> ReferenceStats:
    """Test-split statistics, cached per classifier object.

    A classifier loaded by :func:`load_eval_classifier` carries the statistics computed when it was trained
    (``eval_classifier_test_stats.safetensors``, attribute ``test_stats``); otherwise they are computed here once.
    """
    classifier = _default_classifier(classifier)
    if classifier not in _REFERENCE:
        stored = getattr(classifier, "test_stats", None)
        _REFERENCE[classifier] = (ReferenceStats.from_tensors(stored) if stored is not None
                                  else compute_reference_stats(classifier))
    return _REFERENCE[classifier]


def _as_labels(labels, n: int) -> Tensor:
    if isinstance(labels, (list, tuple)) and labels and isinstance(labels[0], str):
        ids = [class_of_prompt(p) for p in labels]
        if None in ids:
            raise FlashDMDError(f"prompt {labels[ids.index(None)]!r} names no class of the world")
        labels = ids
    y = torch.as_tensor(labels, dtype=torch.long).reshape(-1).cpu()
    if y.numel() != n:
        raise FlashDMDError(f"got {y.numel()} labels for {n} images")
    return y


def evaluate_images(images: Tensor, labels, classifier: nn.Module | None = None,
                    batch_size: int = 500) -> dict[str, float]:
    """Score generated images against the test split.

    images: (N, 1 or 3, 32, 32) in [-1, 1] (RGB is averaged to grey); labels: (N,) prompted class ids, or
    the N prompts themselves. Returns ``{"fd", "alignment", "diversity"}`` (see the module docstring).
    Compare ``fd`` only between equal N (FD is biased upwards at small N); :func:`floor` gives the real-data
    value at that N.
    """
    classifier = _default_classifier(classifier)
    y = _as_labels(labels, images.shape[0])
    ref = reference_stats(classifier)
    feats, logits = classifier_outputs(classifier, images, batch_size)
    mu, cov = feature_stats(feats)
    return {"fd": frechet_distance(mu, cov, ref.mu, ref.cov), "alignment": alignment(logits, y),
            "diversity": diversity(feats, y, ref.spread)}


def floor(n: int, seed: int = 0, classifier: nn.Module | None = None) -> float:
    """FD of ``n`` random train-split images vs the test split: the FD a perfect generator gets at this N."""
    classifier = _default_classifier(classifier)
    train = load_split("train")
    idx = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:n]
    ref = reference_stats(classifier)
    feats, _ = classifier_outputs(classifier, train.images[idx])
    return frechet_distance(*feature_stats(feats), ref.mu, ref.cov)


def evaluate_world(model: Model, num_images: int = 500, seed: int = 0, steps: int | None = None,
                   guidance_scale: float | None = None, progress: bool = False, split: str = "test") -> dict:
    """World metrics of a model: FD, alignment, diversity (evaluation classifier), oracle score,
    seconds per image and NFE, on the split's fixed evaluation prompt set (test: the held-out templates)."""
    prompts, labels = eval_prompts(num_images, split)
    bar = tqdm(total=num_images, desc="eval", unit="img", disable=not progress)
    t0 = time.perf_counter()
    images = sample_images(model, prompts, seed, steps, guidance_scale, progress=bar)
    secs = (time.perf_counter() - t0) / num_images
    bar.close()
    metrics = evaluate_images(images, labels)
    try:
        metrics["oracle"] = float(Oracle.load().score(images, labels).mean())
    except FlashDMDError:
        pass
    metrics.update(seconds_per_image=secs, nfe=nfe(model, steps, guidance_scale), num_images=num_images)
    return metrics
