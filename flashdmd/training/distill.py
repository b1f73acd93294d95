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

import contextlib
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from flashdmd import FlashDMDError, plugins
from flashdmd.data import RealImageStream, open_image_source, open_prompt_source, read_prompt_file
from flashdmd.diffusion.samplers import renoise
from flashdmd.families import network_call
from flashdmd.training import preempt, steps
from flashdmd.training.config import DistillConfig
from flashdmd.training.parallel import reshard
from flashdmd.training.rng import SampleRNG
from flashdmd.training.roles import StudentEMA, build_roles, ema_pull_, frozen_dtype, trainable_parameters
from flashdmd.training.run import GRID_IMAGES


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
    prompts: object                  # flashdmd.data.PromptSource: sample(n, rng) -> prompts
    real: RealImageStream | None     # real images (GAN / no backward simulation); its position is checkpointed
    resolution: int = 0              # training image side in pixels (data_resolution or the teacher's)
    evaluator: object = None         # flashdmd.evaluation.Evaluator or None
    grid_prompts: list = field(default_factory=list)
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
    schedule_processes: int = 1       # the learning-rate schedules advance this many steps an iteration (the first
                                      # launch's process count, kept by every resume: see step_schedulers)
    stage2_start_iteration: int | None = None   # the iteration Stage 2 began at (its cycles are counted from it)
    boundary: tuple | None = None     # (iteration, rl_steps) right after the latest student update (global step)

    def real_latents(self, n: int) -> Tensor:
        pixels, _ = _real_batch(self, n)
        with torch.no_grad():
            return self.family.encode_images(pixels)

    def randn(self, shape) -> Tensor:
        return self.rng.randn(shape, self.accelerator.device, self.family.dtype)

    def t(self, k: int, n: int) -> Tensor:
        return torch.full((n,), float(self.timesteps[k]), device=self.accelerator.device)


# ---------------------------------------------------------------------------------------------------
# set-up

EVAL_BACKENDS = ("eval_clip_model", "eval_pickscore_model", "eval_hpsv2_model", "eval_imagereward_model",
                 "eval_fid_inception", "eval_fid_ref")

def lr_factor(warmup: int, decay: str = "none", total: int = 0, final: float = 1.0):
    """The Stage-1 learning-rate factor of scheduler step ``step``, stepped per iteration and process
    (:func:`step_schedulers`). Warm-up as DMD2's ``constant_with_warmup`` (diffusers' get_scheduler): step / warmup
    below ``warmup`` -- so DMD2's first update runs at lr 0 --, then 1, or with ``decay`` (cosine / linear) falling
    from 1 after the warm-up to ``final`` at step ``total`` and staying there."""
    def factor(step: int) -> float:
        f = min(1.0, step / warmup) if warmup > 0 else 1.0
        if decay == "none" or total <= warmup:
            return f
        p = min(1.0, max(0.0, (step - warmup) / (total - warmup)))
        shape = 0.5 * (1.0 + math.cos(math.pi * p)) if decay == "cosine" else 1.0 - p
        return f * (final + (1.0 - final) * shape)
    return factor


STAGE1_SCHEDULERS = ("generator", "fake_score", "disc")


def step_schedulers(ctx) -> None:
    """After every Stage-1 iteration, each Stage-1 learning-rate schedule advances once per process, whether or not
    its role updated this iteration: DMD2 steps its generator and guidance schedulers every iteration (also when
    TTUR skips the generator) and accelerate's prepared scheduler steps ``num_processes`` times per call, so DMD2's
    500 warm-up steps on 64 GPUs last about 8 iterations. The process count is the first launch's
    (``ctx.schedule_processes``, kept in every checkpoint): a run resumed on another number of processes follows
    the same schedule per iteration."""
    for name in STAGE1_SCHEDULERS:
        if name in ctx.sched:
            for _ in range(ctx.schedule_processes):
                ctx.sched[name].step()


