"""Evaluation classifier, metrics, discriminator encoder and the eval-network pretraining (shipped weights)."""
import math

import pytest
import torch

from flashdmd import FlashDMDError
from flashdmd.evaluation import fd_features, frechet_distance
from flashdmd.evaluation.metrics import feature_stats
from flashdmd.world.classifier import load_eval_classifier
from flashdmd.world.metrics import evaluate_images, floor, reference_stats
from flashdmd.world.metrics import ReferenceStats
from flashdmd.world.data import load_split, to_rgb
from flashdmd.world.encoder import load_disc_encoder
from flashdmd.world.prompts import prompts_for
from tests.tolerances import (U32, U64, assert_close, fd_error, fd_perturbation, fd_roundoff, network_factor,
                              within)


@pytest.fixture(scope="module")
def test_split():
    return load_split("test")


@pytest.fixture(scope="module")
def subset(test_split):
    """500 test images, 50 per class (a fixed random choice)."""
    g = torch.Generator().manual_seed(0)
    idx = torch.cat([torch.nonzero(test_split.labels == c)[:, 0][torch.randperm(1000, generator=g)[:50]]
                     for c in range(10)])
    return test_split.images[idx], test_split.labels[idx]


def test_frechet_distance_closed_form():
    # N(0, I) vs N(m, 4I) in D dims: |m|^2 + D + 4D - 2 * 2D = |m|^2 + D
    d = 16
    m = torch.arange(d, dtype=torch.float64) / d
    fd = frechet_distance(torch.zeros(d), torch.eye(d), m, 4 * torch.eye(d))
    # float64: the eigenvalues (all 4, far from 0) move by a few D u64 of 4, their square roots and the traces
    # by as much (tests/tolerances.py: fd_roundoff)
    assert fd == pytest.approx(m.square().sum().item() + d, abs=fd_roundoff(4 * torch.eye(d)))
    # a singular (rank-deficient) covariance is fine: 0 up to float64 round-off
    a = torch.randn(d, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    s = a @ a.T
    assert within(frechet_distance(torch.zeros(d), s, torch.zeros(d), s), fd_roundoff(s))


def test_classifier_shapes_and_frozen():
    clf = load_eval_classifier()
    x = torch.zeros(3, 1, 32, 32)
    assert clf.features(x).shape == (3, clf.feature_dim)
    assert clf.logits(x).shape == (3, 10)
    assert not clf.training and not any(p.requires_grad for p in clf.parameters())
    assert 50_000 < sum(p.numel() for p in clf.parameters()) < 250_000


def test_fd_self_zero_and_grows_with_noise(subset):
    x, y = subset
    clf = load_eval_classifier()
    f = clf.features(x)
    assert within(fd_features(f, f), fd_roundoff(feature_stats(f)[1]))
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(x.shape, generator=g)
    fds = [evaluate_images((x + s * noise).clamp(-1, 1), y)["fd"] for s in (0.0, 0.2, 0.5)]
    assert fds[0] < fds[1] < fds[2], fds
    assert fds[2] > 3 * fds[0]
    f0 = floor(len(y))
    assert 0 < f0 < fds[1]
    assert f0 < 3 * fds[0]  # real train images are about as close to the test split as test images at this N


def test_alignment_is_accuracy_and_test_diversity_is_one(test_split, monkeypatch):
    """Also checks the shipped test-split statistics belong to the shipped weights.

    They were computed on another CPU: each float32 feature and logit of this one is within the network's round-off
    K u of the largest (K = network_factor, tests/tolerances.py), and the bounds follow from that."""
    import flashdmd.world.metrics as wm
    ref = reference_stats()
    assert ref.accuracy > 0.88, f"evaluation classifier test accuracy {ref.accuracy:.4f}"
    seen = []
    real_outputs = wm.classifier_outputs
    monkeypatch.setattr(wm, "classifier_outputs", lambda *a: seen.append(real_outputs(*a)) or seen[-1])
    m = evaluate_images(test_split.images, test_split.labels)
    (f, logits), k = seen[0], network_factor(load_eval_classifier())
    n, d = logits.shape[0], f.shape[1]
    mu, cov = feature_stats(f)
    fmax = float(f.abs().max())
    assert_close(mu, ref.mu, factor=k, mag=fmax)
    assert_close(cov, ref.cov, factor=2 * k, mag=fmax ** 2)  # products of two features
    # the argmax can differ only where the top two logits are within twice the round-off of each other
    top = logits.topk(2, 1).values
    ties = int((top[:, 0] - top[:, 1] <= 2 * k * U32 * float(logits.abs().max())).sum())
    assert within(abs(m["alignment"] - ref.accuracy), ties / n + 2 * U64)
    # each pairwise distance within 2 sqrt(D) K u fmax, summed over the classes' mean distances
    spread = 2 * d ** 0.5 * k * U32 * fmax * len(ref.spread) / sum(ref.spread.values())
    assert within(abs(m["diversity"] - 1.0), spread)
    assert within(m["fd"], fd_perturbation(mu, cov, ref.mu, ref.cov))


def test_reference_stats_roundtrip():
    ref = ReferenceStats(torch.zeros(3, dtype=torch.float64), torch.eye(3, dtype=torch.float64), {0: 1.5, 2: 2.5}, 0.75)
    back = ReferenceStats.from_tensors(ref.to_tensors())
    assert back.spread == ref.spread and back.accuracy == ref.accuracy and torch.equal(back.cov, ref.cov)


def _spread_se(f: torch.Tensor, y: torch.Tensor) -> float:
    """The standard error of sum_c spread_c (each a U-statistic, the mean pairwise distance of a class's n
    features: its standard error is 2 std_i(h_i) / sqrt(n), h_i = image i's mean distance to the others)."""
    var = 0.0
    for c in y.unique():
        fc = f[y == c].double()
        n = fc.shape[0]
        h = torch.cdist(fc, fc).sum(1) / (n - 1)
        var += float(2 * h.std() / n ** 0.5) ** 2
    return var ** 0.5


def test_diversity_subset_and_collapse(subset):
    x, y = subset
    ref = reference_stats()
    # 50 images of each class against the whole test split: diversity is 1 within 5 standard errors of the
    # subset's spreads (relative to the reference's sum)
    se = _spread_se(load_eval_classifier().features(x), y) / sum(ref.spread.values())
    assert evaluate_images(x, y)["diversity"] == pytest.approx(1.0, abs=5 * se)
    # mode collapse: every image of a class is the same image
    first = {int(c): x[y == c][0] for c in y.unique()}
    collapsed = torch.stack([first[int(c)] for c in y])
    m = evaluate_images(collapsed, y)
    # equal rows: cdist's float64 |a|^2 + |b|^2 - 2 a.b leaves ~4 D u64 |f|^2, whose square root is each distance
    f = load_eval_classifier().features(collapsed)
    zero = (4 * f.shape[1] * U64) ** 0.5 * float(f.norm(dim=1).max()) * len(first) / sum(ref.spread.values())
    assert within(m["diversity"], zero)
    # whole classes right or wrong: alignment is k / 10 (a mean of 500 0/1 values rounds once, * 10 once)
    assert m["alignment"] * 10 == pytest.approx(round(m["alignment"] * 10), abs=10 * 2 * U64)


def test_evaluate_accepts_prompts_and_rgb(subset):
    x, y = subset
    a = evaluate_images(x[:100], y[:100])
    assert evaluate_images(x[:100], prompts_for(y[:100].tolist(), seed=3)) == a  # the prompts name the same labels
    # RGB is averaged back to grey: 3 equal channels, their sum and the division round once each (2 u32), so the
    # grey input differs from x by 2 u at most and the metrics by that on top of the network's round-off
    import flashdmd.world.metrics as wm
    outs = []
    real_outputs = wm.classifier_outputs
    wm.classifier_outputs = lambda *args: outs.append(real_outputs(*args)) or outs[-1]
    try:
        assert evaluate_images(x[:100], y[:100]) == a
        b = evaluate_images(to_rgb(x[:100]), y[:100])
    finally:
        wm.classifier_outputs = real_outputs
    (fa, la), (fb, lb) = outs
    k = network_factor(load_eval_classifier()) + 2
    fmax = float(fa.abs().max())
    top = la.topk(2, 1).values
    ties = int((top[:, 0] - top[:, 1] <= 2 * k * U32 * float(la.abs().max())).sum())
    assert within(abs(a["alignment"] - b["alignment"]), ties / len(la) + 2 * U64)
    ref = reference_stats()
    spread = 2 * fa.shape[1] ** 0.5 * k * U32 * fmax * len(ref.spread) / sum(ref.spread.values())
    assert within(abs(a["diversity"] - b["diversity"]), spread)
    # sqrt(FD) is a metric (the 2-Wasserstein distance of Gaussians): |sqrt(fd_a) - sqrt(fd_b)| <= sqrt(FD(a, b))
    (mu_a, cov_a), (mu_b, cov_b) = feature_stats(fa), feature_stats(fb)
    p = fd_perturbation(mu_a, cov_a, mu_b, cov_b, roundoff=False)
    assert within(abs(a["fd"] - b["fd"]), p + 2 * (p * max(a["fd"], b["fd"])) ** 0.5 + fd_error(cov_a, ref.cov)
                  + fd_error(cov_b, ref.cov))
    with pytest.raises(FlashDMDError):
        evaluate_images(x[:10], y[:9])
    with pytest.raises(FlashDMDError):
        evaluate_images(x[:10, :, :16, :16], y[:10])


def test_disc_encoder_levels_and_gradients():
    enc = load_disc_encoder()
    x = (torch.rand(2, 3, 32, 32) * 2 - 1).requires_grad_(True)
    feats = enc(x)
    assert [f.shape[1] for f in feats] == list(enc.feature_channels)
    assert [f.shape[-1] for f in feats] == [32 // s for s in enc.feature_strides]
    assert not any(p.requires_grad for p in enc.parameters())
    sum(f.square().mean() for f in feats).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert [f.shape for f in enc(x[:, :1])] == [f.shape for f in feats]  # grey is replicated


def test_missing_weights_error(tmp_path):
    from flashdmd.world.oracle import Oracle

    for load in (load_eval_classifier, Oracle.load, load_disc_encoder):
        with pytest.raises(FlashDMDError, match="flashdmd world pretrain --only eval"):
            load(tmp_path)


def test_pretrain_eval_quick_roundtrip(tmp_path):
    from flashdmd.world.evalnets import pretrain_eval
    from flashdmd.world.oracle import Oracle

    configs = pretrain_eval(tmp_path, seed=0, quick=True)
    assert set(configs) == {"eval_classifier", "oracle_judge", "disc_encoder"}
    assert all((tmp_path / f"{n}.safetensors").is_file() and (tmp_path / f"{n}.json").is_file() for n in configs)
    x, y = torch.zeros(4, 1, 32, 32), torch.arange(4)
    clf = load_eval_classifier(tmp_path)
    assert clf.logits(x).shape == (4, 10)
    assert Oracle.load(tmp_path).score(x, y).shape == (4,)
    assert len(load_disc_encoder(tmp_path)(to_rgb(x))) == 3
    f = clf.features(torch.rand(20, 1, 32, 32) * 2 - 1)
    assert math.isfinite(fd_features(f[:10], f[10:]))
