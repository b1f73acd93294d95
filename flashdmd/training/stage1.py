"""Stage 1: Flash-DMD timestep-aware distillation, and the DMD2 baseline, in one readable loop.

    for each iteration:
        prompts -> cond                                 (frozen text encoders)
        if iteration % TTUR == 0:   generator_step      (DM loss at high-noise steps, GAN at the low step;
                                                         DMD2: both at one random step)
                                    EMA pull of the fake score toward the student (Flash-DMD)
        else:                       rollout             (the same rollout without grad)
        fake_score_step                                 (diffusion loss only; DMD2 adds its latent GAN loss)
        discriminator_step                              (Pixel-GAN heads; real images vs decoded student x0)
        step the learning-rate schedules; count the iteration
        maybe_log / maybe_eval / maybe_sample / maybe_checkpoint   (per generator step)

The steps are in :mod:`flashdmd.training.steps`; Stage 2 (:mod:`flashdmd.training.stage2`) interleaves these
iterations with its RL updates.
"""
from __future__ import annotations

from tqdm.auto import tqdm

from flashdmd.training import preempt
from flashdmd.training.optim import step_schedulers
from flashdmd.training.steps import (discriminator_step, encode, fake_score_step, generator_step, null_cond, phase,
                                     rollout)


def distill_iteration(run, writer) -> bool:
    """One Stage-1 iteration; True when it updated the generator."""
    s, state = run.setup, run.state
    cfg = s.cfg
    prompts = s.prompts.sample(cfg.run_batch_size, state.rng)
    cond, uncond = encode(run, prompts), null_cond(run, cfg.run_batch_size)
    gen_now = state.iteration % cfg.fake_score_ttur == 0
    with s.accelerator.autocast():
        # phase 1: generator (every TTUR-th iteration), else a no-grad rollout for the critics
        if gen_now:
            out = generator_step(run, cond, uncond)
        else:
            with phase(run):
                out = rollout(run, cond, uncond, with_grad=False)
        # phase 2: critics -- fake score (diffusion loss only) and pixel discriminator
        logs = dict(out["logs"])
        logs.update(fake_score_step(run, out["x0_fake_score"], cond))
        if cfg.disc_kind == "pixel":
            logs.update(discriminator_step(run, out["x0_disc"], cond))
    writer.accumulate(logs)
    step_schedulers(state)
    state.after_iteration(generator_updated=gen_now)
    if gen_now:
        writer.bookkeeping(run)
    return gen_now


def run_stage1(run, writer, total: int, progress: bool, signalled=None) -> None:
    """Stage-1 iterations until ``total`` (or Stage 2 has begun: a resumed Stage-2 run skips this).
    ``signalled``: a :class:`flashdmd.training.preempt.Flag` checked after every iteration."""
    s, state = run.setup, run.state
    bar = progress_bar(total, "stage 1", progress and s.accelerator.is_main_process, initial=state.iteration)
    try:
        while state.stage == 1 and state.iteration < total:
            distill_iteration(run, writer)
            bar.update(1)
            bar.set_postfix(gen_step=state.generator_steps)
            preempt.stop_if_signalled(run, writer, signalled)
    finally:
        bar.close()


def progress_bar(total: int, desc: str, enabled: bool, initial: int = 0):
    return tqdm(total=total, initial=initial, desc=desc, unit="it", disable=not enabled, dynamic_ncols=True)