def setup(cfg: DistillConfig, accelerator=None, shard=None, log=None) -> Context:
    """Build every role, optimiser, data source and the evaluator; check everything the run will need
    (reward model included) before returning, so that a bad path fails before the expensive part.
    ``shard``: a callable applied to the student and the fake score before their optimisers exist (tests
    shard them with FSDP2's ``fully_shard`` on CPU, where accelerate's FSDP plugin is not available).
    ``log``: a callable receiving one line per check (``flashdmd distill --dry-run`` prints them)."""
    from flashdmd.families import load_family
    log = log or (lambda line: None)
    check_trackers(cfg)
    acc = accelerator or make_accelerator(cfg)
    torch.manual_seed(cfg.run_seed + acc.process_index)
    family = load_family(cfg.model_teacher, family=cfg.model_family, device=acc.device,
                         dtype=getattr(torch, cfg.model_dtype), frozen_dtype=frozen_dtype(cfg, acc.device))
    resolution = cfg.data_resolution or family.default_resolution
    family.use_resolution(resolution, resolution)  # a size the VAE or the denoiser cannot take fails here
    family.embedded_guidance = cfg.model_embedded_guidance  # read only by guidance-distilled families (FLUX.1-dev)
    timesteps, n_dm = _student_steps(cfg, family)
    log(f"teacher: {family.path} ({family.name}, {type(family.denoiser).__name__}, {resolution} px, student steps "
        f"{timesteps})")
    log(f"dtypes: frozen parts {str(family.frozen_dtype).removeprefix('torch.')}, trainable weights, optimiser "
        f"states and latents {cfg.model_dtype}")
    reward_path = check_reward_model(cfg, family)
    if reward_path is not None:
        log(f"reward model: {reward_path} (fits the teacher)")
    real = _real_stream(cfg, acc, resolution) if cfg.disc_kind != "none" or not cfg.student_backward_simulation \
        else None
    if real is not None:
        log(f"real images: {real.source.describe()}, {len(real.source)} images -> {resolution} px ({cfg.data_crop} "
            f"crop), {real.num_workers} worker(s)")
    if cfg.disc_condition == "text":
        _check_captioned(real)
    prompts = open_prompt_source(cfg.data_prompts, captions_of=lambda: _captions(cfg, real, resolution))
    log(f"training prompts: {cfg.data_prompts}")
    evaluator, grid = _evaluation(cfg, acc.device, prompts)
    log(f"evaluation: {type(evaluator).__name__ if evaluator else 'none'}"
        + (f" ({', '.join(sorted(evaluator.higher_is_better))})" if evaluator else ""))
    if cfg.model_text_cache:
        n = cache_text(cfg, family, prompts, evaluator, grid, real, resolution)
        log(f"text cache: {n} prompts encoded, text encoders released")
    roles = build_roles(cfg, family)
    log(f"roles: student, fake score{', discriminator (' + cfg.disc_kind + ')' if roles.disc is not None else ''}")
    for net in (roles.student, roles.fake_score) if shard is not None else ():
        shard(net.to(acc.device))
    ctx = Context(cfg=cfg, family=family, teacher=roles.teacher, student=roles.student, fake_score=roles.fake_score,
                  disc=roles.disc, timesteps=timesteps, n_dm=n_dm,
                  rng=SampleRNG(cfg.run_seed, acc.process_index, cfg.run_batch_size),
                  prompts=prompts, real=real, accelerator=acc, resolution=resolution, evaluator=evaluator,
                  grid_prompts=grid)
    # pooled heads: fix their standardisation before they are prepared (a resume restores the same statistics)
    if cfg.disc_kind == "pixel" and cfg.disc_head == "pooled":
        ctx.disc.calibrate(real.evenly_spaced(cfg.disc_calibration_images, cfg.run_batch_size))
    _make_optimizers(ctx)
    if cfg.student_ema > 0:
        ctx.student_ema = StudentEMA(acc.unwrap_model(ctx.student), cfg.student_ema)
    return ctx


