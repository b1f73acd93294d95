"""The phases of a Stage-1 iteration and of an RL update, traced: each runs the run's own phase loss
(:mod:`flashdmd.training.steps`, :func:`flashdmd.training.stage2.rl_loss`) on the meta run, then its backward --
what the optimiser step (training/optim.py) does before it steps. Explicit student steps replace the run's random
draws: Flash-DMD's generator is traced at its last DM step (the no-grad backward simulation before it and the
finishing after it hold only transient memory, the same at every step) and its first GAN step; DMD2's at step 0;
the RL update at the first of ``rl_step_indices``."""
from __future__ import annotations

from flashdmd.training import stage2, steps
from flashdmd.training.memory.accounting import adamw_state_bytes, optimizer_step_bytes, stage, weights_by_role
from flashdmd.training.memory.trace import trace_phase


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


def _phase(peak: int, grads: int, step_roles: tuple, trainable: dict, device: str) -> dict:
    step = sum(optimizer_step_bytes(trainable[r], device) for r in step_roles)
    return {"traced_peak": peak, "gradients": grads, "optimizer_step": step, "roles": step_roles}


def trace_stage1(run, roles: dict, cond, uncond, encode_peak: int, device: str) -> dict:
    """Stage 1's counts (accounting.stage): weights, AdamW states and the three phases of an iteration."""
    cfg = run.setup.cfg
    trainable = {"student": roles["student"], "fake_score": roles["fake_score"], "disc": roles["disc"]}
    peak, grads, out = trace_phase(_generator, run, cond, uncond)
    phases = {"generator": _phase(peak, grads, ("student",), trainable, device)}
    peak, grads, _ = trace_phase(_critics, run, out["x0_fake_score"], cond)
    critics = ("fake_score", "disc") if cfg.disc_kind == "latent" else ("fake_score",)
    phases["fake_score"] = _phase(peak, grads, critics, trainable, device)
    if cfg.disc_kind == "pixel":
        peak, grads, _ = trace_phase(_discriminator, run, out["x0_disc"], cond)
        phases["disc"] = _phase(peak, grads, ("disc",), trainable, device)
    optimizer = {r: adamw_state_bytes(m, device) for r, m in trainable.items()}
    return stage(weights_by_role(roles), optimizer, phases, encode_peak)


def trace_stage2(run, roles: dict, stage1: dict, cond, encode_peak: int, device: str) -> dict:
    """Stage 2's counts: the reference and reward model join the weights, the RL optimiser the states, one RL update
    the phases (``run`` has entered Stage 2: stage2.setup_stage2)."""
    student = roles["student"]
    peak, grads, _ = trace_phase(_rl, run, cond)
    phases = {"rl": {"traced_peak": peak, "gradients": grads, "optimizer_step": optimizer_step_bytes(student, device),
                     "roles": ("student",)}}
    optimizer = dict(stage1["optimizer"], rl=adamw_state_bytes(student, device))
    return stage(weights_by_role(roles), optimizer, phases, encode_peak)
