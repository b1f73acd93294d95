"""Losses pinned to their closed forms, signs and normalisers."""
import pytest
import torch
import torch.nn.functional as F

from flashdmd.losses import d_loss, denoising_loss, dmd_gradient, dmd_loss, g_loss, lcm_step_log_prob, step_dpo_loss


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
    torch.testing.assert_close(cos, torch.ones(8))
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
    for i in range(3):
        norm_i = (x[i] - x0_real[i]).abs().mean()
        torch.testing.assert_close(g[i], (x0_fake[i] - x0_real[i]) / norm_i)
    # DMD2: loss = 0.5 * F.mse_loss(x, (x - grad).detach()) with mean reduction
    xg = x.clone().requires_grad_(True)
    ref = 0.5 * F.mse_loss(xg, (xg - g).detach())
    torch.testing.assert_close(dmd_loss(xg, x0_real, x0_fake).mean(), ref)


def test_dmd_nan_guard():
    x = torch.zeros(2, 1, 2, 2)
    g = dmd_gradient(x, torch.zeros_like(x), torch.ones_like(x))  # normaliser 0 -> inf -> nan_to_num
    assert torch.isfinite(g).all()


def test_denoising_loss_per_sample():
    pred, target = torch.zeros(2, 3), torch.tensor([[1.0, 1, 1], [2, 2, 2]])
    torch.testing.assert_close(denoising_loss(pred, target), torch.tensor([1.0, 4.0]))
    torch.testing.assert_close(denoising_loss(pred, target, torch.tensor([2.0, 0.5])), torch.tensor([2.0, 2.0]))


@pytest.mark.parametrize("kind", ["hinge", "ns"])
def test_gan_losses_closed_form_and_direction(kind):
    real, fake = torch.tensor([[2.0], [-0.5]]), torch.tensor([[0.3], [-3.0]])
    if kind == "hinge":
        torch.testing.assert_close(d_loss(real, fake, kind), F.relu(1 - real[:, 0]) + F.relu(1 + fake[:, 0]))
        torch.testing.assert_close(g_loss(fake, kind), -fake[:, 0])
    else:
        torch.testing.assert_close(d_loss(real, fake, kind), F.softplus(-real[:, 0]) + F.softplus(fake[:, 0]))
        torch.testing.assert_close(g_loss(fake, kind), F.softplus(-fake[:, 0]))
    # the generator loss falls as the discriminator's fake logit rises
    assert float(g_loss(torch.tensor([[1.0]]), kind)) < float(g_loss(torch.tensor([[0.0]]), kind))


def test_gan_multi_head_averages_heads():
    h1, h2 = torch.ones(2, 1, 4, 4), 3 * torch.ones(2, 1, 2, 2)
    torch.testing.assert_close(g_loss([h1, h2], "hinge"), torch.tensor([-2.0, -2.0]))
    with pytest.raises(ValueError):
        g_loss(h1, "wgan")


def test_lcm_log_prob_closed_form():
    torch.manual_seed(2)
    x0, xn = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    a, s = torch.tensor([0.6, 0.9]), torch.tensor([0.8, 0.43])
    got = lcm_step_log_prob(xn, x0, a, s)
    d = torch.distributions.Normal(a.reshape(-1, 1, 1, 1) * x0, s.reshape(-1, 1, 1, 1))
    full = d.log_prob(xn).flatten(1).sum(1)
    const = -(36 * torch.log(s) + 36 * 0.5 * torch.log(torch.tensor(2 * torch.pi)))
    torch.testing.assert_close(got, (full - const) / 36, rtol=1e-5, atol=1e-4)  # per element: 36 = 4*3*3
    # log-prob *differences* between two policies equal those of the full Gaussian
    x0b = torch.randn_like(x0)
    full_b = torch.distributions.Normal(a.reshape(-1, 1, 1, 1) * x0b, s.reshape(-1, 1, 1, 1)).log_prob(xn).flatten(1).sum(1)
    torch.testing.assert_close(got - lcm_step_log_prob(xn, x0b, a, s), (full - full_b) / 36, rtol=1e-5, atol=1e-4)


def test_step_dpo_closed_form_and_gradient_sign():
    lw = torch.tensor([0.2], requires_grad=True)
    ll = torch.tensor([-0.1], requires_grad=True)
    rw, rl = torch.tensor([0.0]), torch.tensor([0.0])
    beta = 5.0
    loss = step_dpo_loss(lw, rw, ll, rl, beta)
    torch.testing.assert_close(loss, -torch.log(torch.sigmoid(torch.tensor([beta * 0.3]))))
    loss.sum().backward()
    assert lw.grad.item() < 0 < ll.grad.item()  # descent raises the winner's log-prob, lowers the loser's
    # equal policy and reference: loss is log 2 at any beta
    torch.testing.assert_close(step_dpo_loss(rw, rw, rl, rl, 100.0), torch.log(torch.tensor([2.0])))
    # ratio clip bounds the log-ratios
    big = step_dpo_loss(torch.tensor([10.0]), rw, torch.tensor([-10.0]), rl, 1.0, ratio_clip=0.1)
    bound = -F.logsigmoid(torch.log1p(torch.tensor(0.1)) - torch.log1p(torch.tensor(-0.1)))
    torch.testing.assert_close(big, bound.reshape(1))


def test_step_kl_is_the_gaussian_step_policies_kl_per_element():
    """step_kl against torch.distributions' KL of the two LCM-step Gaussians N(a x0, s^2), averaged over elements."""
    from torch.distributions import Normal, kl_divergence

    from flashdmd.losses import step_kl
    g = torch.Generator().manual_seed(0)
    x0p, x0r = torch.randn(3, 4, 5, 5, generator=g), torch.randn(3, 4, 5, 5, generator=g)
    a, s = torch.tensor([0.9, 0.5, 0.2]), torch.tensor([0.4, 0.8, 0.95])
    sh = (-1, 1, 1, 1)
    ref = kl_divergence(Normal(a.reshape(sh) * x0p, s.reshape(sh)), Normal(a.reshape(sh) * x0r, s.reshape(sh)))
    torch.testing.assert_close(step_kl(x0p, x0r, a, s), ref.reshape(3, -1).mean(1))
    assert torch.equal(step_kl(x0r, x0r, a, s), torch.zeros(3))
