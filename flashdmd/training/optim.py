"""The optimisers of a run: one AdamW per role, the Stage-1 learning-rate factor, and the update with its guard.

* :func:`make_optimizers` -- one AdamW per trainable role, each prepared by accelerate with its module (DDP / FSDP2);
  :func:`make_schedulers` -- their learning-rate schedules (:func:`lr_factor`), stepped by :func:`step_schedulers`
  once per Stage-1 iteration and process of the first launch; :func:`rl_optimizer` -- Stage 2's own AdamW.
* :func:`optimise` -- backward, one joint clip, the optimiser step(s), every gradient freed; a non-finite loss or
  gradient norm skips the update (and stops the run after ``max_nonfinite_in_row`` in a row).
"""
from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor

from flashdmd import FlashDMDError
from flashdmd.families import network_call
from flashdmd.training.parallel import check_supported, clip_grad_norm_, prepare_role
from flashdmd.training.residency import place
from flashdmd.training.roles import trainable_parameters

STAGE1_SCHEDULERS = ("generator", "fake_score", "disc")


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


def adamw(params, lr: float, cfg) -> torch.optim.AdamW:
    return torch.optim.AdamW(params, lr=lr, betas=tuple(cfg.optim_betas), weight_decay=cfg.optim_weight_decay)


def make_optimizers(cfg, accelerator, student, fake_score, disc, off=None) -> tuple[tuple, dict]:
    """((student, fake score, discriminator) as prepared, {role: optimiser}). One AdamW per role. DMD2's latent
    classifier head gets its own optimiser with the fake score's lr, stepped together with the fake score's after
    one backward and one joint clip (AdamW is per parameter, so this is DMD2's single guidance optimiser exactly) --
    accelerate's FSDP shards one model per prepare call. ``off``: the run's offloading (model_offload), whose homed
    tensors stay on the CPU (accelerate then places nothing)."""
    check_supported(accelerator)
    for net in (student, fake_score, disc):
        place(off, net, accelerator.device)
    opt = {"generator": adamw(trainable_parameters(student), cfg.student_lr, cfg),
           "fake_score": adamw(trainable_parameters(fake_score), cfg.fake_score_lr, cfg)}
    if cfg.disc_kind == "pixel":
        opt["disc"] = adamw(list(disc.trainable_parameters()), cfg.disc_lr, cfg)
    elif cfg.disc_kind == "latent":
        opt["disc"] = adamw(list(disc.parameters()), cfg.fake_score_lr, cfg)
    # accelerate: DDP / FSDP wrapping across processes (a no-op in one process), one model with its optimiser
    placed = off is None
    student, (opt["generator"],) = prepare_role(accelerator, student, [opt["generator"]], placed)
    fake_score, (opt["fake_score"],) = prepare_role(accelerator, fake_score, [opt["fake_score"]], placed)
    if disc is not None:
        disc, (opt["disc"],) = prepare_role(accelerator, disc, [opt["disc"]], placed)
    return (student, fake_score, disc), opt


def make_schedulers(cfg, state) -> dict:
    """{role: LambdaLR} for the Stage-1 optimisers in ``state.opt``. Scheduler steps in Stage 1 are iterations x
    ``state.schedule_processes``, read at every step (a resume restores the first launch's count)."""
    def factor(step: int) -> float:
        total = cfg.run_max_steps * cfg.fake_score_ttur * state.schedule_processes
        return lr_factor(cfg.optim_warmup_steps, cfg.optim_lr_decay, total, cfg.optim_lr_final)(step)
    return {k: torch.optim.lr_scheduler.LambdaLR(o, factor) for k, o in state.opt.items()}


def step_schedulers(state) -> None:
    """After every Stage-1 iteration, each Stage-1 learning-rate schedule advances once per process, whether or not
    its role updated this iteration: DMD2 steps its generator and guidance schedulers every iteration (also when
    TTUR skips the generator) and accelerate's prepared scheduler steps ``num_processes`` times per call, so DMD2's
    500 warm-up steps on 64 GPUs last about 8 iterations. The process count is the first launch's
    (``state.schedule_processes``, kept in every checkpoint): a run resumed on another number of processes follows
    the same schedule per iteration."""
    for name in STAGE1_SCHEDULERS:
        if name in state.sched:
            for _ in range(state.schedule_processes):
                state.sched[name].step()


def rl_optimizer(cfg, accelerator, student) -> tuple:
    """(Stage 2's AdamW over the student's trainable weights, its constant schedule). The student is prepared
    already: accelerate only wraps the optimiser."""
    params = [p for p in student.parameters() if p.requires_grad]
    opt = accelerator.prepare(adamw(params, cfg.rl_lr or cfg.student_lr, cfg))
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)


def optimise(run, roles: str | tuple[str, ...], loss: Tensor, params) -> float:
    """Backward, clip ``params`` jointly, step the optimiser(s) of ``roles``, then free every gradient (also those
    the backward left on other roles: DMD2's generator loss reaches the fake score's weights), so that no phase
    carries the previous phase's gradients (what `flashdmd plan` assumes). A non-finite loss or gradient norm
    skips the update with a warning; after ``max_nonfinite_in_row`` in a row for this role the run stops with a
    clear error. Returns the gradient norm (nan when skipped)."""
    state, cfg = run.state, run.setup.cfg
    roles = (roles,) if isinstance(roles, str) else roles
    role = roles[0]
    for r in roles:
        state.opt[r].zero_grad(set_to_none=True)
    with network_call(f"{role} update (backward)", None, loss):
        run.setup.accelerator.backward(loss)
    norm = clip_grad_norm_(params, cfg.optim_grad_clip)
    finite = bool(torch.isfinite(loss) and torch.isfinite(norm))
    if finite:
        for r in roles:
            state.opt[r].step()
    for opt in state.opt.values():
        opt.zero_grad(set_to_none=True)
    if finite:
        state.nonfinite[role] = 0
        return float(norm)
    n = state.nonfinite[role] = state.nonfinite.get(role, 0) + 1
    what = "loss" if not torch.isfinite(loss) else "gradient"
    warnings.warn(f"{role}: non-finite {what} at step {state.global_step}; update skipped ({n} in a row)", stacklevel=2)
    if n >= cfg.run_max_nonfinite_in_row:
        raise FlashDMDError(f"{role}: {n} non-finite updates in a row at step {state.global_step}; lower the learning "
                            f"rates or check the data (last good checkpoint: {state.last_checkpoint or 'none'})")
    return float("nan")
