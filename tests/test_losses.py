"""Losses pinned to their closed forms, signs and normalisers."""
import pytest
import torch
import torch.nn.functional as F

from flashdmd.losses import d_loss, denoising_loss, dmd_gradient, dmd_loss, g_loss, lcm_step_log_prob, step_dpo_loss
from tests.tolerances import assert_close, magnitude

# The losses compute in float32 (they cast their inputs); the references here are float64, exact to ~1e-16, so each
# bound is the float32 round-off of the loss's own operations: one u per rounding, n u for a mean of n terms of one
# sign (relative to the result), counted where used.


def test_dmd_zero_gradient_when_scores_agree():
    x = torch.randn(4, 4, 8, 8, requires_grad=True)
    x0 = torch.randn(4, 4, 8, 8)
    dmd_loss(x, x0, x0.clone()).sum().backward()
    assert torch.count_nonzero(x.grad) == 0


def test_dmd_step_moves_toward_teacher():
    torch.manual_seed(0)
    x = torch.randn(8, 4, 8, 8, requires_grad=True)
    x0_real, x0_fake = torch.randn(8, 4, 8, 8), torch.randn(8, 4, 8, 8)
    dmd_loss(x, x0_real, x0_fake).mean().backward()
    # descent direction is parallel to x0_real - x0_fake, per sample, with positive coefficient
    step = -x.grad
    cos = F.cosine_similarity(step.flatten(1), (x0_real - x0_fake).flatten(1), dim=1)
    # parallel: 1 up to the cosine's own float32 round-off (a dot product and two norms of n = 256 terms: 2n u) --
    # the step's rounding errors only enter to second order
    n = step[0].numel()
    assert_close(cos, torch.ones(8), factor=2 * n + 4, mag=1.0)
    # and a small step toward the teacher reduces the distance between the student and the teacher's x0
    # when the fake score sits at the student (the usual regime)
    x2 = torch.randn(8, 4, 8, 8, requires_grad=True)
    loss = dmd_loss(x2, x0_real, x2.detach()).mean()
    loss.backward()
    moved = x2.detach() - 10.0 * x2.grad
    assert ((moved - x0_real).norm() < (x2.detach() - x0_real).norm())


def test_dmd_normaliser_is_per_sample_and_matches_dmd2_form():
    torch.manual_seed(1)
    x = torch.randn(3, 2, 4, 4)
    x0_real, x0_fake = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    x0_real[1] *= 100  # one sample with a large residual must not change the others' gradients
    g = dmd_gradient(x, x0_real, x0_fake)
    n = x[0].numel()
    for i in range(3):
        norm_i = (x[i] - x0_real[i]).abs().mean()
        # the same difference; the normaliser is a mean of n = 32 positive terms (n u, another summation order
        # here) and the division rounds once more
        want = (x0_fake[i] - x0_real[i]) / norm_i
        assert_close(g[i], want, factor=n + 2)
    # DMD2: loss = 0.5 * F.mse_loss(x, (x - grad).detach()) with mean reduction
    xg = x.clone().requires_grad_(True)
    ref = 0.5 * F.mse_loss(xg, (xg - g).detach())
    # the same squared residuals, averaged per sample then over the 3 samples here, all 96 at once there: a mean
    # of positive terms either way, 96 + 3 u of the result
    assert_close(dmd_loss(xg, x0_real, x0_fake).mean(), ref, factor=3 * n + 3 + 2)


def test_dmd_nan_guard():
    x = torch.zeros(2, 1, 2, 2)
    g = dmd_gradient(x, torch.zeros_like(x), torch.ones_like(x))  # normaliser 0 -> inf -> nan_to_num
    assert torch.isfinite(g).all()


def test_denoising_loss_per_sample():
    pred, target = torch.zeros(2, 3), torch.tensor([[1.0, 1, 1], [2, 2, 2]])
    # small integers and halves: every operation is exact
    assert torch.equal(denoising_loss(pred, target), torch.tensor([1.0, 4.0]))
    assert torch.equal(denoising_loss(pred, target, torch.tensor([2.0, 0.5])), torch.tensor([2.0, 2.0]))


@pytest.mark.parametrize("kind", ["hinge", "ns"])
def test_gan_losses_closed_form_and_direction(kind):
    real, fake = torch.tensor([[2.0], [-0.5]]), torch.tensor([[0.3], [-3.0]])
    # one logit per sample and one head: the means (of one value) and the average over heads are exact, the
    # elementwise operations the same -- bitwise
    if kind == "hinge":
        assert torch.equal(d_loss(real, fake, kind), F.relu(1 - real[:, 0]) + F.relu(1 + fake[:, 0]))
        assert torch.equal(g_loss(fake, kind), -fake[:, 0])
    else:
        assert torch.equal(d_loss(real, fake, kind), F.softplus(-real[:, 0]) + F.softplus(fake[:, 0]))
        assert torch.equal(g_loss(fake, kind), F.softplus(-fake[:, 0]))
    # the generator loss falls as the discriminator's fake logit rises
    assert float(g_loss(torch.tensor([[1.0]]), kind)) < float(g_loss(torch.tensor([[0.0]]), kind))