def make_accelerator(cfg: DistillConfig):
    """The run's Accelerator, with ``model_mixed_precision`` on GPU and on CPU alike (bf16: torch.autocast to
    bfloat16, which torch runs on CPU too), so that a CPU run takes the half-precision path of a GPU run. accelerate
    holds one mixed-precision setting per process; in a single process that ran another setting before (tests,
    benchmarks running several configs one after the other) it is reset to this run's."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState
    held = AcceleratorState._shared_state.get("_mixed_precision")
    if held not in (None, cfg.model_mixed_precision) and PartialState._shared_state.get("num_processes", 1) == 1:
        AcceleratorState._reset_state()
    return Accelerator(mixed_precision=cfg.model_mixed_precision, cpu=not torch.cuda.is_available())


def _check_captioned(real) -> None:
    """disc_condition text judges real images with their captions: up to 64 evenly spaced items must have one (a
    source without captions fails here; a straggler fails at its batch, from discriminator_step)."""
    n = len(real.source)
    for i in sorted({round(k * (n - 1) / 63) for k in range(64)} if n > 1 else {0}):
        if not real.source.caption(i):
            raise FlashDMDError(f"disc_condition: text needs a caption for every real image, and item {i} of "
                                f"{real.source.describe()} has none: add captions (metadata.jsonl text, a text column, "
                                ".txt in the shards) or set disc_condition: none")


def _student_steps(cfg: DistillConfig, family) -> tuple[list[float], int]:
    """(the K student timesteps, how many leading ones get the DM loss), checked against the teacher's schedule."""
    timesteps = [float(t) for t in (cfg.student_timesteps or family.default_student_timesteps)]
    lo, hi = family.schedule.t_min, family.schedule.t_max
    if not all(lo <= t <= hi for t in timesteps):  # the schedules would silently clamp them
        raise FlashDMDError(f"config: student_timesteps {timesteps} lie outside the teacher's schedule [{lo:g}, {hi:g}]")
    n_dm = cfg.student_dm_steps if cfg.student_dm_steps is not None else max(1, len(timesteps) - 1)
    if cfg.method == "flashdmd" and n_dm > len(timesteps):
        raise FlashDMDError(f"config: student_dm_steps={n_dm} exceeds the {len(timesteps)} student steps")
    return timesteps, n_dm


def check_trackers(cfg: DistillConfig) -> None:
    """run_report_to's trackers can be imported (wandb is an optional package)."""
    import importlib.util
    if "wandb" in cfg.run_report_to and importlib.util.find_spec("wandb") is None:
        raise FlashDMDError("run_report_to has wandb but wandb is not installed: `pip install wandb`, or drop it "
                            "from run_report_to (tensorboard is the default)")


def _real_stream(cfg: DistillConfig, acc, resolution: int) -> RealImageStream:
    source = open_image_source(cfg.data_real)
    check_readable(source)
    workers = cfg.data_workers if cfg.data_workers is not None else (0 if plugins.find(cfg.data_real) else 2)
    return RealImageStream(source, resolution, cfg.run_batch_size, crop=cfg.data_crop, seed=cfg.run_seed,
                           process_index=acc.process_index, num_processes=acc.num_processes, num_workers=workers,
                           max_bad_fraction=cfg.data_max_bad_fraction)


def check_readable(source, first: int = 8) -> None:
    """At least one of the first ``first`` images decodes (the stream skips and counts bad files later; a folder
    of nothing readable fails here, before any model work)."""
    errors = []
    for i in range(min(first, len(source))):
        try:
            source.read(i)
            return
        except Exception as e:  # PIL raises many kinds; each is reported by the stream's own count later
            errors.append(f"{e}")
    raise FlashDMDError(f"data_real: none of the first {len(errors)} images of {source.describe()} can be read "
                        f"({errors[0] if errors else 'empty'}): check the files")


def _captions(cfg: DistillConfig, real, resolution: int) -> list[str]:
    """The captions of data_real (for ``data_prompts: captions``), also when the run reads no real images."""
    if real is not None:
        return real.captions()
    with RealImageStream(open_image_source(cfg.data_real), resolution, 1) as stream:
        return stream.captions()


