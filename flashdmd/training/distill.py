"""Stage 1: Flash-DMD timestep-aware distillation, and the DMD2 baseline, in one readable loop.

    for each iteration:
        prompts -> cond                                 (frozen text encoders)
        if iteration % TTUR == 0:   generator_step      (DM loss at high-noise steps, GAN at the low step;
                                                         DMD2: both at one random step)
                                    EMA pull of the fake score toward the student (Flash-DMD)
        else:                       fake_samples        (the same rollout without grad)
        fake_score_step                                 (diffusion loss only; DMD2 adds its latent GAN loss)
        discriminator_step                              (Pixel-GAN heads; real images vs decoded student x0)
        maybe_log / maybe_eval / maybe_sample / maybe_checkpoint   (per generator step)
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from flashdmd import FlashDMDError
from flashdmd.diffusion.samplers import renoise
from flashdmd.training import steps
from flashdmd.training.config import DistillConfig
from flashdmd.training.data import PromptSource, RealImageSource
from flashdmd.training.parallel import reshard
from flashdmd.training.rng import SampleRNG
from flashdmd.training.roles import StudentEMA, build_roles, ema_pull_, trainable_parameters


@dataclass
class Context:
    """Everything a step needs. Built once by :func:`setup`."""
    cfg: DistillConfig
    family: object
    teacher: torch.nn.Module
    student: torch.nn.Module
    fake_score: torch.nn.Module
    disc: torch.nn.Module | None
    timesteps: list[float]
    n_dm: int
    rng: SampleRNG                   # every random draw of the run; indexed by global sample (see training/rng.py)
    prompts: PromptSource
    real: RealImageSource | None
    opt: dict = field(default_factory=dict)
    sched: dict = field(default_factory=dict)
    accelerator: object = None
    generator_steps: int = 0      # Stage-1 generator updates (distillation), in both stages
    rl_steps: int = 0             # Stage-2 RL updates
    global_step: int = 0          # all student updates; logging / eval / checkpoint intervals count these
    iteration: int = 0            # Stage-1 iterations (critic updates)
    stage: int = 1
    reference: torch.nn.Module | None = None
    reward: torch.nn.Module | None = None
    nonfinite: dict = field(default_factory=dict)
    last_checkpoint: str | None = None
    student_ema: object = None        # roles.StudentEMA when cfg.student_ema > 0

    def real_latents(self, n: int) -> Tensor:
        pixels, _ = self.real.sample(n, self.rng)
        with torch.no_grad():
            return self.family.encode_images(pixels.to(self.accelerator.device))

    def randn(self, shape) -> Tensor:
        return self.rng.randn(shape, self.accelerator.device)

    def t(self, k: int, n: int) -> Tensor:
        return torch.full((n,), float(self.timesteps[k]), device=self.accelerator.device)


# ---------------------------------------------------------------------------------------------------
# set-up

def _warmup(warmup: int):
    return lambda step: min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0


def setup(cfg: DistillConfig, accelerator=None, shard=None) -> Context:
    """Build every role, optimiser and data source. ``shard``: a callable applied to the student and the fake
    score before their optimisers exist (tests shard them with FSDP2's ``fully_shard`` on CPU, where
    accelerate's FSDP plugin is not available)."""
    from accelerate import Accelerator

    from flashdmd.families import load_family
    acc = accelerator or Accelerator(mixed_precision=cfg.model_mixed_precision if torch.cuda.is_available() else "no",
                                     cpu=not torch.cuda.is_available())
    torch.manual_seed(cfg.seed + acc.process_index)
    family = load_family(cfg.model_teacher, family=cfg.model_family, device=acc.device)
    roles = build_roles(cfg, family)
    for net in (roles.student, roles.fake_score) if shard is not None else ():
        shard(net.to(acc.device))
    timesteps = [float(t) for t in (cfg.student_timesteps or family.default_student_timesteps)]
    lo, hi = family.schedule.t_min, family.schedule.t_max
    if not all(lo <= t <= hi for t in timesteps):  # the schedules would silently clamp them
        raise FlashDMDError(f"config: student_timesteps {timesteps} lie outside the teacher's schedule [{lo:g}, {hi:g}]")
    n_dm = cfg.student_dm_steps if cfg.student_dm_steps is not None else max(1, len(timesteps) - 1)
    if cfg.method == "flashdmd" and n_dm > len(timesteps):
        raise FlashDMDError(f"config: student_dm_steps={n_dm} exceeds the {len(timesteps)} student steps")
    resolution = family.default_resolution
    real = RealImageSource(cfg.data_real, resolution) if cfg.disc_kind != "none" or \
        not cfg.student_backward_simulation else None
    ctx = Context(cfg=cfg, family=family, teacher=roles.teacher, student=roles.student, fake_score=roles.fake_score,
                  disc=roles.disc, timesteps=timesteps, n_dm=n_dm,
                  rng=SampleRNG(cfg.seed, acc.process_index, cfg.batch_size),
                  prompts=PromptSource(cfg.data_prompts), real=real, accelerator=acc)
    # pooled heads: fix their standardisation before they are prepared (a resume restores the same statistics)
    if cfg.disc_kind == "pixel" and cfg.disc_head == "pooled":
        ctx.disc.calibrate(real.evenly_spaced(cfg.disc_calibration_images), cfg.batch_size)
    _make_optimizers(ctx)
    if cfg.student_ema > 0:
        ctx.student_ema = StudentEMA(acc.unwrap_model(ctx.student), cfg.student_ema)
    return ctx


def after_student_update(ctx: Context) -> None:
    """After every generator or RL update: the student's EMA (when enabled)."""
    if ctx.student_ema is not None:
        reshard(ctx.student)
        ctx.student_ema.update(ctx.accelerator.unwrap_model(ctx.student))


def _adamw(params, lr, cfg):
    return torch.optim.AdamW(params, lr=lr, betas=tuple(cfg.optim_betas), weight_decay=cfg.optim_weight_decay)


def _make_optimizers(ctx: Context):
    """One AdamW per role. DMD2's latent classifier head gets its own optimiser with the fake score's lr, stepped
    together with the fake score's after one backward and one joint clip (AdamW is per parameter, so this is
    DMD2's single guidance optimiser exactly) -- accelerate's FSDP shards one model per prepare call."""
    from flashdmd.training.parallel import check_supported, prepare_role
    cfg, acc = ctx.cfg, ctx.accelerator
    check_supported(acc)
    for net in (ctx.student, ctx.fake_score, ctx.disc):
        if net is not None:
            net.to(acc.device)
    ctx.opt = {"generator": _adamw(trainable_parameters(ctx.student), cfg.generator_lr, cfg),
               "fake_score": _adamw(trainable_parameters(ctx.fake_score), cfg.fake_score_lr, cfg)}
    if cfg.disc_kind == "pixel":
        ctx.opt["disc"] = _adamw(list(ctx.disc.trainable_parameters()), cfg.disc_lr, cfg)
    elif cfg.disc_kind == "latent":
        ctx.opt["disc"] = _adamw(list(ctx.disc.parameters()), cfg.fake_score_lr, cfg)
    # accelerate: DDP / FSDP wrapping across processes (a no-op in one process), one model with its optimiser
    ctx.student, (ctx.opt["generator"],) = prepare_role(acc, ctx.student, [ctx.opt["generator"]])
    ctx.fake_score, (ctx.opt["fake_score"],) = prepare_role(acc, ctx.fake_score, [ctx.opt["fake_score"]])
    if ctx.disc is not None:
        ctx.disc, (ctx.opt["disc"],) = prepare_role(acc, ctx.disc, [ctx.opt["disc"]])
    ctx.sched = {k: torch.optim.lr_scheduler.LambdaLR(o, _warmup(cfg.optim_warmup_steps)) for k, o in ctx.opt.items()}


# ---------------------------------------------------------------------------------------------------
# steps

def _optimise(ctx: Context, roles: str | tuple[str, ...], loss: Tensor, params) -> float:
    """Backward, clip ``params`` jointly, step the optimiser(s) of ``roles``. A non-finite loss or gradient norm
    skips the update with a warning; after ``max_nonfinite_in_row`` in a row for this role the run stops with a
    clear error."""
    from flashdmd.training.parallel import clip_grad_norm_
    roles = (roles,) if isinstance(roles, str) else roles
    role = roles[0]
    for r in roles:
        ctx.opt[r].zero_grad(set_to_none=True)
    ctx.accelerator.backward(loss)
    norm = clip_grad_norm_(params, ctx.cfg.optim_grad_clip)
    if not (torch.isfinite(loss) and torch.isfinite(norm)):
        for r in roles:
            ctx.opt[r].zero_grad(set_to_none=True)
        n = ctx.nonfinite[role] = ctx.nonfinite.get(role, 0) + 1
        what = "loss" if not torch.isfinite(loss) else "gradient"
        warnings.warn(f"{role}: non-finite {what} at step {ctx.global_step}; update skipped ({n} in a row)", stacklevel=2)
        if n >= ctx.cfg.max_nonfinite_in_row:
            raise FlashDMDError(f"{role}: {n} non-finite updates in a row at step {ctx.global_step}; lower the learning "
                                f"rates or check the data (last good checkpoint: {ctx.last_checkpoint or 'none'})")
        return float("nan")
    ctx.nonfinite[role] = 0
    for r in roles:
        ctx.opt[r].step()
        ctx.sched[r].step()
    return float(norm)


def _encode(ctx: Context, prompts: list[str]):
    return ctx.family.encode_prompts(prompts)


def rollout(ctx: Context, cond, uncond, with_grad: bool) -> dict:
    """One student rollout for this iteration; with_grad adds the generator losses.

    Returns detached ``x0_fake_score`` (what the fake score learns from), ``x0_disc`` (what the
    discriminator sees as fake) and, with grad, ``loss`` and per-step logs."""
    cfg, fam = ctx.cfg, ctx.family
    b = len(cond)
    flash = cfg.method == "flashdmd"
    k = ctx.rng.shared_randrange(ctx.n_dm if flash else len(ctx.timesteps))
    res = fam.default_resolution
    z = ctx.randn((b,) + tuple(fam.latent_shape(res, res)))
    x_t = steps.student_input(ctx, z, k, cond)
    logs = {}
    with torch.set_grad_enabled(with_grad):
        x0 = fam.predict(ctx.student, x_t, ctx.t(k, b), cond)[0]
        loss = torch.zeros((), device=x0.device)
        if with_grad:
            dm = steps.dm_loss_at(ctx, x0, cond, uncond).mean()
            loss = loss + cfg.dm_weight * dm
            logs[f"dm_loss/t{int(round(ctx.timesteps[k]))}"] = dm.item()
        x0_disc = x0
        if flash and ctx.disc is not None and ctx.n_dm < len(ctx.timesteps):
            j = ctx.n_dm + ctx.rng.shared_randrange(len(ctx.timesteps) - ctx.n_dm)
            x0_clean = steps.finish_to_clean(ctx, x0.detach(), k, cond)
            x_lo = renoise(x0_clean, None, ctx.timesteps[j], fam.schedule, stochastic=True, generator=ctx.rng)
            x0_disc = fam.predict(ctx.student, x_lo, ctx.t(j, b), cond)[0]
            k_gan = j
        else:
            k_gan = k
        if with_grad and ctx.disc is not None:
            adv = steps.gan_generator_loss(ctx, x0_disc, cond).mean()
            loss = loss + cfg.disc_gen_weight * adv
            logs[f"gan_g_loss/t{int(round(ctx.timesteps[k_gan]))}"] = adv.item()
    return {"x0_fake_score": x0.detach(), "x0_disc": x0_disc.detach(), "loss": loss, "logs": logs}


def generator_step(ctx: Context, cond, uncond) -> dict:
    out = rollout(ctx, cond, uncond, with_grad=True)
    out["logs"]["grad_norm/generator"] = _optimise(ctx, "generator", out["loss"], trainable_parameters(ctx.student))
    out["logs"]["loss/generator"] = out["loss"].item()
    after_student_update(ctx)
    if ctx.cfg.fake_score_ema > 0:
        reshard(ctx.student, ctx.fake_score)  # FSDP2: both as matching shards (no-op otherwise)
        ema_pull_(ctx.accelerator.unwrap_model(ctx.fake_score), ctx.accelerator.unwrap_model(ctx.student),
                  ctx.cfg.fake_score_ema)
    return out


def fake_score_step(ctx: Context, x0_fake: Tensor, cond) -> dict:
    loss = steps.fake_score_loss(ctx, x0_fake, cond).mean()
    logs = {"loss/fake_score": loss.item()}
    if ctx.cfg.disc_kind == "latent":
        real, cond_real = _real_batch(ctx, len(cond))
        with torch.no_grad():
            real_lat = ctx.family.encode_images(real)
        d = steps.latent_disc_loss(ctx, real_lat, cond_real, x0_fake, cond).mean()
        loss = loss + ctx.cfg.disc_weight * d
        logs["loss/disc"] = d.item()
    roles = ("fake_score", "disc") if ctx.cfg.disc_kind == "latent" else ("fake_score",)
    params = [p for r in roles for g in ctx.opt[r].param_groups for p in g["params"]]
    logs["grad_norm/fake_score"] = _optimise(ctx, roles, loss, params)
    return logs


def _real_batch(ctx: Context, n: int):
    pixels, labels = ctx.real.sample(n, ctx.rng)
    pixels = pixels.to(ctx.accelerator.device)
    if labels is not None:
        from flashdmd.world.prompts import prompt_for
        cond = _encode(ctx, [prompt_for(y, r) for y, r in zip(labels, ctx.rng.python(n))])
    else:
        cond = ctx.family.null_conditioning(n)
    return pixels, cond


def discriminator_step(ctx: Context, x0_fake: Tensor) -> dict:
    real, _ = _real_batch(ctx, x0_fake.shape[0])
    loss, d_real, d_fake = steps.pixel_disc_loss(ctx, real, x0_fake)
    heads = [p for g in ctx.opt["disc"].param_groups for p in g["params"]]
    norm = _optimise(ctx, "disc", ctx.cfg.disc_weight * loss.mean(), heads)
    return {"loss/disc": loss.mean().item(), "grad_norm/disc": norm, "disc/D_real": d_real, "disc/D_fake": d_fake}


# ---------------------------------------------------------------------------------------------------
# the loop

def distill_iteration(ctx: Context, writer) -> bool:
    """One Stage-1 iteration; True when it updated the generator."""
    cfg = ctx.cfg
    prompts, _ = ctx.prompts.sample(cfg.batch_size, ctx.rng)
    cond, uncond = _encode(ctx, prompts), ctx.family.null_conditioning(cfg.batch_size)
    gen_now = ctx.iteration % cfg.fake_score_ttur == 0
    with ctx.accelerator.autocast():
        # phase 1: generator (every TTUR-th iteration), else a no-grad rollout for the critics
        out = generator_step(ctx, cond, uncond) if gen_now else rollout(ctx, cond, uncond, with_grad=False)
        # phase 2: critics -- fake score (diffusion loss only) and pixel discriminator
        logs = dict(out["logs"])
        logs.update(fake_score_step(ctx, out["x0_fake_score"], cond))
        if cfg.disc_kind == "pixel":
            logs.update(discriminator_step(ctx, out["x0_disc"]))
    writer.accumulate(logs)
    ctx.iteration += 1
    if gen_now:
        ctx.generator_steps += 1
        ctx.global_step += 1
        writer.bookkeeping(ctx)
    return gen_now


def train(cfg: DistillConfig, out_dir: str | Path, *, progress: bool = True, accelerator=None,
          max_iterations: int | None = None, ctx: Context | None = None, resume: str | None = None,
          overwrite: bool = False) -> dict:
    """Stage 1 for ``cfg.max_steps`` generator steps (or ``max_iterations`` iterations), then Stage 2 when
    ``cfg.rl_enabled``, into ``out_dir``. ``resume``: "latest" or a checkpoint folder. A folder that already
    holds a run is refused unless ``resume`` or ``overwrite``. ``ctx`` lets a caller (tests) pass a context
    built by :func:`setup`."""
    from flashdmd.training.checkpoint import load_checkpoint, resolve
    from flashdmd.training.run import RunWriter

    if not resume and not overwrite and _holds_run(Path(out_dir)):
        raise FlashDMDError(f"{out_dir} already holds a run: continue it with --resume latest, choose another --out, "
                            "or pass --overwrite to replace it")
    # a bad --resume fails before anything is loaded or written into the run folder
    folder = resolve(Path(out_dir), resume) if resume else None
    ctx = ctx or setup(cfg, accelerator)
    restored = _WriterState()
    if folder is not None:
        load_checkpoint(ctx, restored, folder)  # a checkpoint of another config fails here, folder untouched
    writer = RunWriter(out_dir, cfg, ctx)
    if folder is not None:
        writer.load_state_dict(restored.state)
        ctx.last_checkpoint = str(folder)
        if ctx.accelerator.is_main_process:
            print(f"resumed from {folder} at step {ctx.global_step} (stage {ctx.stage})")
    t0 = time.time()
    total = cfg.max_steps * cfg.fake_score_ttur
    if max_iterations is not None:
        total = min(total, max_iterations)
    if ctx.global_step == 0 and cfg.eval_every_steps:
        writer.maybe_eval(ctx, force=True)  # the curve starts at the initial student (the teacher's weights)
    bar = _progress(total, "stage 1", progress and ctx.accelerator.is_main_process, initial=ctx.iteration)
    while ctx.iteration < total:
        distill_iteration(ctx, writer)
        bar.update(1)
        bar.set_postfix(gen_step=ctx.generator_steps)
    bar.close()
    if cfg.rl_enabled and max_iterations is None:
        if ctx.stage == 1:
            setup_stage2_once(ctx, writer)
        run_stage2(ctx, writer, progress)
    return writer.finish(ctx, wall_seconds=time.time() - t0)


class _WriterState:
    """Holds the run writer's state from a checkpoint until the writer exists (see :func:`train`)."""
    state: dict | None = None

    def load_state_dict(self, s: dict):
        self.state = s


def setup_stage2_once(ctx: Context, writer) -> None:
    """Enter Stage 2: freeze the reference, load the LRM, evaluate the Stage-1 student as the guard's baseline."""
    from flashdmd.training.stage2 import setup_stage2
    setup_stage2(ctx)
    ctx.stage = 2
    writer.start_stage2(ctx)


def _holds_run(out: Path) -> bool:
    ckpts = out / "checkpoints"
    return (out / "run.json").is_file() or (ckpts.is_dir() and any(p.name.startswith("step_") for p in ckpts.iterdir()))


def run_stage2(ctx: Context, writer, progress: bool) -> None:
    """RL updates, with one Stage-1 distillation cycle (one generator update and its TTUR critic updates)
    after every ``rl_distill_ratio`` of them."""
    from flashdmd.training.stage2 import rl_step
    cfg = ctx.cfg
    bar = _progress(cfg.rl_steps, "stage 2", progress and ctx.accelerator.is_main_process, initial=ctx.rl_steps)
    while ctx.rl_steps < cfg.rl_steps:
        prompts, _ = ctx.prompts.sample(cfg.batch_size, ctx.rng)
        with ctx.accelerator.autocast():
            logs = rl_step(ctx, _encode(ctx, prompts))
        writer.accumulate(logs)
        ctx.rl_steps += 1
        ctx.global_step += 1
        writer.bookkeeping(ctx)
        if cfg.rl_distill_ratio and ctx.rl_steps % cfg.rl_distill_ratio == 0:
            for _ in range(cfg.fake_score_ttur):  # Stage 1 ended on a cycle boundary: the first one updates G
                distill_iteration(ctx, writer)
        bar.update(1)
    bar.close()


def _progress(total: int, desc: str, enabled: bool, initial: int = 0):
    from tqdm.auto import tqdm
    return tqdm(total=total, initial=initial, desc=desc, unit="it", disable=not enabled, dynamic_ncols=True)
