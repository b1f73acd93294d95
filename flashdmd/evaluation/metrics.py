"""Sample-quality metrics of the embedded world, all on the frozen evaluation classifier.

* **FD** (Fréchet distance, the world's FID): between Gaussians fitted to the classifier's penultimate
  features of generated images and of the 10 000-image test split. Lower is better; :func:`floor` gives
  the value a perfect generator gets at the same N (real train images vs test).
* **alignment**: share of generated images the classifier assigns to the prompted class. On real test images
  it equals the classifier's test accuracy.
* **diversity**: within-class spread (mean pairwise Euclidean feature distance between images of the same
  class, averaged over classes) of the generated images divided by the same quantity on the test split for
  the same classes. 1.0 = as diverse as real data, 0 = every class collapsed to one image.

The core functions are pure functions on tensors; :func:`evaluate_images` wires them to the shipped
classifier and caches the test-split statistics per classifier.
"""
from __future__ import annotations

import weakref
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from flashdmd import FlashDMDError

# ---------------------------------------------------------------------------------------------------
# Pure functions


def feature_stats(feats: Tensor) -> tuple[Tensor, Tensor]:
    """(N, D) features -> (mean (D,), covariance (D, D)), float64, unbiased (N - 1)."""
    if feats.ndim != 2 or feats.shape[0] < 2:
        raise FlashDMDError(f"feature_stats needs (N>=2, D) features, got {tuple(feats.shape)}")
    f = feats.detach().to(torch.float64)
    mu = f.mean(0)
    d = f - mu
    return mu, d.T @ d / (f.shape[0] - 1)


@contextmanager
def _one_thread():
    """Small (D x D) eigen-decompositions run on one thread: with several threads on a busy CPU, LAPACK's
    thread barriers made a 128x128 `eigh` take seconds instead of about a millisecond."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _sqrt_psd(m: Tensor) -> Tensor:
    """Symmetric PSD square root by eigen-decomposition (negative round-off eigenvalues clamped to 0)."""
    lam, v = torch.linalg.eigh((m + m.T) / 2)
    return (v * lam.clamp_min(0).sqrt()) @ v.T


def frechet_distance(mu1: Tensor, cov1: Tensor, mu2: Tensor, cov2: Tensor) -> float:
    """Fréchet distance between N(mu1, cov1) and N(mu2, cov2), in float64, without scipy.

    FD = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)). The trace term uses
    tr((S1 S2)^(1/2)) = tr((S1^(1/2) S2 S1^(1/2))^(1/2)), because S1 S2 = S1^(1/2) (S1^(1/2) S2) has the same
    eigenvalues as (S1^(1/2) S2) S1^(1/2), a symmetric PSD matrix. So: S1^(1/2) by `eigh`, then the sum of the
    square roots of the eigenvalues (`eigvalsh`) of the symmetric product, negatives from round-off clamped to 0.
    Stable for singular covariances (N < D); no complex square roots as with scipy's sqrtm.
    """
    mu1, mu2, cov1, cov2 = (t.detach().cpu().to(torch.float64) for t in (mu1, mu2, cov1, cov2))
    with _one_thread():
        s1 = _sqrt_psd(cov1)
        m = s1 @ cov2 @ s1
        tr_sqrt = torch.linalg.eigvalsh((m + m.T) / 2).clamp_min(0).sqrt().sum()
    fd = (mu1 - mu2).square().sum() + cov1.trace() + cov2.trace() - 2 * tr_sqrt
    return max(float(fd), 0.0)


def fd_features(feats_a: Tensor, feats_b: Tensor) -> float:
    """Fréchet distance between two feature sets (N_a, D) and (N_b, D)."""
    return frechet_distance(*feature_stats(feats_a), *feature_stats(feats_b))


def alignment(logits: Tensor, labels: Tensor) -> float:
    """Share of rows whose argmax is the prompted class. logits (N, C), labels (N,)."""
    return (logits.argmax(1) == labels.to(logits.device)).double().mean().item()


def within_class_spread(feats: Tensor, labels: Tensor) -> dict[int, float]:
    """{class: mean pairwise Euclidean distance between the (N_c, D) features of that class}, N_c >= 2 only."""
    f = feats.detach().to(torch.float64)
    out = {}
    for c in labels.unique().tolist():
        fc = f[labels == c]
        n = fc.shape[0]
        if n >= 2:
            out[int(c)] = (torch.cdist(fc, fc).sum() / (n * (n - 1))).item()
    return out


def diversity(feats: Tensor, labels: Tensor, reference_spread: dict[int, float]) -> float:
    """sum_c spread(feats | c) / sum_c reference_spread[c], over classes with >= 2 images (1.0 = as diverse as real)."""
    spread = within_class_spread(feats, labels)
    if not spread:
        raise FlashDMDError("diversity needs at least two images of one class")
    return sum(spread.values()) / sum(reference_spread[c] for c in spread)


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
    from flashdmd.evaluation.classifier import load_eval_classifier

    return load_eval_classifier()


def compute_reference_stats(classifier: nn.Module) -> ReferenceStats:
    """Statistics of all 10 000 test-split images under ``classifier`` (about 3 s on 2 CPU cores)."""
    from flashdmd.world.data import load_split

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
        from flashdmd.world.prompts import class_of_prompt

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
    from flashdmd.world.data import load_split

    classifier = _default_classifier(classifier)
    train = load_split("train")
    idx = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:n]
    ref = reference_stats(classifier)
    feats, _ = classifier_outputs(classifier, train.images[idx])
    return frechet_distance(*feature_stats(feats), ref.mu, ref.cov)
