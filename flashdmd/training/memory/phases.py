"""The phases of a Stage-1 iteration and of an RL update, traced: each runs the run's own phase loss
(:mod:`flashdmd.training.steps`, :func:`flashdmd.training.stage2.rl_loss`) on the meta run, then its backward --
what the optimiser step (training/optim.py) does before it steps. Explicit student steps replace the run's random
draws: Flash-DMD's generator is traced at its last DM step (the no-grad backward simulation before it and the
finishing after it hold only transient memory, the same at every step) and its first GAN step; DMD2's at step 0;
the RL update at the first of ``rl_step_indices``."""
from __future__ import annotations

from contextlib import nullcontext

import torch

from flashdmd.training import stage2, steps
from flashdmd.training.memory.accounting import adamw_state_bytes, optimizer_step_bytes, stage, weights_by_role
from flashdmd.training.memory.trace import fused_attention, trace_phase


def _generator(run, cond, uncond):
    s = run.setup
    k = s.n_dm - 1 if s.cfg.method == "flashdmd" else 0
    out = steps.rollout(run, cond, uncond, with_grad=True, k=k, j=s.n_dm)
    out["loss"].backward()
    return [s.student, s.fake_score, s.disc], out  # DMD2's generator loss also reaches the fake score's weights


def _critics(run, x0_fake, cond):
    loss, _, _ = steps.critic_loss(run, x0_fake, cond)
    loss.backward()
    return [run.setup.fake_score, run.setup.disc], None


def _discriminator(run, x0_fake, cond):
    loss, _ = steps.discriminator_loss(run, x0_fake, cond)
    (run.setup.cfg.disc_weight * loss.mean()).backward()
    return [run.setup.disc], None


def _rl(run, cond):
    s = run.setup
    loss, _ = stage2.rl_loss(run, cond, ["a prompt"] * len(cond), k=s.cfg.rl_step_indices[0])
    loss.backward()
    return [s.student], None


def _traced(res, fn, *args):
    """trace_phase, and under model_offload the phase's use recorded (memory/residency.py): (peak, grads, out, use)."""
    with res.phase() if res is not None else nullcontext() as use:
        peak, grads, out = trace_phase(fn, *args)
    return peak, grads, out, use


def _phase(peak: int, grads: int, step_roles: tuple, trainable: dict, device: str, use=None, res=None) -> dict:
    step = sum(optimizer_step_bytes(trainable[r], device) for r in step_roles)
    p = {"traced_peak": peak, "gradients": grads, "optimizer_step": step, "roles": step_roles}
    if use is not None:  # model_offload: what the phase holds of the frozen parts (and, for base, of the blocks)
        p.update(use=use, resident=res.resident(use))
    return p


def _encode_phase(phases: dict, encode_peak: int, encode_use, res) -> None:
    """model_offload without a text cache: the prompts' encoding is a phase of its own (the text encoders on the
    device only there); with none it is counted in every phase, as before."""
    if res is not None and encode_use is not None:
        phases["encode"] = _phase(encode_peak, 0, (), {}, "meta", encode_use, res)
        phases["encode"]["roles"] = ("text_encoders",)


def _rollouts(run, cond, uncond, res) -> dict:
    """model_offload: the transfers of the no-grad rollout that the iterations without a generator update run, at the
    ends of the step draw -- linear in the step k (k backward-simulation steps, K-1-k finishing steps), so their mean
    is the draw's mean -- and the step the generator phase is traced at."""
    s = run.setup
    flash = s.cfg.method == "flashdmd"
    last = s.n_dm - 1 if flash else len(s.timesteps) - 1
    out = {}
    for k in sorted({0, last}):
        with res.phase() as use, fused_attention(), torch.no_grad():
            steps.rollout(run, cond, uncond, with_grad=False, k=k, j=s.n_dm)
        out[k] = res.transfer(use)
    return {"bytes": out, "generator_k": last if flash else 0}


def trace_stage1(run, roles: dict, cond, uncond, encode_peak: int, device: str, res=None, encode_use=None) -> dict:
    """Stage 1's counts (accounting.stage): weights, AdamW states and the three phases of an iteration; under
    model_offload (``res``: a residency.Residency) each phase's resident weights, the encoding's phase (``encode_use``:
    its recorded use, None with a text cache) and the rollout's transfers."""
    cfg = run.setup.cfg
    trainable = {"student": roles["student"], "fake_score": roles["fake_score"], "disc": roles["disc"]}
    peak, grads, out, use = _traced(res, _generator, run, cond, uncond)
    phases = {"generator": _phase(peak, grads, ("student",), trainable, device, use, res)}
    peak, grads, _, use = _traced(res, _critics, run, out["x0_fake_score"], cond)
    critics = ("fake_score", "disc") if cfg.disc_kind == "latent" else ("fake_score",)
    phases["fake_score"] = _phase(peak, grads, critics, trainable, device, use, res)
    if cfg.disc_kind == "pixel":
        peak, grads, _, use = _traced(res, _discriminator, run, out["x0_disc"], cond)
        phases["disc"] = _phase(peak, grads, ("disc",), trainable, device, use, res)
    _encode_phase(phases, encode_peak, encode_use, res)
    optimizer = {r: adamw_state_bytes(m, device) for r, m in trainable.items()}
    if res is None:
        return stage(weights_by_role(roles), optimizer, phases, encode_peak)
    return dict(stage(res.weights, optimizer, phases, encode_peak), rollouts=_rollouts(run, cond, uncond, res))


def trace_stage2(run, roles: dict, stage1: dict, cond, encode_peak: int, device: str, res=None,
                 encode_use=None) -> dict:
    """Stage 2's counts: the reference and reward model join the weights, the RL optimiser the states, one RL update
    the phases (``run`` has entered Stage 2: stage2.setup_stage2); ``res`` / ``encode_use`` as for Stage 1."""
    student = roles["student"]
    if res is not None:
        res.update(roles)
    peak, grads, _, use = _traced(res, _rl, run, cond)
    phases = {"rl": _phase(peak, grads, (), {}, device, use, res)}
    phases["rl"].update(optimizer_step=optimizer_step_bytes(student, device), roles=("student",))
    _encode_phase(phases, encode_peak, encode_use, res)
    optimizer = dict(stage1["optimizer"], rl=adamw_state_bytes(student, device))
    return stage(res.weights if res is not None else weights_by_role(roles), optimizer, phases, encode_peak)
