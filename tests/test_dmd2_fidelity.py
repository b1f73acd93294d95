"""The DMD2 baseline against DMD2's own code (tianweiy/DMD2, main/sd_guidance.py and main/train_sd.py): the latent
classifier's layers and parameter count on SDXL's bottleneck, and the warm-up that DMD2's schedulers follow."""
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
import tiny_models as tm  # noqa: E402

from flashdmd.networks.discriminator import LatentClassifierHead  # noqa: E402
from flashdmd.training.distill import distill_iteration, lr_factor, setup  # noqa: E402
from tolerances import U64, fp32_bound, within  # noqa: E402

# learning rates are float64 Python numbers: the schedule's factor (a few operations, a cosine) and its product with
# the base rate round a few times, the expected value here as often
LR_REL = 8 * U64


def test_latent_head_is_dmd2s_cls_pred_branch_on_sdxl():
    head = LatentClassifierHead(1280, side=32)  # SDXL's bottleneck at 1024 px
    convs = [m for m in head.modules() if isinstance(m, nn.Conv2d)]
    # [Conv4x4 s2 p1 -> GN -> SiLU] x 3, Conv4x4 s4 p0 -> GN -> SiLU, Conv1x1 -> 1
    assert [(c.kernel_size, c.stride, c.padding, c.in_channels, c.out_channels) for c in convs] == \
        [((4, 4), (2, 2), (1, 1), 1280, 1280)] * 3 + [((4, 4), (4, 4), (0, 0), 1280, 1280), ((1, 1), (1, 1), (0, 0), 1280, 1)]
    norms = [m for m in head.modules() if isinstance(m, nn.GroupNorm)]
    assert len(norms) == 4 and all(n.num_groups == 32 and n.num_channels == 1280 for n in norms)
    assert sum(isinstance(m, nn.SiLU) for m in head.modules()) == 4
    # 4 x (1280*1280*16 + 1280) + 4 x 2*1280 + (1280 + 1): DMD2's 104.9 M
    assert sum(p.numel() for p in head.parameters()) == 104_874_241
    assert len(LatentClassifierHead(1280, side=8).down) == 1  # DMD2's SD1.5 head (8x8)


def test_latent_head_follows_dmd2s_shapes_and_takes_other_sizes():
    seen = []

    def record(head):
        return [m.register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape[-2:])))
                for m in [*head.down, head.last]]
    head = LatentClassifierHead(64, side=32)
    record(head)
    assert head(torch.randn(2, 64, 32, 32)).shape == (2, 1)  # 32 -> 16 -> 8 -> 4 -> 1
    assert seen == [(16, 16), (8, 8), (4, 4), (1, 1)]
    seen.clear()
    world = LatentClassifierHead(64, side=4)  # the embedded world's bottleneck: straight to the stride-4 block
    record(world)
    assert len(world.down) == 0 and world(torch.randn(2, 64, 4, 4)).shape == (2, 1) and seen == [(1, 1)]
    assert LatentClassifierHead(64, side=6)(torch.randn(1, 64, 6, 6)).shape == (1, 1)  # 6 -> 3, pooled to 4


class _Sink:
    """A run writer that keeps nothing (the loop's logging is not under test here)."""
    def accumulate(self, logs):
        pass

    def bookkeeping(self, ctx):
        pass


@pytest.mark.parametrize("ttur", [1, 3])
def test_warmup_counts_iterations_and_starts_at_zero_as_dmd2(tiny_run_folders, ttur):
    folders = tiny_run_folders
    cfg = tm.run_config(folders, "sdxl", "dmd2", optim_warmup_steps=4, fake_score_ttur=ttur, student_timesteps=[999])
    ctx = setup(cfg)
    lrs = []
    for _ in range(6):
        lrs.append((ctx.opt["generator"].param_groups[0]["lr"], ctx.opt["fake_score"].param_groups[0]["lr"]))
        distill_iteration(ctx, _Sink())
    # diffusers' constant_with_warmup: step / warmup, advanced every iteration (also when TTUR skips the generator)
    expected = [min(1.0, i / 4) for i in range(6)]
    assert [g for g, _ in lrs] == pytest.approx([e * cfg.student_lr for e in expected], rel=LR_REL)
    assert [f for _, f in lrs] == pytest.approx([e * cfg.fake_score_lr for e in expected], rel=LR_REL)