def test_gan_multi_head_averages_heads():
    h1, h2 = torch.ones(2, 1, 4, 4), 3 * torch.ones(2, 1, 2, 2)
    assert torch.equal(g_loss([h1, h2], "hinge"), torch.tensor([-2.0, -2.0]))  # small integers: exact
    with pytest.raises(ValueError):
        g_loss(h1, "wgan")


def test_lcm_log_prob_closed_form():
    torch.manual_seed(2)
    x0, xn = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    a, s = torch.tensor([0.6, 0.9]), torch.tensor([0.8, 0.43])
    got = lcm_step_log_prob(xn, x0, a, s)
    a64, s64 = a.double().reshape(-1, 1, 1, 1), s.double().reshape(-1, 1, 1, 1)
    full = torch.distributions.Normal(a64 * x0.double(), s64).log_prob(xn.double()).flatten(1).sum(1)
    const = -(36 * torch.log(s.double()) + 36 * 0.5 * torch.log(torch.tensor(2 * torch.pi, dtype=torch.float64)))
    want = (full - const) / 36  # per element: 36 = 4*3*3
    # float32: a x0, the difference, the square (3 u), a mean of 36 squares (36 u), sigma^2 and the division (2 u)
    assert_close(got.double(), want, factor=41)
    # log-prob *differences* between two policies equal those of the full Gaussian
    x0b = torch.randn_like(x0)
    full_b = torch.distributions.Normal(a64 * x0b.double(), s64).log_prob(xn.double()).flatten(1).sum(1)
    want_b = (full_b - const) / 36
    got_b = lcm_step_log_prob(xn, x0b, a, s)
    assert_close((got - got_b).double(), want - want_b, factor=41, mag=magnitude(want) + magnitude(want_b))


def test_step_dpo_closed_form_and_gradient_sign():
    lw = torch.tensor([0.2], requires_grad=True)
    ll = torch.tensor([-0.1], requires_grad=True)
    rw, rl = torch.tensor([0.0]), torch.tensor([0.0])
    beta = 5.0
    loss = step_dpo_loss(lw, rw, ll, rl, beta)
    z = beta * (lw.detach().double() - ll.detach().double())  # float64, from the same float32 inputs
    # float32: the two differences and beta * (.) round 3 times (relative to z; -log sigmoid has slope < 1), the
    # log-sigmoid once or twice (relative to the loss)
    want = -F.logsigmoid(z)
    assert_close(loss.detach().double(), want, factor=3, mag=float(z.abs().max()) + magnitude(want))
    loss.sum().backward()
    assert lw.grad.item() < 0 < ll.grad.item()  # descent raises the winner's log-prob, lowers the loser's
    # equal policy and reference: loss is log 2 at any beta
    assert_close(step_dpo_loss(rw, rw, rl, rl, 100.0), torch.log(torch.tensor([2.0])), factor=2)  # two libm calls
    # ratio clip bounds the log-ratios
    big = step_dpo_loss(torch.tensor([10.0]), rw, torch.tensor([-10.0]), rl, 1.0, ratio_clip=0.1)
    bound = -F.logsigmoid(torch.log1p(torch.tensor(0.1)) - torch.log1p(torch.tensor(-0.1)))
    assert torch.equal(big, bound.reshape(1))  # the same clamps and log-sigmoid (beta = 1 is exact)


def test_step_kl_is_the_gaussian_step_policies_kl_per_element():
    """step_kl against torch.distributions' KL of the two LCM-step Gaussians N(a x0, s^2), averaged over elements."""
    from torch.distributions import Normal, kl_divergence

    from flashdmd.losses import step_kl
    g = torch.Generator().manual_seed(0)
    x0p, x0r = torch.randn(3, 4, 5, 5, generator=g), torch.randn(3, 4, 5, 5, generator=g)
    a, s = torch.tensor([0.9, 0.5, 0.2]), torch.tensor([0.4, 0.8, 0.95])
    sh = (-1, 1, 1, 1)
    a64, s64 = a.double().reshape(sh), s.double().reshape(sh)
    ref = kl_divergence(Normal(a64 * x0p.double(), s64), Normal(a64 * x0r.double(), s64))
    # float32: the difference, * alpha, the square (3 u), a mean of 100 squares (100 u), sigma^2 and the division
    assert_close(step_kl(x0p, x0r, a, s).double(), ref.reshape(3, -1).mean(1), factor=105)
    assert torch.equal(step_kl(x0r, x0r, a, s), torch.zeros(3))
