"""Diffusion maths pinned against closed forms and against diffusers' own schedulers."""
import pytest
import torch
from diffusers import DDPMScheduler, EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler

from flashdmd import FlashDMDError
from flashdmd.diffusion import (FlowSchedule, Schedule, VPSchedule, bcast, cfg_combine, from_x0_eps, shift_sigma,
                                to_x0_eps)
from flashdmd.diffusion.samplers import backward_simulate, sample, trajectory
from tests.tolerances import U64, assert_close, assert_rel_close, fp32_bound, k_se, magnitude

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
    # float64 (exactness is the claim): x_t, the forward conversion and the inverse round ~10 times in all on
    # values of size |x0| + |eps|, and the inverse divides by alpha or sigma (by 1/0.001 at flow's ends)
    mag = magnitude(x0, eps) * 2 / float(torch.minimum(a, s).min())
    assert_close(x0_back, x0, factor=10, u=U64, mag=mag)
    assert_close(eps_back, eps, factor=10, u=U64, mag=mag)


def test_closed_forms():
    x0, eps, a, s, x_t = _pair(FlowSchedule(), torch.tensor([300.0, 800.0]))
    assert torch.equal(from_x0_eps(x0, eps, "flow", a, s), eps - x0)  # u = eps - x0: one correctly rounded op
    x0, eps, a, s, x_t = _pair(VPSchedule(), torch.tensor([300, 800]))
    # v = a eps - s x0 in float64: two products and a difference, 3 roundings of values up to |eps| + |x0|
    assert_close(from_x0_eps(x0, eps, "v", a, s), a * eps - s * x0, factor=3, u=U64, mag=2 * magnitude(x0, eps))
    # variance preserving: alpha = sqrt(abar), sigma = sqrt(1 - abar) in float32 from one abar: the squares carry
    # 2 u32 of alpha's rounding and 1 - abar 1 u32 more; 1 u32 covers the float64 sum and second-order terms
    assert_close(a ** 2 + s ** 2, torch.ones_like(a), factor=4, mag=1.0)


def test_unknown_prediction_type():
    with pytest.raises(FlashDMDError, match="prediction type"):
        to_x0_eps(torch.zeros(1), "score", torch.zeros(1), torch.ones(1), torch.ones(1))


def test_cfg_form():
    u, c = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 0.0])
    # small integers: every operation is exact, so the results are too
    assert torch.equal(cfg_combine(u, c, 1.0), c)
    assert torch.equal(cfg_combine(u, c, 0.0), u)
    assert torch.equal(cfg_combine(u, c, 8.0), torch.tensor([17.0, -14.0]))


def test_vp_add_noise_matches_ddpm_scheduler():
    ref = DDPMScheduler(**SDXL_SCHED)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(5, 4, 8, 8, generator=g), torch.randn(5, 4, 8, 8, generator=g)
    t = torch.tensor([0, 1, 249, 749, 999])
    # the same float32 abar; alpha and sigma by sqrt here and ** 0.5 there (1 u32 each), then two products and a
    # sum (3 u32) on values up to |x0| + |noise|
    assert_close(VPSchedule().add_noise(x0, noise, t), ref.add_noise(x0, noise, t), factor=5,
                 mag=magnitude(x0) + magnitude(noise))


def test_vp_sigmas_match_euler_discrete():
    ref = EulerDiscreteScheduler(**SDXL_SCHED, timestep_spacing="leading", steps_offset=1)
    ref.set_timesteps(25)
    a, s = VPSchedule().alpha_sigma(ref.timesteps)
    # float32 from the same abar, relative round-off: sqrt(1 - abar) / sqrt(abar) rounds 4 times (1 - abar, two
    # square roots, the division), diffusers' ((1 - abar) / abar) ** 0.5 3 times
    assert_rel_close(s / a, ref.sigmas[:-1], factor=7)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_shifted_sigmas_match_diffusers(shift):
    ref = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    sched = FlowSchedule(shift=shift)
    # training grid: diffusers shifts sigmas = t/1000 for t = 1000..1
    unshifted = torch.arange(1000, 0, -1, dtype=torch.float32) / 1000
    # float32, relative: the shift s -> shift s / (1 + (shift - 1) s) and * 1000 round 5 times on each side (the
    # same grid t / 1000 on both); one more for our / 1000
    assert_rel_close(sched.shifted_timesteps(unshifted), ref.timesteps, factor=10)
    assert_rel_close(sched.shifted_timesteps(unshifted) / 1000, ref.sigmas, factor=11)
    assert float(shift_sigma(torch.tensor(1.0), shift)) == 1.0


def test_flow_scale_noise_matches_diffusers():
    ref = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    ref.set_timesteps(10)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g)
    for t in ref.timesteps:
        expected = ref.scale_noise(x0, t[None], noise)
        got = FlowSchedule(shift=3.0).add_noise(x0, noise, t[None])
        # our sigma is t / 1000 of diffusers' t = 1000 sigma (2 u32 from theirs), 1 - sigma 1 u32 more, then two
        # products and a sum (3 u32) on values up to |x0| + |noise|
        assert_close(got, expected, factor=6, mag=magnitude(x0) + magnitude(noise))


def test_flow_training_timesteps_in_range():
    t = FlowSchedule(shift=3.0).sample_timesteps(10_000, 0.02, 0.98, generator=torch.Generator().manual_seed(0))
    # the float32 draw rounds 8 times (lo + (hi - lo) u: 3 with lo's own rounding; the shift: 4; * 1000: 1),
    # relative to the timestep; the float64 ends here are exact to 1e-16
    lo, hi = shift_sigma(0.02, 3.0) * 1000, shift_sigma(0.98, 3.0) * 1000
    assert float(t.min()) >= lo - fp32_bound(lo, 8) and float(t.max()) <= hi + fp32_bound(hi, 8)
    t = VPSchedule().sample_timesteps(10_000, 0.02, 0.98, generator=torch.Generator().manual_seed(0))
    assert int(t.min()) == 20 and int(t.max()) == 979  # exclusive by default; the DM loss asks for inclusive


