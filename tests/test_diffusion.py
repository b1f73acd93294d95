"""Diffusion maths pinned against closed forms and against diffusers' own schedulers."""
import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler

from flashdmd import FlashDMDError
from flashdmd.diffusion import (FlowSchedule, VPSchedule, bcast, cfg_combine, from_x0_eps, shift_sigma,
                                to_x0_eps)
from flashdmd.diffusion.samplers import backward_simulate, sample, trajectory

SDXL_SCHED = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def _pair(schedule, t):
    torch.manual_seed(0)
    x0, eps = torch.randn(len(t), 4, 8, 8, dtype=torch.float64), torch.randn(len(t), 4, 8, 8, dtype=torch.float64)
    a, s = schedule.alpha_sigma(t)
    a, s = bcast(a.double(), x0), bcast(s.double(), x0)
    return x0, eps, a, s, a * x0 + s * eps


@pytest.mark.parametrize("schedule,t", [(VPSchedule(), torch.tensor([0, 17, 500, 999])),
                                        (FlowSchedule(), torch.tensor([1.0, 250.0, 750.0, 999.0]))])
@pytest.mark.parametrize("kind", ["x0", "eps", "v", "flow"])
def test_conversion_round_trip(schedule, t, kind):
    x0, eps, a, s, x_t = _pair(schedule, t)
    pred = from_x0_eps(x0, eps, kind, a, s)
    x0_back, eps_back = to_x0_eps(pred, kind, x_t, a, s)
    torch.testing.assert_close(x0_back, x0, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(eps_back, eps, rtol=1e-9, atol=1e-9)


def test_closed_forms():
    x0, eps, a, s, x_t = _pair(FlowSchedule(), torch.tensor([300.0, 800.0]))
    torch.testing.assert_close(from_x0_eps(x0, eps, "flow", a, s), eps - x0)  # u = eps - x0
    x0, eps, a, s, x_t = _pair(VPSchedule(), torch.tensor([300, 800]))
    torch.testing.assert_close(from_x0_eps(x0, eps, "v", a, s), a * eps - s * x0)
    torch.testing.assert_close(a ** 2 + s ** 2, torch.ones_like(a))  # variance preserving


def test_unknown_prediction_type():
    with pytest.raises(FlashDMDError, match="prediction type"):
        to_x0_eps(torch.zeros(1), "score", torch.zeros(1), torch.ones(1), torch.ones(1))


def test_cfg_form():
    u, c = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 0.0])
    torch.testing.assert_close(cfg_combine(u, c, 1.0), c)
    torch.testing.assert_close(cfg_combine(u, c, 0.0), u)
    torch.testing.assert_close(cfg_combine(u, c, 8.0), u + 8.0 * (c - u))


def test_vp_add_noise_matches_ddpm_scheduler():
    ref = DDPMScheduler(**SDXL_SCHED)
    x0, noise = torch.randn(5, 4, 8, 8), torch.randn(5, 4, 8, 8)
    t = torch.tensor([0, 1, 249, 749, 999])
    torch.testing.assert_close(VPSchedule().add_noise(x0, noise, t), ref.add_noise(x0, noise, t), atol=1e-6, rtol=0)