def _evaluation(cfg: DistillConfig, device, prompts) -> tuple[object | None, list[str]]:
    """(the run's held-out evaluator or None, the prompts of its sample grids).

    eval_prompts (+ the metric backends, loaded here so that a wrong path fails now) -> RealEvaluator; else a
    plug-in teacher's own evaluator (the world's FD / alignment / diversity / oracle); else none."""
    from flashdmd.evaluation.real import RealEvaluator
    owner = plugins.model_owner(cfg.model_teacher)
    if cfg.eval_prompts is not None:
        grid = read_prompt_file(cfg.eval_prompts)
        evaluator = RealEvaluator.from_paths(
            cfg.eval_prompts, cfg.eval_num_images, clip=cfg.eval_clip_model, pickscore=cfg.eval_pickscore_model,
            hpsv2=cfg.eval_hpsv2_model, imagereward=cfg.eval_imagereward_model, fid_inception=cfg.eval_fid_inception,
            fid_ref=cfg.eval_fid_ref, device=device, batch_size=cfg.eval_batch_size) if cfg.eval_every_steps else None
        if evaluator is not None and not evaluator.higher_is_better:
            warnings.warn("eval_prompts without a metric backend: evaluations record speed only (set eval_clip_model, "
                          "eval_pickscore_model, eval_hpsv2_model, eval_imagereward_model or eval_fid_inception + "
                          "eval_fid_ref)", stacklevel=3)
    else:
        backends = [k for k in EVAL_BACKENDS if getattr(cfg, k) is not None]
        if backends:
            raise FlashDMDError(f"config: {backends[0]} is set but eval_prompts is not: give a text file of held-out "
                                "prompts (one per line) to evaluate on")
        if owner is not None and owner.grid_prompts is not None:
            grid = owner.grid_prompts(GRID_IMAGES)
        else:
            grid = prompts.sample(GRID_IMAGES, SampleRNG(0, 0, GRID_IMAGES))
        evaluator = owner.evaluator(cfg.eval_num_images, device) \
            if cfg.eval_every_steps and owner is not None and owner.evaluator is not None else None
        if evaluator is None and cfg.eval_every_steps:
            warnings.warn("no held-out metrics for this run: set eval_prompts (a prompt file) and a metric backend "
                          "(eval_clip_model, eval_pickscore_model, eval_hpsv2_model, eval_imagereward_model, "
                          "eval_fid_inception + eval_fid_ref) to get a metric curve and the reward-hacking guard",
                          stacklevel=3)
    return evaluator, (grid * GRID_IMAGES)[:GRID_IMAGES]


def cache_text(cfg: DistillConfig, family, prompts, evaluator, grid: list[str], real, resolution: int) -> int:
    """model_text_cache: encode every prompt the run can ask for -- the training prompts (a source that lists them),
    the sample-grid and evaluation prompts, the real images' captions when a GAN conditions on them (DMD2's latent
    GAN; a text-conditioned Pixel-GAN), ""
    and the null conditioning -- then release the text encoders. Returns the number of prompts cached."""
    listed = getattr(prompts, "prompts", None)
    if listed is None:
        raise FlashDMDError(f"model_text_cache: the training prompts of data_prompts {cfg.data_prompts!r} cannot be "
                            "listed in advance (a plug-in draws them); use a prompt file or captions, or set "
                            "model_text_cache false")
    todo = [""] + list(listed) + list(grid)
    if evaluator is not None:
        held_out = getattr(evaluator, "prompts", None)
        if held_out is None:
            raise FlashDMDError(f"model_text_cache: the evaluator ({type(evaluator).__name__}) does not list its "
                                "prompts; set eval_prompts (a prompt file), eval_every_steps 0, or model_text_cache "
                                "false")
        todo += list(held_out)
    if (cfg.disc_kind == "latent" or cfg.disc_condition == "text") and real is not None \
            and cfg.data_prompts != "captions":
        try:
            todo += _captions(cfg, real, resolution)
        except FlashDMDError:  # no captions: DMD2's real branch uses the null conditioning
            if cfg.disc_condition == "text":
                raise
            pass
    family.cache_prompts(todo, cfg.run_batch_size)
    family.release_text_encoders()
    return family.cached_prompts


