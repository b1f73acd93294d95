"""The preference oracle (shipped weights): sensible on real data, and hackable by unrestrained optimisation."""
import pytest
import torch

from flashdmd import FlashDMDError
from flashdmd.evaluation import fd_features, within_class_spread
from flashdmd.world.classifier import load_eval_classifier
from flashdmd.world.data import load_split, to_rgb
from flashdmd.world.oracle import Oracle, preference_terms
from flashdmd.world.prompts import prompts_for
from tests.tolerances import assert_close, network_factor


@pytest.fixture(scope="module")
def oracle():
    return Oracle.load()


@pytest.fixture(scope="module")
def real():
    """200 test images, 20 per class."""
    t = load_split("test")
    idx = torch.cat([torch.nonzero(t.labels == c)[:20, 0] for c in range(10)])
    return t.images[idx], t.labels[idx]


def test_judge_is_not_the_eval_classifier(oracle):
    clf = load_eval_classifier()
    assert type(oracle.judge).__name__ != type(clf).__name__
    assert not any(p.requires_grad for p in oracle.judge.parameters())


def test_correct_class_beats_wrong_label(oracle, real):
    x, y = real
    right = oracle.score(x, y)
    wrong = oracle.score(x, (y + torch.randint(1, 10, y.shape, generator=torch.Generator().manual_seed(0))) % 10)
    assert (right > wrong).float().mean() > 0.9
    assert (right - wrong).mean() > 3.0


def test_real_scores_spread_and_terms(oracle, real):
    x, y = real
    t = oracle.terms(x, y)
    assert t["score"].std() > 0.4, t["score"].std()
    # the pixel terms are standardised on 10 000 real training images: on these 200 real test images the mean is 0
    # and the std 1 within 5 standard errors of the sample (s / sqrt(n) for the mean, s sqrt((kurtosis - 1) / 4n)
    # for the std)
    for k in ("ink", "crisp"):
        v = t[k].double()
        n, m, sd = len(v), v.mean(), v.std()
        kurt = ((v - m) ** 4).mean() / ((v - m) ** 2).mean() ** 2
        assert abs(m) < 5 * sd / n ** 0.5 and abs(sd - 1) < 5 * sd * ((kurt - 1) / (4 * n)) ** 0.5, (k, m, sd)
    # classes satisfy the preference to different degrees (sandals are thin, coats are bold)
    ink, _ = preference_terms(x)
    assert ink[y == 4].mean() > 2 * ink[y == 5].mean()


def test_inputs_prompts_rgb_and_errors(oracle, real):
    x, y = real
    s = oracle.score(x[:10], y[:10])
    # RGB is averaged back to grey (3 equal channels: 2 roundings, 2 u of the pixels); then the judge's round-off
    # (twice its logits' size through the log-softmax) and the pixel terms' means of 1024 pixels (1024 u), which
    # standardising divides by their stds (the raw terms are at most 2)
    st, w = oracle.pixel_stats, oracle.weights
    mag = 2 * float(oracle.judge(x[:10]).abs().max()) + 2 * (w["ink"] / st["ink_std"] + w["crisp"] / st["crisp_std"])
    k = network_factor(oracle.judge) + 1024 + 4
    assert_close(oracle.score(to_rgb(x[:10]), prompts_for(y[:10].tolist(), seed=1)), s, factor=k, mag=mag)
    with pytest.raises(FlashDMDError):
        oracle.score(x[:10], y[:9])
    with pytest.raises(FlashDMDError):
        oracle.score(x[:10], ["a photo of a cat"] * 10)


def test_prefer(oracle, real):
    x, y = real
    blurred = torch.nn.functional.avg_pool2d(x, 3, 1, 1)  # blurry, faint: less crisp
    assert oracle.prefer(x, blurred, y).float().mean() > 0.7
    assert not oracle.prefer(x, x, y).any()
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    noisy = oracle.prefer(x, blurred, y, temperature=1.0, generator=g1)
    assert torch.equal(noisy, oracle.prefer(x, blurred, y, temperature=1.0, generator=g2))
    assert 0.5 < noisy.float().mean() < 1.0


def test_score_is_differentiable(oracle, real):
    x = real[0][:4].clone().requires_grad_(True)
    oracle.score(x, real[1][:4]).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_unrestrained_optimisation_hacks_the_oracle(oracle, real):
    """Gradient ascent on pixels raises the oracle score but degrades FD and diversity: reward hacking.

    FD here is against 1 000 other real test images (cheaper than the full test-split statistics), diversity is
    the within-class spread after / before, both measured with the evaluation classifier.
    """
    x0, y = real[0][::2], real[1][::2]  # 100 images, 10 per class
    x = x0.clone().requires_grad_(True)
    opt = torch.optim.Adam([x], lr=0.1)
    for _ in range(10):
        loss = -oracle.score(x, y).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            x.clamp_(-1, 1)
    x1 = x.detach()
    clf = load_eval_classifier()
    with torch.no_grad():
        s0, s1 = oracle.score(x0, y).mean().item(), oracle.score(x1, y).mean().item()
        f_ref, f0, f1 = clf.features(load_split("test").images[-1000:]), clf.features(x0), clf.features(x1)
        acc0, acc1 = [(clf.head(f).argmax(1) == y).float().mean().item() for f in (f0, f1)]
    fd0, fd1 = fd_features(f0, f_ref), fd_features(f1, f_ref)
    div = sum(within_class_spread(f1, y).values()) / sum(within_class_spread(f0, y).values())
    print(f"\noracle {s0:.2f} -> {s1:.2f}; fd {fd0:.2f} -> {fd1:.2f}; diversity x{div:.3f}; "
          f"eval-classifier alignment {acc0:.3f} -> {acc1:.3f}")
    assert s1 > s0 + 2.0
    assert fd1 > 2 * fd0
    assert div < 0.9