def test_vp_sigmas_match_euler_discrete():
    ref = EulerDiscreteScheduler(**SDXL_SCHED, timestep_spacing="leading", steps_offset=1)
    ref.set_timesteps(25)
    a, s = VPSchedule().alpha_sigma(ref.timesteps)
    np.testing.assert_allclose((s / a).numpy(), ref.sigmas[:-1].numpy(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_shifted_sigmas_match_diffusers(shift):
    ref = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    sched = FlowSchedule(shift=shift)
    # training grid: diffusers shifts sigmas = t/1000 for t = 1000..1
    unshifted = torch.arange(1000, 0, -1, dtype=torch.float32) / 1000
    np.testing.assert_allclose(sched.shifted_timesteps(unshifted).numpy(), ref.timesteps.numpy(), rtol=1e-6, atol=1e-4)
    np.testing.assert_allclose((sched.shifted_timesteps(unshifted) / 1000).numpy(), ref.sigmas.numpy(), atol=1e-6)
    assert float(shift_sigma(torch.tensor(1.0), shift)) == 1.0


def test_flow_scale_noise_matches_diffusers():
    ref = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    ref.set_timesteps(10)
    x0, noise = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    for t in ref.timesteps:
        expected = ref.scale_noise(x0, t[None], noise)
        got = FlowSchedule(shift=3.0).add_noise(x0, noise, t[None])
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


def test_flow_training_timesteps_in_range():
    t = FlowSchedule(shift=3.0).sample_timesteps(10_000, 0.02, 0.98, generator=torch.Generator().manual_seed(0))
    assert float(t.min()) >= shift_sigma(0.02, 3.0) * 1000 - 1e-3 and float(t.max()) <= shift_sigma(0.98, 3.0) * 1000
    t = VPSchedule().sample_timesteps(10_000, 0.02, 0.98, generator=torch.Generator().manual_seed(0))
    assert int(t.min()) == 20 and int(t.max()) == 979  # exclusive by default; the DM loss asks for inclusive


# --- samplers ------------------------------------------------------------------------------------

def _toy_denoiser(schedule):
    """Exact denoiser for data concentrated at x0 = 0.5: predicts x0 = 0.5 everywhere."""
    def denoise(x_t, t):
        a, s = schedule.alpha_sigma(t)
        x0 = torch.full_like(x_t, 0.5)
        return x0, (x_t - bcast(a, x_t) * x0) / bcast(s, x_t)
    return denoise


def test_deterministic_sampler_equals_euler_discrete_steps():
    """DDIM in x0/eps form equals diffusers' Euler step for an eps model, step by step."""
    ref = EulerDiscreteScheduler(**SDXL_SCHED, timestep_spacing="trailing")
    ref.set_timesteps(4)
    sched = VPSchedule()
    w = torch.randn(4, 4)

    def eps_model(x_vp, t):  # an arbitrary smooth eps-predictor
        return torch.tanh(x_vp @ w) * 0.5 + 0.1 * t.float().reshape(-1, 1, 1, 1) / 1000

    def denoise(x, t):
        a, s = sched.alpha_sigma(t)
        eps = eps_model(x, t)
        return (x - bcast(s, x) * eps) / bcast(a, x), eps

    z = torch.randn(2, 4, 4, 4)
    lat = z * ref.init_noise_sigma
    for t in ref.timesteps:
        inp = ref.scale_model_input(lat, t)
        lat = ref.step(eps_model(inp, t.reshape(1)), t, lat).prev_sample
    a0, s0 = sched.alpha_sigma(ref.timesteps[:1])
    x_T = z * ref.init_noise_sigma * a0  # VE latent -> VP latent: x_vp = x_ve * alpha
    ours = sample(denoise, x_T, ref.timesteps.tolist(), sched)
    torch.testing.assert_close(ours, lat, atol=1e-4, rtol=1e-4)


def test_stochastic_sampler_uses_fresh_noise_and_backsim_matches():
    sched = VPSchedule()
    ts = [999, 749, 499, 249]
    calls = []

    def denoise(x, t):
        calls.append(x.clone())
        return _toy_denoiser(sched)(x, t)

    z = torch.randn(3, 4, 8, 8)
    g = torch.Generator().manual_seed(7)
    steps = [x for _, x, _ in trajectory(denoise, z, ts, sched, stochastic=True, generator=g)]
    for k in range(len(ts)):
        got = backward_simulate(_toy_denoiser(sched), z, ts, sched, k, generator=torch.Generator().manual_seed(7))
        torch.testing.assert_close(got, steps[k])
    # fresh noise: the noise injected at each step is not the model's eps nor the previous noise
    a, s = sched.alpha_sigma(torch.tensor([749.0]))
    n1 = (steps[1] - a * 0.5) / s
    a2, s2 = sched.alpha_sigma(torch.tensor([499.0]))
    n2 = (steps[2] - a2 * 0.5) / s2
    assert torch.corrcoef(torch.stack([n1.flatten(), n2.flatten()]))[0, 1].abs() < 0.1
    assert torch.corrcoef(torch.stack([n1.flatten(), z.flatten()]))[0, 1].abs() < 0.1


def test_backsim_rejects_bad_step():
    with pytest.raises(ValueError):
        backward_simulate(_toy_denoiser(VPSchedule()), torch.zeros(1, 1), [999, 499], VPSchedule(), 2)
