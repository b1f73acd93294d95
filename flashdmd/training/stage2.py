"""Stage 2: joint reinforcement learning -- step-level DPO at the high-noise student steps, scored by a
latent reward model (LRM), alternating with continued Stage-1 distillation.

One RL update (``rl_step``):
    k ~ rl_step_indices (high-noise steps; paper 999, 749)   x_t = backward simulation to step k
    x0 = student(x_t)  (no grad)        K candidates  x'_i = alpha' x0 + sigma' n_i   (LCM step, fresh n_i)
    LRM scores the K noisy candidates at t' -> winner x_w (best), loser x_l (worst)
    H = [log p_theta(x_w) - log p_ref(x_w)] - [log p_theta(x_l) - log p_ref(x_l)],  L = -log sigmoid(beta H)
with p(x' | x_t) = N(alpha' x0_model(x_t), sigma'^2 I) and the reference = the student frozen at the start of
Stage 2. Every ``rl_distill_ratio`` RL updates one Stage-1 cycle runs (a generator update and its TTUR critic
updates): the ongoing distillation is the regulariser against reward hacking. ``rl_kl_weight`` adds the
alternative one, an explicit KL penalty to the reference: L += rl_kl_weight * beta * KL(p_theta(. | x_t) || p_ref).

The loop (:func:`run_stage2`) reads top to bottom: the Stage-1 cycles owed, then one RL update, its bookkeeping.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from flashdmd import FlashDMDError
from flashdmd.families import Conditioning, name_part
from flashdmd.families.base import unwrap
from flashdmd.losses import lcm_step_log_prob, step_dpo_loss, step_kl
from flashdmd.training import preempt, steps
from flashdmd.training.optim import optimise, rl_optimizer
from flashdmd.training.parallel import is_sharded, replica
from flashdmd.training.reward_model import (JudgeReward, load_reward_model, resolve_reward_model,  # noqa: F401
                                            reward_model)  # (the first three re-exported: their home until now)
from flashdmd.training.roles import copy_sharing_frozen
from flashdmd.training.stage1 import distill_iteration, progress_bar


# ---------------------------------------------------------------------------------------------------
# entering Stage 2


def check_step_indices(cfg, timesteps) -> None:
    K = len(timesteps)
    bad = [i for i in cfg.rl_step_indices if i + 1 >= K]
    if bad:
        raise FlashDMDError(f"config: rl_step_indices {bad} have no next student step (K = {K}); use indices < {K - 1}")


def reference_policy(run) -> nn.Module:
    """The frozen reference: a plain copy of the student on every rank (under FSDP gathered from the shards); under
    LoRA the copy shares the student's frozen base (the teacher's): only the adapters are copied."""
    s = run.setup
    if s.accelerator is None:  # `flashdmd plan`: no processes, the student is unwrapped
        ref = unwrap(s.student)
    else:
        ref = replica(s, s.student, all_ranks=True)
    ref = (ref if is_sharded(s.student) else copy_sharing_frozen(ref)).requires_grad_(False).eval()
    return name_part(ref, "Stage-2 reference")


def setup_stage2(run, judge=None) -> None:
    """Freeze the reference policy, load the reward model (both join the set-up), give RL its own optimiser state.
    Entering Stage 2 from Stage 1 (:func:`enter`) or before a Stage-2 checkpoint is restored into the run.
    ``judge``: an already built ``rl_judge`` (`flashdmd plan`'s on the meta device, where there is no accelerator and
    the plan counts the RL optimiser's state itself)."""
    s = run.setup
    check_step_indices(s.cfg, s.timesteps)
    run.setup = dataclasses.replace(s, reference=reference_policy(run))
    run.setup = dataclasses.replace(run.setup, reward=reward_model(run, judge))
    if s.accelerator is not None:
        run.state.opt["rl"], run.state.sched["rl"] = rl_optimizer(s.cfg, s.accelerator, s.student)
    if s.offload is not None:
        s.offload.release()   # model_offload: what loading the reward model used goes back


def enter(run, writer) -> None:
    """Enter Stage 2 after Stage 1: start from the Stage-1 student as evaluated (its EMA, ``rl_from_ema``), freeze
    the reference, load the reward model, evaluate the Stage-1 student as the guard's baseline."""
    s, state = run.setup, run.state
    if state.student_ema is not None and s.cfg.rl_from_ema:
        state.student_ema.copy_to(s.accelerator.unwrap_model(s.student))
    setup_stage2(run)
    state.stage = 2
    state.stage2_start_iteration = state.iteration
    writer.start_stage2(run)


# ---------------------------------------------------------------------------------------------------
# one RL update


@torch.no_grad()
def candidates(run, x0, k: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n LCM-step candidates of the next latent (n, B, C, h, w) and the next timestep (B,)."""
    b = x0.shape[0]
    t_next = run.setup.t(k + 1, b)
    a, s = run.setup.family.schedule.alpha_sigma(t_next)
    shape = (-1,) + (1,) * (x0.ndim - 1)
    noise = torch.stack([run.state.rng.randn_like(x0) for _ in range(n)])
    return a.reshape(shape).to(x0.dtype) * x0 + s.reshape(shape).to(x0.dtype) * noise, t_next


@torch.no_grad()
def pick_pair(scores: torch.Tensor, cands: torch.Tensor):
    """scores (n, B), cands (n, B, ...) -> (winner, loser) (B, ...), best and worst per sample."""
    idx = torch.arange(scores.shape[1], device=scores.device)
    return cands[scores.argmax(0), idx], cands[scores.argmin(0), idx]


def _scores(run, cands, t, t_next, cond, prompts) -> torch.Tensor:
    """The reward of each candidate, (n, B): flashdmd's LRM and the judges score x_{t'} at t' (what they were
    trained on), LPO's LRM at the step's own t, as LPO does."""
    reward, n = run.setup.reward, run.setup.cfg.rl_num_candidates
    b = cands.shape[1]
    t_score = t if getattr(reward, "scores_at", "next") == "current" else t_next
    extra = {}
    if getattr(reward, "needs_prompts", False):
        if prompts is None:
            raise FlashDMDError(f"{type(reward).__name__} scores against the prompts: pass them to rl_step")
        extra["prompts"] = list(prompts) * n
    scores = reward.score(cands.flatten(0, 1), t_score.repeat(n), Conditioning.cat([cond] * n), **extra)
    return scores.reshape(n, b)


def rl_loss(run, cond, prompts: list[str] | None = None, k: int | None = None) -> tuple[torch.Tensor, dict]:
    """(the RL update's loss, its logs as detached tensors) on a batch of conditionings (and their prompts, which a
    reward model with its own text encoders -- LPO's -- or a judge needs). ``k``: the student step, drawn from
    ``rl_step_indices`` unless given."""
    s = run.setup
    cfg, fam = s.cfg, s.family
    b = len(cond)
    draw = cfg.rl_step_indices[run.state.rng.shared_randrange(len(cfg.rl_step_indices))]
    k = draw if k is None else k
    z = steps.randn(run, (b,) + tuple(fam.latent_shape(s.resolution, s.resolution)))
    x_t = steps.student_input(run, z, k, cond)
    t = s.t(k, b)
    with torch.no_grad():
        x0 = fam.predict(s.student, x_t, t, cond)[0]
        cands, t_next = candidates(run, x0, k, cfg.rl_num_candidates)
        scores = _scores(run, cands, t, t_next, cond, prompts)
        x_w, x_l = pick_pair(scores, cands)
        x0_ref = fam.predict(s.reference, x_t, t, cond)[0]
    x0_pol = fam.predict(s.student, x_t, t, cond)[0]
    a, sig = fam.schedule.alpha_sigma(t_next)
    dpo = step_dpo_loss(lcm_step_log_prob(x_w, x0_pol, a, sig), lcm_step_log_prob(x_w, x0_ref, a, sig),
                        lcm_step_log_prob(x_l, x0_pol, a, sig), lcm_step_log_prob(x_l, x0_ref, a, sig),
                        cfg.rl_beta, cfg.rl_ratio_clip).mean()
    kl = step_kl(x0_pol, x0_ref, a, sig).mean()   # logged always: how far RL has moved the policy at this state
    loss = dpo + cfg.rl_kl_weight * cfg.rl_beta * kl if cfg.rl_kl_weight > 0 else dpo
    logs = {"rl/loss": loss.detach(), "rl/lrm_score": scores.mean(),
            "rl/lrm_margin": (scores.max(0).values - scores.min(0).values).mean(), "rl/kl": kl.detach(),
            "rl/dpo": dpo.detach(), f"rl/loss_t{int(round(s.timesteps[k]))}": loss.detach()}
    return loss, logs


def rl_step(run, cond, prompts: list[str] | None = None) -> dict:
    """One RL update; returns the scalars to log."""
    with steps.phase(run):
        loss, logs = rl_loss(run, cond, prompts)
        params = [p for g in run.state.opt["rl"].param_groups for p in g["params"]]
        norm = optimise(run, "rl", loss, params)
    steps.after_student_update(run)
    return {**{k: float(v) for k, v in logs.items()}, "grad_norm/rl": float(norm)}


# ---------------------------------------------------------------------------------------------------
# the loop


def iterations_due(run) -> int:
    """The Stage-1 iterations a Stage-2 run has made once the distillation cycles of its RL updates so far are
    done: one cycle of ``fake_score_ttur`` iterations per ``rl_distill_ratio`` RL updates."""
    cfg, state = run.setup.cfg, run.state
    cycles = state.rl_steps // cfg.rl_distill_ratio if cfg.rl_distill_ratio else 0
    return state.stage2_start_iteration + cycles * cfg.fake_score_ttur


def run_stage2(run, writer, progress: bool, signalled=None) -> None:
    """RL updates, with one Stage-1 distillation cycle (one generator update and its TTUR critic updates)
    after every ``rl_distill_ratio`` of them. ``signalled``: a :class:`flashdmd.training.preempt.Flag` checked
    after every RL update and every iteration of a cycle. The cycles owed are counted from the iterations (see
    :func:`iterations_due`), so a checkpoint written anywhere -- after an RL update that a cycle follows,
    inside a cycle -- resumes exactly where it was."""
    s, state = run.setup, run.state
    cfg = s.cfg
    bar = progress_bar(cfg.rl_steps, "stage 2", progress and s.accelerator.is_main_process, initial=state.rl_steps)
    try:
        while True:
            while state.iteration < iterations_due(run):  # Stage 1 ended on a cycle boundary: G updates first
                distill_iteration(run, writer)
                preempt.stop_if_signalled(run, writer, signalled)
            if state.rl_steps >= cfg.rl_steps:
                break
            prompts = s.prompts.sample(cfg.run_batch_size, state.rng)
            with s.accelerator.autocast():
                logs = rl_step(run, steps.encode(run, prompts), prompts)
            writer.accumulate(logs)
            state.after_rl_update()
            writer.bookkeeping(run)
            bar.update(1)
            preempt.stop_if_signalled(run, writer, signalled)
    finally:
        bar.close()
