"""Stage 1 on tiny random SDXL / SD3 models: routing of the losses, TTUR, EMA pull, and that every
role trains while the teacher stays frozen."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import tiny_models as tm  # noqa: E402

from flashdmd.training import steps  # noqa: E402
from flashdmd.training.distill import rollout, setup, train  # noqa: E402
from flashdmd.training.ema import ema_pull_  # noqa: E402
from tolerances import assert_close, k_se, magnitude  # noqa: E402


@pytest.fixture(scope="module")
def folders(tiny_run_folders):
    return tiny_run_folders


_cfg = tm.run_config


def _snapshot(module):
    return {n: p.detach().clone() for n, p in module.named_parameters()}


@pytest.mark.parametrize("family", ["sdxl", "sd3"])
@pytest.mark.parametrize("method", ["flashdmd", "dmd2"])
def test_three_iterations_train_every_role_and_not_the_teacher(folders, family, method, tmp_path):
    cfg = _cfg(folders, family, method)
    ctx = setup(cfg)
    before = tm.snapshot_roles(ctx)
    train(cfg, tmp_path / "run", progress=False, ctx=ctx)
    tm.assert_roles_trained(ctx, before)
    assert (tmp_path / "run" / "student").is_dir() and (tmp_path / "run" / "config.yaml").is_file()


def _record_student_outputs(ctx):
    """Forward hook on the student: every output tensor (with its timestep) gets a grad hook."""
    records = []

    def hook(_mod, args, kwargs, output):
        out = output[0] if isinstance(output, tuple) else output.sample
        t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        rec = {"t": float(torch.as_tensor(t).flatten()[0]), "grad": None, "requires_grad": out.requires_grad}
        if out.requires_grad:
            out.register_hook(lambda g, r=rec: r.__setitem__("grad", g.abs().sum().item()))
        records.append(rec)
    return records, ctx.student.register_forward_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("branch", ["dm", "gan"])
def test_dm_gradient_only_at_high_noise_and_gan_only_at_low(folders, branch):
    kw = dict(dm_weight=1.0, disc_gen_weight=0.0) if branch == "dm" else dict(dm_weight=0.0, disc_gen_weight=1.0)
    ctx = setup(_cfg(folders, "sdxl", "flashdmd", **kw))
    records, handle = _record_student_outputs(ctx)
    seen = set()
    for _ in range(6):  # several iterations so several high-noise steps are drawn
        records.clear()
        prompts = ctx.prompts.sample(2, ctx.rng)
        cond = ctx.family.encode_prompts(prompts)
        out = rollout(ctx, cond, ctx.family.null_conditioning(2), with_grad=True)
        out["loss"].backward()
        with_grad = [r for r in records if r["requires_grad"]]
        assert len(with_grad) == 2  # exactly the high-noise forward and the low-noise forward
        hi, lo = with_grad
        assert hi["t"] in ctx.timesteps[:ctx.n_dm] and lo["t"] == ctx.timesteps[-1]
        if branch == "dm":
            assert hi["grad"] > 0 and not lo["grad"]
        else:
            assert lo["grad"] > 0 and not hi["grad"]
        seen.add(hi["t"])
        ctx.student.zero_grad(set_to_none=True)
    handle.remove()
    assert len(seen) >= 2


def test_dmd2_routes_both_losses_to_one_step(folders):
    ctx = setup(_cfg(folders, "sdxl", "dmd2", disc_gen_weight=1.0))
    records, handle = _record_student_outputs(ctx)
    prompts = ctx.prompts.sample(2, ctx.rng)
    out = rollout(ctx, ctx.family.encode_prompts(prompts), ctx.family.null_conditioning(2), with_grad=True)
    out["loss"].backward()
    handle.remove()
    with_grad = [r for r in records if r["requires_grad"]]
    assert len(with_grad) == 1 and with_grad[0]["grad"] > 0
    assert "dm_loss/t" + str(int(with_grad[0]["t"])) in out["logs"] and any(k.startswith("gan_g_loss") for k in out["logs"])


def test_backward_simulation_matches_student_sampler(folders):
    ctx = setup(_cfg(folders, "sdxl", "flashdmd"))
    fam = ctx.family
    cond = fam.encode_prompts(["a photo of a dress", "a small bag"])
    z = torch.randn((2,) + fam.latent_shape(32, 32))
    from flashdmd.diffusion.samplers import trajectory
    from flashdmd.training.rng import SampleRNG
    ctx.state.rng = SampleRNG(5)
    with torch.no_grad():
        ref = [x for _, x, _ in trajectory(fam.denoiser_fn(ctx.student, cond), z, ctx.timesteps, fam.schedule,
                                           stochastic=True, generator=SampleRNG(5))]
    for k in range(len(ctx.timesteps)):
        ctx.state.rng = SampleRNG(5)
        assert torch.equal(steps.student_input(ctx, z, k, cond), ref[k])  # the same loop and draws: bitwise
    # each re-noising draws fresh noise: consecutive draws are uncorrelated (within 5 standard errors 1 / sqrt(n)
    # of 0; reused noise would give 1)
    r = SampleRNG(5)
    a, b = r.randn((2, 4, 32, 32)), r.randn((2, 4, 32, 32))
    assert torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1].abs() < k_se(1.0, a.numel())


def test_ema_pull_matches_formula():
    a, b = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    pa, pb = _snapshot(a), _snapshot(b)
    ema_pull_(a, b, 0.9)
    for n, p in a.named_parameters():
        # lerp(a, b, 0.1) against 0.9 a + 0.1 b in float32: 0.1 and 0.9 round once each, lerp rounds 3 times
        # (b - a, the product, the sum) and the formula 3 times, on values up to max(|a|, |b|)
        assert_close(p, 0.9 * pa[n] + 0.1 * pb[n], factor=8, mag=magnitude(pa[n], pb[n]))
    b.bias.requires_grad_(False)  # only trainable (e.g. LoRA) tensors of the target are pulled
    a.bias.requires_grad_(False)
    keep = a.bias.detach().clone()
    ema_pull_(a, b, 0.5)
    assert torch.equal(a.bias, keep)


@pytest.mark.parametrize("ttur", [1, 3])
def test_ttur_counts_updates(folders, tmp_path, ttur):
    cfg = _cfg(folders, "sdxl", "flashdmd", fake_score_ttur=ttur, run_max_steps=2, student_timesteps=[999, 499])
    ctx = setup(cfg)
    result = train(cfg, tmp_path / "run", progress=False, ctx=ctx)
    step_count = {role: int(next(iter(o.state.values()))["step"]) for role, o in ctx.opt.items()}
    assert result["generator_steps"] == 2
    assert step_count == {"generator": 2, "fake_score": 2 * ttur, "disc": 2 * ttur}


def test_student_ema_follows_its_formula_and_is_what_is_evaluated_and_saved(folders, tmp_path):
    """student_ema: ema <- d*ema + (1-d)*theta after each generator update; the writer's student (evaluations,
    grids, the saved student) holds the EMA weights in a copy, while training continues on the raw ones."""
    from flashdmd.training.distill import generator_step
    from flashdmd.inference import load_student
    from flashdmd.training.run import RunWriter
    cfg = _cfg(folders, "sdxl", "flashdmd", student_ema=0.75, run_max_steps=1)
    ctx = setup(cfg)
    cond = ctx.family.encode_prompts(ctx.prompts.sample(2, ctx.rng))
    theta0 = _snapshot(ctx.student)
    generator_step(ctx, cond, ctx.family.null_conditioning(2))
    theta1 = _snapshot(ctx.student)
    changed = [n for n in theta0 if not torch.equal(theta0[n], theta1[n])]
    assert changed
    for n in theta0:
        # lerp with the exact weight 0.25: 3 roundings; the formula: 0.75 a and the sum (0.25 b is exact): 2
        assert_close(ctx.student_ema.params[n], 0.75 * theta0[n] + 0.25 * theta1[n], factor=5,
                     mag=magnitude(theta0[n], theta1[n]))
    writer = RunWriter(tmp_path / "run", cfg, ctx)
    net = writer._student_model(ctx).net
    assert net is not ctx.student
    for n, p in net.named_parameters():
        assert torch.equal(p, ctx.student_ema.params[n])  # a copy
    assert all(torch.equal(p, theta1[n]) for n, p in ctx.student.named_parameters())  # raw weights untouched
    writer.save_student(ctx)
    saved = dict(load_student(tmp_path / "run").net.named_parameters())
    assert torch.equal(saved[changed[0]], ctx.student_ema.params[changed[0]])  # float32 to safetensors and back


def test_ema_pull_happens_after_each_generator_step(folders, tmp_path):
    cfg = _cfg(folders, "sdxl", "flashdmd", fake_score_ema=0.5, run_max_steps=1)
    ctx = setup(cfg)
    prompts = ctx.prompts.sample(2, ctx.rng)
    cond = ctx.family.encode_prompts(prompts)
    from flashdmd.training.distill import generator_step
    fake_before = _snapshot(ctx.fake_score)
    generator_step(ctx, cond, ctx.family.null_conditioning(2))
    for n, p in ctx.fake_score.named_parameters():
        theta = dict(ctx.student.named_parameters())[n].detach()
        # lerp with weight 0.5: b - (b - a) * 0.5, 2 roundings; 0.5 a + 0.5 b: 1 (halving is exact)
        assert_close(p, 0.5 * fake_before[n] + 0.5 * theta, factor=3, mag=magnitude(fake_before[n], theta))


def test_lora_student_trains_only_adapters(folders, tmp_path):
    cfg = _cfg(folders, "sd3", "flashdmd", model_lora_rank=2, disc_backbone_path=str(folders["sam"]))
    ctx = setup(cfg)
    before = _snapshot(ctx.student)
    train(cfg, tmp_path / "run", progress=False, ctx=ctx)
    changed = [n for n, p in ctx.student.named_parameters() if not torch.equal(p, before[n])]
    assert changed and all("lora" in n for n in changed)
    from flashdmd.inference import load_student
    m = load_student(tmp_path / "run")
    for n, p in m.net.named_parameters():
        if "lora" in n:
            assert torch.equal(p, dict(ctx.student.named_parameters())[n])  # float32 to safetensors and back


def test_pooled_disc_head_is_calibrated_on_real_images_trains_and_is_checkpointed(folders, tmp_path):
    """disc_head=pooled: the standardisation makes the calibration images' pooled features zero-mean, unit-std
    per channel; the MLP trains, the statistics stay fixed and are saved with the run."""
    from safetensors.torch import load_file

    from flashdmd.networks.discriminator import PooledHead
    cfg = _cfg(folders, "sdxl", "flashdmd", disc_head="pooled", disc_calibration_images=16, run_max_steps=2,
               run_checkpoint_every_steps=2, student_timesteps=[999, 499])
    ctx = setup(cfg)
    head = ctx.disc.heads[0]
    with torch.no_grad():  # the calibration's own chunks: bitwise the pooled features it saw
        p = torch.cat([PooledHead.pool(ctx.disc.backbone(c)) for c in ctx.real.evenly_spaced(16, cfg.run_batch_size)])
    z = (p - head.mean) / head.std
    # float32 means and standard deviations of 16 values: the calibration's mean is within 16 u of max |p| (a sum of
    # 16), which standardising divides by std; z itself rounds twice, and its mean (16 terms) and std (16 squares,
    # the mean's error, a square root) add ~20 u of |z|: 40 u of the larger of max |p| / std and max |z|
    mag = max(float((p.abs().max(0).values / head.std).max()), magnitude(z))
    assert_close(z.mean(0), torch.zeros_like(head.mean), factor=40, mag=mag)
    assert_close(z.std(0), (head.std - 1e-4) / head.std, factor=40, mag=mag)  # std + 1e-4 in the denominator
    assert ctx.disc(torch.zeros(3, 3, 32, 32))[0].shape == (3, 1, 1, 1)
    stats, weights = (head.mean.clone(), head.std.clone()), _snapshot(head)
    train(cfg, tmp_path / "run", progress=False, ctx=ctx)
    assert all(not torch.equal(p, weights[n]) for n, p in head.named_parameters())
    assert torch.equal(head.mean, stats[0]) and torch.equal(head.std, stats[1])
    saved = load_file(str(tmp_path / "run" / "checkpoints" / "step_00000002" / "roles.safetensors"))
    assert torch.equal(saved["disc/heads.0.mean"], stats[0]) and torch.equal(saved["disc/heads.0.std"], stats[1])