def test_lr_decay_after_warmup_reaches_the_final_fraction_at_max_steps(tiny_run_folders):
    """optim_lr_decay (our choice, not DMD2's): after the warm-up the Stage-1 rates fall to optim_lr_final x lr at
    max_steps x TTUR iterations, counted like the warm-up, and stay there."""
    f = lr_factor(2, "cosine", 10, 0.1)
    assert [f(0), f(1), f(2)] == pytest.approx([0.0, 0.5, 1.0], rel=LR_REL)
    assert f(6) == pytest.approx(0.1 + 0.9 * 0.5, rel=LR_REL) and f(10) == pytest.approx(0.1, rel=LR_REL)
    assert f(50) == pytest.approx(0.1, rel=LR_REL)
    lin = lr_factor(0, "linear", 8, 0.0)
    assert [lin(s) for s in (0, 2, 8, 9)] == pytest.approx([1.0, 0.75, 0.0, 0.0], rel=LR_REL)
    assert lr_factor(0, "none", 8, 0.1)(8) == 1.0
    cfg = tm.run_config(tiny_run_folders, "sdxl", "flashdmd", optim_lr_decay="linear", optim_lr_final=0.2,
                        fake_score_ttur=2, run_max_steps=2, student_timesteps=[999, 499])
    ctx = setup(cfg)
    for _ in range(3):
        distill_iteration(ctx, _Sink())
    assert ctx.opt["fake_score"].param_groups[0]["lr"] == pytest.approx((0.2 + 0.8 * 0.25) * cfg.fake_score_lr,
                                                                        rel=LR_REL)
    distill_iteration(ctx, _Sink())  # the 4th of max_steps x TTUR iterations: the final rate from here on
    assert ctx.opt["generator"].param_groups[0]["lr"] == pytest.approx(0.2 * cfg.student_lr, rel=LR_REL)
    assert ctx.opt["disc"].param_groups[0]["lr"] == pytest.approx(0.2 * cfg.disc_lr, rel=LR_REL)


def test_dm_loss_range_is_inclusive_as_dmd2s_randint():
    from flashdmd.diffusion.schedules import FlowSchedule, VPSchedule
    vp = VPSchedule()
    # DMD2: min_step = int(0.02 * 1000), max_step = int(0.98 * 1000), randint(min_step, max_step + 1)
    u = torch.linspace(0, 1, 100_001)[:-1]  # every bucket of U[0, 1)
    t = vp.timesteps_from_uniform(u, 0.02, 0.98, inclusive=True)
    assert int(t.min()) == 20 and int(t.max()) == 980 and len(t.unique()) == 961
    counts = torch.bincount(t - 20).float()
    assert counts.max() - counts.min() <= 1  # uniform over 20..980
    assert int(vp.timesteps_from_uniform(u, 0.02, 0.98).max()) == 979  # the exclusive draw other uses keep
    # full-range draws stay 0..999 either way
    for inclusive in (False, True):
        full = vp.timesteps_from_uniform(u, 0.0, 1.0, inclusive=inclusive)
        assert int(full.min()) == 0 and int(full.max()) == 999 and len(full.unique()) == 1000
    # flow teachers: shifted (the teacher's training distribution) or uniform sigma (FastGen)
    fl = FlowSchedule(shift=3.0)
    shifted = fl.timesteps_from_uniform(u, 0.02, 0.98) / 1000
    plain = fl.timesteps_from_uniform(u, 0.02, 0.98, shifted=False) / 1000
    # a grid of n points, not random draws: the fraction above a threshold is exact to 1 / n, and float32 rounding
    # (~10 u of s, far below the grid's 1e-5 spacing) can move at most one point across it: 2 / n
    grid = 2 / len(u)
    assert float((plain > 0.5).float().mean()) == pytest.approx(0.5, abs=grid)
    # shift3(s) > 0.5 <=> s > 0.25: (0.98 - 0.25) / 0.96 of U[0.02, 0.98]
    assert float((shifted > 0.5).float().mean()) == pytest.approx(0.73 / 0.96, abs=grid)


@pytest.mark.parametrize("family,shifted,top", [("sdxl", True, 980), ("sd3", True, 1000 * 3 * 0.98 / (1 + 2 * 0.98)),
                                                 ("sd3", False, 980)])
def test_dm_loss_draws_the_configured_range(tiny_run_folders, monkeypatch, family, shifted, top):
    """dm_loss_at noises the student's x0 at the timestep the configured range gives for u -> 1."""
    from flashdmd.training import steps
    folders = tiny_run_folders
    method = "dmd2" if family == "sdxl" else "flashdmd"
    cfg = tm.run_config(folders, family, method, dm_t_shifted=shifted)
    ctx = setup(cfg)
    gap = 1e-7
    monkeypatch.setattr(ctx.rng, "rand", lambda n, device=None: torch.full((n,), 1.0 - gap))
    seen = []
    real_add_noise = ctx.family.schedule.add_noise
    monkeypatch.setattr(type(ctx.family.schedule), "add_noise",
                        lambda self, x0, noise, t: (seen.append(t.float()), real_add_noise(x0, noise, t))[1])
    r = ctx.resolution
    x0 = torch.randn(2, *ctx.family.latent_shape(r, r))
    cond, uncond = ctx.family.encode_prompts(["a", "b"], r, r), ctx.family.null_conditioning(2, r, r)
    steps.dm_loss_at(ctx, x0, cond, uncond)
    # u = 1 - gap moves the timestep by up to 1000 * 0.96 gap * 3 (the shift's slope is at most 3, at s = 0), and the
    # float32 draw rounds ~8 times relative to the timestep
    assert within(abs(float(seen[0][0]) - top), 1000 * 0.96 * gap * 3 + fp32_bound(top, 8))
