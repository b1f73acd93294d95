"""Pure sample-quality metric functions on feature tensors (any feature extractor).

* :func:`feature_stats` / :func:`frechet_distance`: the Fréchet distance between Gaussians fitted to two
  feature sets (FID when the features are Inception pool3; the world's FD on its classifier's features);
* :func:`alignment`: share of images a classifier assigns to the prompted class;
* :func:`within_class_spread` / :func:`diversity`: within-class feature spread relative to a reference.

The embedded world wires them to its classifier (flashdmd/world/metrics.py); FID backends to Inception.
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