def test_both_schedules_take_every_flag_of_the_base():
    """One Schedule interface: a flag one implementation has no use for gives the same timesteps there -- VP has no
    shift (shift 1), a continuous flow draw has the same distribution with or without its upper end -- and
    sample_timesteps is timesteps_from_uniform of the generator's next uniform numbers on both."""
    u = torch.rand(1000, generator=torch.Generator().manual_seed(1))
    for sched in (VPSchedule(), FlowSchedule(shift=3.0)):
        assert isinstance(sched, Schedule) and sched.t_min == 0.0
        draws = sched.sample_timesteps(1000, 0.02, 0.98, generator=torch.Generator().manual_seed(1))
        assert torch.equal(draws, sched.timesteps_from_uniform(u, 0.02, 0.98))
    vp, fl = VPSchedule(), FlowSchedule(shift=3.0)
    assert vp.shift == 1.0
    assert torch.equal(vp.timesteps_from_uniform(u, 0.02, 0.98, shifted=False), vp.timesteps_from_uniform(u, 0.02, 0.98))
    assert torch.equal(fl.timesteps_from_uniform(u, 0.02, 0.98, inclusive=True), fl.timesteps_from_uniform(u, 0.02, 0.98))


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
    g = torch.Generator().manual_seed(0)
    w = torch.randn(4, 4, generator=g)

    def eps_model(x_vp, t):  # an arbitrary smooth eps-predictor
        return torch.tanh(x_vp @ w) * 0.5 + 0.1 * t.float().reshape(-1, 1, 1, 1) / 1000

    def denoise(x, t):
        a, s = sched.alpha_sigma(t)
        eps = eps_model(x, t)
        return (x - bcast(s, x) * eps) / bcast(a, x), eps

    z = torch.randn(2, 4, 4, 4, generator=g)
    lat = z * ref.init_noise_sigma
    for t in ref.timesteps:
        inp = ref.scale_model_input(lat, t)
        lat = ref.step(eps_model(inp, t.reshape(1)), t, lat).prev_sample
    a0, s0 = sched.alpha_sigma(ref.timesteps[:1])
    x_T = z * ref.init_noise_sigma * a0  # VE latent -> VP latent: x_vp = x_ve * alpha
    ours = sample(denoise, x_T, ref.timesteps.tolist(), sched)
    # float32, the same Euler steps in VP (x0 / eps) and in VE coordinates: each of the 4 steps rounds ~10 times on
    # values up to the VE latent's size and feeds its error through the eps model (Lipschitz 0.5 |w|_2)
    lip = 0.5 * float(torch.linalg.matrix_norm(w, 2))
    mag = max(magnitude(lat), magnitude(z) * ref.init_noise_sigma)
    assert_close(ours, lat, factor=len(ref.timesteps) * (10 + lip), mag=mag)


def test_stochastic_sampler_uses_fresh_noise_and_backsim_matches():
    sched = VPSchedule()
    ts = [999, 749, 499, 249]
    calls = []

    def denoise(x, t):
        calls.append(x.clone())
        return _toy_denoiser(sched)(x, t)

    z = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(7)
    steps = [x for _, x, _ in trajectory(denoise, z, ts, sched, stochastic=True, generator=g)]
    for k in range(len(ts)):
        got = backward_simulate(_toy_denoiser(sched), z, ts, sched, k, generator=torch.Generator().manual_seed(7))
        assert torch.equal(got, steps[k])  # the same loop, the same draws: bitwise
    # fresh noise: the noise injected at each step is not the model's eps nor the previous noise
    a, s = sched.alpha_sigma(torch.tensor([749.0]))
    n1 = (steps[1] - a * 0.5) / s
    a2, s2 = sched.alpha_sigma(torch.tensor([499.0]))
    n2 = (steps[2] - a2 * 0.5) / s2
    # independent draws: the sample correlation of n values has standard error 1 / sqrt(n) (5 of them: 0.18 for
    # n = 768); reused noise would give 1
    assert torch.corrcoef(torch.stack([n1.flatten(), n2.flatten()]))[0, 1].abs() < k_se(1.0, n1.numel())
    assert torch.corrcoef(torch.stack([n1.flatten(), z.flatten()]))[0, 1].abs() < k_se(1.0, n1.numel())


def test_backsim_rejects_bad_step():
    with pytest.raises(ValueError):
        backward_simulate(_toy_denoiser(VPSchedule()), torch.zeros(1, 1), [999, 499], VPSchedule(), 2)


def test_flow_shift_keeps_sigma_one_at_the_top():
    """shift k*s / (1 + (k-1)*s) maps [0, 1] onto itself, but in float32 sigma 1 rounds above 1 for some k (k =
    1.5918966153901275 gives 1000.0001 raw), which setup would refuse as a timestep past the schedule; the schedule
    clamps at 1 so that sigma 1 is exactly the top, and every value below 1 is the unclamped one bit for bit."""
    from flashdmd.diffusion.schedules import FlowSchedule, shift_sigma
    k = 1.5918966153901275
    s = torch.tensor([1.0, 0.75, 0.5, 0.25])
    raw = shift_sigma(s, k) * 1000
    assert raw[0] > 1000  # the rounding this guards against
    got = FlowSchedule(shift=k).shifted_timesteps(s)
    assert got[0] == 1000 and torch.equal(got[1:], raw[1:])