def check_reward_model(cfg: DistillConfig, family) -> Path | None:
    """With Stage 2 enabled: the LRM folder, loaded once here (it must fit the teacher's family, weights and
    feature taps) and dropped again; Stage 2 loads it when it starts. One-line errors say how to get one."""
    if not cfg.rl_enabled:
        return None
    if cfg.rl_judge is not None:  # a preference model on images: its folder is checked by loading it once
        from flashdmd.evaluation.judges import load_judge
        load_judge(cfg.rl_judge, cfg.rl_judge_model)
        return Path(cfg.rl_judge_model)
    from flashdmd.training.stage2 import load_reward_model, resolve_reward_model
    plugin = plugins.find(cfg.rl_reward_model)
    if plugin is not None and plugins.model_owner(family.path) is not plugin:
        raise FlashDMDError(
            f"rl_reward_model {cfg.rl_reward_model!r} provides reward models for its own teachers only, not for "
            f"{cfg.model_teacher}: make preference pairs with `flashdmd reward make-pairs --model {cfg.model_teacher} "
            "--prompts FILE --judge pickscore --judge-model DIR --num 20000 --out pairs.jsonl`, train one with "
            f"`flashdmd reward train --pairs pairs.jsonl --family-model {cfg.model_teacher} --out lrm/`, and set "
            "rl_reward_model=lrm/ (docs/PAIRS.md)")
    path = resolve_reward_model(cfg.rl_reward_model, family.name)
    if not path.is_dir():
        raise FlashDMDError(f"rl_reward_model {path} does not exist: give the folder `flashdmd reward train` wrote "
                            "or LPO's LRM folder (docs/PAIRS.md)")
    load_reward_model(path, family, cfg, check_only=True)  # family, fingerprint, taps and weights checked here
    return path


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
    ctx.opt = {"generator": _adamw(trainable_parameters(ctx.student), cfg.student_lr, cfg),
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
    ctx.schedule_processes = acc.num_processes  # a resume restores the first launch's (load_checkpoint)

    def factor(step: int) -> float:  # scheduler steps in Stage 1: iterations x the schedule's process count
        total = cfg.run_max_steps * cfg.fake_score_ttur * ctx.schedule_processes
        return lr_factor(cfg.optim_warmup_steps, cfg.optim_lr_decay, total, cfg.optim_lr_final)(step)
    ctx.sched = {k: torch.optim.lr_scheduler.LambdaLR(o, factor) for k, o in ctx.opt.items()}


# ---------------------------------------------------------------------------------------------------
# steps

def _optimise(ctx: Context, roles: str | tuple[str, ...], loss: Tensor, params) -> float:
    """Backward, clip ``params`` jointly, step the optimiser(s) of ``roles``, then free every gradient (also those
    the backward left on other roles: DMD2's generator loss reaches the fake score's weights), so that no phase
    carries the previous phase's gradients (what `flashdmd plan` assumes). A non-finite loss or gradient norm
    skips the update with a warning; after ``run_max_nonfinite_in_row`` in a row for this role the run stops with a
    clear error."""
    from flashdmd.training.parallel import clip_grad_norm_
    roles = (roles,) if isinstance(roles, str) else roles
    role = roles[0]
    for r in roles:
        ctx.opt[r].zero_grad(set_to_none=True)
    with network_call(f"{role} update (backward)", None, loss):
        ctx.accelerator.backward(loss)
    norm = clip_grad_norm_(params, ctx.cfg.optim_grad_clip)
    finite = bool(torch.isfinite(loss) and torch.isfinite(norm))
    if finite:
        for r in roles:
            ctx.opt[r].step()
    for opt in ctx.opt.values():
        opt.zero_grad(set_to_none=True)
    if finite:
        ctx.nonfinite[role] = 0
        return float(norm)
    n = ctx.nonfinite[role] = ctx.nonfinite.get(role, 0) + 1
    what = "loss" if not torch.isfinite(loss) else "gradient"
    warnings.warn(f"{role}: non-finite {what} at step {ctx.global_step}; update skipped ({n} in a row)", stacklevel=2)
    if n >= ctx.cfg.run_max_nonfinite_in_row:
        raise FlashDMDError(f"{role}: {n} non-finite updates in a row at step {ctx.global_step}; lower the learning "
                            f"rates or check the data (last good checkpoint: {ctx.last_checkpoint or 'none'})")
    return float("nan")


def _encode(ctx: Context, prompts: list[str]):
    return ctx.family.encode_prompts(prompts, ctx.resolution, ctx.resolution)


def rollout(ctx: Context, cond, uncond, with_grad: bool) -> dict:
    """One student rollout for this iteration; with_grad adds the generator losses.

    Returns detached ``x0_fake_score`` (what the fake score learns from), ``x0_disc`` (what the
    discriminator sees as fake) and, with grad, ``loss`` and per-step logs."""
    cfg, fam = ctx.cfg, ctx.family
    b = len(cond)
    flash = cfg.method == "flashdmd"
    k = ctx.rng.shared_randrange(ctx.n_dm if flash else len(ctx.timesteps))
    res = ctx.resolution
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
        real, captions = _real_batch(ctx, len(cond))
        cond_real = _caption_cond(ctx, captions)
        with torch.no_grad():
            real_lat = ctx.family.encode_images(real)
        d = steps.latent_disc_loss(ctx, real_lat, cond_real, x0_fake, cond).mean()
        loss = loss + ctx.cfg.disc_weight * d
        logs["loss/disc"] = d.item()
    roles = ("fake_score", "disc") if ctx.cfg.disc_kind == "latent" else ("fake_score",)
    params = [p for r in roles for g in ctx.opt[r].param_groups for p in g["params"]]
    logs["grad_norm/fake_score"] = _optimise(ctx, roles, loss, params)
    return logs


def _real_batch(ctx: Context, n: int) -> tuple[Tensor, list]:
    """The next real images (n, 3, R, R) in the run's dtype on its device, and their captions."""
    pixels, captions = ctx.real.next_batch()
    if pixels.shape[0] != n:
        raise FlashDMDError(f"real-image batch of {pixels.shape[0]} for a batch of {n}")
    return pixels.to(ctx.accelerator.device, ctx.family.dtype), captions


def _caption_cond(ctx: Context, captions: list):
    """The real images' conditioning: their captions where every image has one (DMD2 conditions the real branch
    of its classifier on the image's caption), else the null conditioning."""
    if all(c is not None for c in captions):
        return _encode(ctx, list(captions))
    return ctx.family.null_conditioning(len(captions), ctx.resolution, ctx.resolution)


def discriminator_step(ctx: Context, x0_fake: Tensor, cond) -> dict:
    real, captions = _real_batch(ctx, x0_fake.shape[0])
    if ctx.cfg.disc_condition == "text":
        if any(c is None for c in captions):
            raise FlashDMDError("disc_condition: text judges real images with their captions, and a real batch has "
                                "images without one: give every image in data_real a caption, or set disc_condition: none")
        loss, d_real, d_fake = steps.pixel_disc_loss(ctx, real, x0_fake, _encode(ctx, list(captions)), cond)
    else:
        loss, d_real, d_fake = steps.pixel_disc_loss(ctx, real, x0_fake)
    heads = [p for g in ctx.opt["disc"].param_groups for p in g["params"]]
    norm = _optimise(ctx, "disc", ctx.cfg.disc_weight * loss.mean(), heads)
    return {"loss/disc": loss.mean().item(), "grad_norm/disc": norm, "disc/D_real": d_real, "disc/D_fake": d_fake}


# ---------------------------------------------------------------------------------------------------
# the loop

def distill_iteration(ctx: Context, writer) -> bool:
    """One Stage-1 iteration; True when it updated the generator."""
    cfg = ctx.cfg
    prompts = ctx.prompts.sample(cfg.run_batch_size, ctx.rng)
    cond, uncond = _encode(ctx, prompts), ctx.family.null_conditioning(cfg.run_batch_size, ctx.resolution,
                                                                       ctx.resolution)
    gen_now = ctx.iteration % cfg.fake_score_ttur == 0
    with ctx.accelerator.autocast():
        # phase 1: generator (every TTUR-th iteration), else a no-grad rollout for the critics
        out = generator_step(ctx, cond, uncond) if gen_now else rollout(ctx, cond, uncond, with_grad=False)
        # phase 2: critics -- fake score (diffusion loss only) and pixel discriminator
        logs = dict(out["logs"])
        logs.update(fake_score_step(ctx, out["x0_fake_score"], cond))
        if cfg.disc_kind == "pixel":
            logs.update(discriminator_step(ctx, out["x0_disc"], cond))
    writer.accumulate(logs)
    step_schedulers(ctx)
    ctx.iteration += 1
    if gen_now:
        ctx.generator_steps += 1
        ctx.global_step += 1
        ctx.boundary = (ctx.iteration, ctx.rl_steps)
        writer.bookkeeping(ctx)
    return gen_now


def train(cfg: DistillConfig, out_dir: str | Path, *, progress: bool = True, accelerator=None,
          max_iterations: int | None = None, ctx: Context | None = None, resume: str | None = None,
          overwrite: bool = False) -> dict:
    """Stage 1 for ``cfg.run_max_steps`` generator steps (or ``max_iterations`` iterations), then Stage 2 when
    ``cfg.rl_enabled``, into ``out_dir``. ``resume``: "latest" or a checkpoint folder. A folder that already
    holds a run is refused unless ``resume`` or ``overwrite``. ``ctx`` lets a caller (tests) pass a context
    built by :func:`setup`."""
    from flashdmd.training.checkpoint import check_global_batch, load_checkpoint, read_state, resolve
    from flashdmd.training.run import RunWriter, clear_run_dir

    if resume and overwrite:
        raise FlashDMDError("--resume and --overwrite exclude each other: continue the run, or replace it")
    if not resume and not overwrite and _holds_run(Path(out_dir)):
        raise FlashDMDError(f"{out_dir} already holds a run: continue it with --resume latest, choose another --out, "
                            "or pass --overwrite to replace it")
    # a bad --resume fails before anything is loaded or written into the run folder
    folder = resolve(Path(out_dir), resume) if resume else None
    if folder is not None:  # another global batch fails before any model is loaded (the launcher sets WORLD_SIZE)
        acc = ctx.accelerator if ctx is not None else accelerator
        processes = acc.num_processes if acc is not None else int(os.environ.get("WORLD_SIZE", "1"))
        check_global_batch(folder, read_state(folder), cfg.run_batch_size, processes)
    ctx = ctx or setup(cfg, accelerator)
    if overwrite and ctx.accelerator.is_main_process:  # every check passed: now the old run's state goes
        removed = clear_run_dir(out_dir)
        if removed:
            print(f"--overwrite: removed the previous run's {', '.join(removed)} from {out_dir}")
    ctx.accelerator.wait_for_everyone()
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
    total = cfg.run_max_steps * cfg.fake_score_ttur
    if max_iterations is not None:
        total = min(total, max_iterations)
    # SIGTERM / SIGUSR1: checkpoint after the iteration, raise Preempted; the data-loader workers stop when training
    # ends, however it ends (left to the interpreter's exit, their shutdown took seconds)
    with preempt.watch() as signalled, contextlib.nullcontext() if ctx.real is None else ctx.real:
        if ctx.global_step == 0 and cfg.eval_every_steps:
            writer.maybe_eval(ctx, force=True)  # the curve starts at the initial student (the teacher's weights)
        bar = _progress(total, "stage 1", progress and ctx.accelerator.is_main_process, initial=ctx.iteration)
        try:
            while ctx.stage == 1 and ctx.iteration < total:
                distill_iteration(ctx, writer)
                bar.update(1)
                bar.set_postfix(gen_step=ctx.generator_steps)
                preempt.stop_if_signalled(ctx, writer, signalled)
        finally:
            bar.close()
        if cfg.rl_enabled and max_iterations is None:
            if ctx.stage == 1:
                setup_stage2_once(ctx, writer)
            run_stage2(ctx, writer, progress, signalled)
        return writer.finish(ctx, wall_seconds=time.time() - t0)


def dry_run(cfg: DistillConfig, log=print, accelerator=None) -> None:
    """``flashdmd distill --dry-run``: every check :func:`setup` makes, every role built, one Stage-1 iteration
    (a generator update with its critic updates) and, with Stage 2 enabled, one RL update, all at batch 1 with
    nothing written. Raises FlashDMDError on the first problem."""
    import dataclasses
    t0 = time.time()
    small = dataclasses.replace(cfg, run_batch_size=1, disc_calibration_images=min(cfg.disc_calibration_images, 4))
    ctx = setup(small, accelerator, log=log)
    sink = _NullWriter()
    for _ in range(small.fake_score_ttur):  # the first iteration updates the generator, the rest the critics
        distill_iteration(ctx, sink)
    log(f"stage 1: one generator update and {small.fake_score_ttur} critic update(s) at batch 1")
    if small.rl_enabled:
        from flashdmd.training.stage2 import rl_step, setup_stage2
        setup_stage2(ctx)
        one = ctx.prompts.sample(1, ctx.rng)
        rl_step(ctx, _encode(ctx, one), one)
        log("stage 2: one RL update at batch 1")
    if ctx.real is not None:
        ctx.real.close()
    log(f"dry run passed in {time.time() - t0:.1f} s: nothing was written")


class _NullWriter:
    """The run writer's interface, writing nothing (dry runs)."""
    def accumulate(self, logs: dict):
        pass

    def bookkeeping(self, ctx):
        pass


class _WriterState:
    """Holds the run writer's state from a checkpoint until the writer exists (see :func:`train`)."""
    state: dict | None = None

    def load_state_dict(self, s: dict):
        self.state = s


def setup_stage2_once(ctx: Context, writer) -> None:
    """Enter Stage 2: start from the Stage-1 student as evaluated (its EMA, ``rl_from_ema``), freeze the reference,
    load the LRM, evaluate the Stage-1 student as the guard's baseline."""
    from flashdmd.training.stage2 import setup_stage2
    if ctx.student_ema is not None and ctx.cfg.rl_from_ema:
        ctx.student_ema.copy_to(ctx.accelerator.unwrap_model(ctx.student))
    setup_stage2(ctx)
    ctx.stage = 2
    ctx.stage2_start_iteration = ctx.iteration
    writer.start_stage2(ctx)


def _holds_run(out: Path) -> bool:
    ckpts = out / "checkpoints"
    return (out / "run.json").is_file() or (ckpts.is_dir() and any(p.name.startswith("step_") for p in ckpts.iterdir()))


def run_stage2(ctx: Context, writer, progress: bool, signalled=None) -> None:
    """RL updates, with one Stage-1 distillation cycle (one generator update and its TTUR critic updates)
    after every ``rl_distill_ratio`` of them. ``signalled``: a :class:`flashdmd.training.preempt.Flag` checked
    after every RL update and every iteration of a cycle. The cycles owed are counted from the iterations (see
    :func:`stage2_iterations_due`), so a checkpoint written anywhere -- after an RL update that a cycle follows,
    inside a cycle -- resumes exactly where it was."""
    from flashdmd.training.stage2 import rl_step
    cfg = ctx.cfg
    bar = _progress(cfg.rl_steps, "stage 2", progress and ctx.accelerator.is_main_process, initial=ctx.rl_steps)
    try:
        while True:
            while ctx.iteration < stage2_iterations_due(ctx):  # Stage 1 ended on a cycle boundary: G updates first
                distill_iteration(ctx, writer)
                preempt.stop_if_signalled(ctx, writer, signalled)
            if ctx.rl_steps >= cfg.rl_steps:
                break
            prompts = ctx.prompts.sample(cfg.run_batch_size, ctx.rng)
            with ctx.accelerator.autocast():
                logs = rl_step(ctx, _encode(ctx, prompts), prompts)
            writer.accumulate(logs)
            ctx.rl_steps += 1
            ctx.global_step += 1
            ctx.boundary = (ctx.iteration, ctx.rl_steps)
            writer.bookkeeping(ctx)
            bar.update(1)
            preempt.stop_if_signalled(ctx, writer, signalled)
    finally:
        bar.close()


def stage2_iterations_due(ctx: Context) -> int:
    """The Stage-1 iterations a Stage-2 run has made once the distillation cycles of its RL updates so far are
    done: one cycle of ``fake_score_ttur`` iterations per ``rl_distill_ratio`` RL updates."""
    cfg = ctx.cfg
    cycles = ctx.rl_steps // cfg.rl_distill_ratio if cfg.rl_distill_ratio else 0
    return ctx.stage2_start_iteration + cycles * cfg.fake_score_ttur


def _progress(total: int, desc: str, enabled: bool, initial: int = 0):
    from tqdm.auto import tqdm
    return tqdm(total=total, initial=initial, desc=desc, unit="it", disable=not enabled, dynamic_ncols=True)
