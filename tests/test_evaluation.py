"""Evaluation classifier, metrics, discriminator encoder and the eval-network pretraining (shipped weights)."""
import math

import pytest
import torch

from flashdmd import FlashDMDError
from flashdmd.evaluation import fd_features, frechet_distance
from flashdmd.world.classifier import load_eval_classifier
from flashdmd.world.metrics import evaluate_images, floor, reference_stats
from flashdmd.world.metrics import ReferenceStats
from flashdmd.world.data import load_split, to_rgb
from flashdmd.world.encoder import load_disc_encoder
from flashdmd.world.prompts import prompts_for


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
    assert fd == pytest.approx(m.square().sum().item() + d, rel=1e-9)
    # a singular (rank-deficient) covariance is fine
    a = torch.randn(d, 3, dtype=torch.float64)
    s = a @ a.T
    assert frechet_distance(torch.zeros(d), s, torch.zeros(d), s) == pytest.approx(0.0, abs=1e-6)


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
    assert fd_features(f, f) < 1e-6 * f.square().sum(1).mean().item()
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(x.shape, generator=g)
    fds = [evaluate_images((x + s * noise).clamp(-1, 1), y)["fd"] for s in (0.0, 0.2, 0.5)]
    assert fds[0] < fds[1] < fds[2], fds
    assert fds[2] > 3 * fds[0]
    f0 = floor(len(y))
    assert 0 < f0 < fds[1]
    assert f0 < 3 * fds[0]  # real train images are about as close to the test split as test images at this N


def test_alignment_is_accuracy_and_test_diversity_is_one(test_split):
    """Also checks the shipped test-split statistics belong to the shipped weights."""
    ref = reference_stats()
    assert ref.accuracy > 0.88, f"evaluation classifier test accuracy {ref.accuracy:.4f}"
    m = evaluate_images(test_split.images, test_split.labels)
    assert m["alignment"] == pytest.approx(ref.accuracy, abs=1e-3)
    assert m["diversity"] == pytest.approx(1.0, abs=1e-6)
    assert m["fd"] < 1e-4


def test_reference_stats_roundtrip():
    ref = ReferenceStats(torch.zeros(3, dtype=torch.float64), torch.eye(3, dtype=torch.float64), {0: 1.5, 2: 2.5}, 0.75)
    back = ReferenceStats.from_tensors(ref.to_tensors())
    assert back.spread == ref.spread and back.accuracy == ref.accuracy and torch.equal(back.cov, ref.cov)


def test_diversity_subset_and_collapse(subset):
    x, y = subset
    assert evaluate_images(x, y)["diversity"] == pytest.approx(1.0, abs=0.06)
    # mode collapse: every image of a class is the same image
    first = {int(c): x[y == c][0] for c in y.unique()}
    collapsed = torch.stack([first[int(c)] for c in y])
    m = evaluate_images(collapsed, y)
    assert m["diversity"] < 1e-6
    assert m["alignment"] * 10 == pytest.approx(round(m["alignment"] * 10))  # whole classes right or wrong


def test_evaluate_accepts_prompts_and_rgb(subset):
    x, y = subset
    a = evaluate_images(x[:100], y[:100])
    b = evaluate_images(to_rgb(x[:100]), prompts_for(y[:100].tolist(), seed=3))
    assert a == pytest.approx(b)
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
