"""The steps of a Stage-1 iteration, each on a :class:`flashdmd.training.state.Run` and tensors.

Three layers, top to bottom:

* the steps the loop calls -- :func:`generator_step`, :func:`fake_score_step`, :func:`discriminator_step`: a phase's
  loss, then the optimiser update (:func:`flashdmd.training.optim.optimise`); they return the scalars to log;
* the phases' losses -- :func:`rollout`, :func:`critic_loss`, :func:`discriminator_loss`: what a phase
  differentiates, with its logs as detached tensors. `flashdmd plan` traces these very functions on meta tensors
  (``k`` / ``j``: explicit student steps instead of the run's random draws);
* the losses' parts -- backward simulation (:func:`student_input`), :func:`finish_to_clean`, the DM loss, the GAN
  losses, the fake score's denoising loss -- each computing one loss from :mod:`flashdmd.losses`.

Notation: timesteps[k] are the K student steps (high noise first); for Flash-DMD the first ``n_dm`` get the DM
loss and the rest the GAN loss; for DMD2 every step gets both.
"""
from __future__ import annotations

import torch
from torch import Tensor

from flashdmd import FlashDMDError
from flashdmd.diffusion import from_x0_eps
from flashdmd.diffusion.samplers import backward_simulate, renoise
from flashdmd.losses import d_loss, denoising_loss, dmd_loss, g_loss
from flashdmd.training.ema import ema_pull_
from flashdmd.training.optim import optimise
from flashdmd.training import residency
from flashdmd.training.parallel import reshard
from flashdmd.training.roles import trainable_parameters


# ---------------------------------------------------------------------------------------------------
# inputs


def phase(run):
    """One phase's context: the frozen parts it onloads go back to the CPU at its end (model_offload; else a no-op)."""
    return residency.phase(run.setup.offload)


def encode(run, prompts: list[str]):
    """The prompts' conditioning at the run's resolution (its own phase: offloaded text encoders leave after it)."""
    res = run.setup.resolution
    with phase(run):
        return run.setup.family.encode_prompts(prompts, res, res)


def null_cond(run, n: int):
    res = run.setup.resolution
    with phase(run):
        return run.setup.family.null_conditioning(n, res, res)


def randn(run, shape) -> Tensor:
    """Standard normal latents from the run's draws, in the run's dtype on its device."""
    return run.state.rng.randn(shape, run.setup.device, run.setup.family.dtype)


def real_batch(run, n: int) -> tuple[Tensor, list]:
    """The next real images (n, 3, R, R) in the run's dtype on its device, and their captions."""
    pixels, captions = run.setup.real.next_batch()
    if pixels.shape[0] != n:
        raise FlashDMDError(f"real-image batch of {pixels.shape[0]} for a batch of {n}")
    return pixels.to(run.setup.device, run.setup.family.dtype), captions


def real_latents(run, n: int) -> Tensor:
    pixels, _ = real_batch(run, n)
    with torch.no_grad():
        return run.setup.family.encode_images(pixels)


def caption_cond(run, captions: list):
    """The real images' conditioning: their captions where every image has one (DMD2 conditions the real branch
    of its classifier on the image's caption), else the null conditioning."""
    if all(c is not None for c in captions):
        return encode(run, list(captions))
    return null_cond(run, len(captions))


def _t(t: float | Tensor, n: int, device) -> Tensor:
    if isinstance(t, Tensor):
        return t.to(device=device, dtype=torch.float32)
    return torch.full((n,), float(t), device=device, dtype=torch.float32)


# ---------------------------------------------------------------------------------------------------
# the losses' parts


def student_input(run, z: Tensor, k: int, cond) -> Tensor:
    """x_t at student step k: pure noise at k = 0, else backward simulation with the current student
    (no grad, fresh noise per re-noising) -- or, with backward simulation off, noised real latents."""
    s, rng = run.setup, run.state.rng
    fam = s.family
    if k == 0:
        return z
    if s.cfg.student_backward_simulation:
        return backward_simulate(fam.denoiser_fn(s.student, cond), z, s.timesteps, fam.schedule, k, generator=rng)
    real = real_latents(run, z.shape[0])
    noise = rng.randn_like(real)
    return fam.schedule.add_noise(real, noise, _t(s.timesteps[k], z.shape[0], z.device))


@torch.no_grad()
def finish_to_clean(run, x0: Tensor, k: int, cond) -> Tensor:
    """Detach(B(x_{t_k}, 0)): run the student's remaining steps k+1..K-1 from its x0 at step k."""
    s = run.setup
    fam = s.family
    for j in range(k + 1, len(s.timesteps)):
        x = renoise(x0, None, s.timesteps[j], fam.schedule, stochastic=True, generator=run.state.rng)
        x0, _ = fam.predict(s.student, x, _t(s.timesteps[j], x.shape[0], x.device), cond)
    return x0


def dm_loss_at(run, x0: Tensor, cond, uncond) -> Tensor:
    """Per-sample DM loss of the student's x0 (with graph): noise it at t ~ U[dm_t_min, dm_t_max] (inclusive) and
    compare the teacher with CFG against the fake score without CFG (both no grad)."""
    s, rng = run.setup, run.state.rng
    fam, cfg = s.family, s.cfg
    b = x0.shape[0]
    t = fam.schedule.timesteps_from_uniform(rng.rand(b, x0.device), cfg.dm_t_min, cfg.dm_t_max, inclusive=True,
                                            shifted=cfg.dm_t_shifted)
    noise = rng.randn_like(x0)
    x_t = fam.schedule.add_noise(x0.detach(), noise, t)
    with torch.no_grad():
        x0_real, _ = fam.predict(s.teacher, x_t, t.float(), cond, guidance_scale=cfg.dm_guidance_scale, uncond=uncond)
        x0_fake, _ = fam.predict(s.fake_score, x_t, t.float(), cond)
    return dmd_loss(x0, x0_real, x0_fake)


def gan_generator_loss(run, x0: Tensor, cond) -> Tensor:
    """Per-sample generator GAN loss of the student's x0 (with graph), by the configured discriminator."""
    s = run.setup
    if s.cfg.disc_kind == "pixel":
        logits = s.disc(s.family.decode_latents(x0), disc_text(run, cond))
    else:  # DMD2: classifier on the fake score's bottleneck at a random noise level (diffusion-GAN)
        logits = latent_logits(run, x0, cond)
    return g_loss(logits, s.cfg.disc_loss)


def disc_text(run, cond) -> Tensor | None:
    """What a text-conditioned Pixel-GAN head takes with the pixels: the pooled text embedding; None otherwise."""
    return cond.pooled_embeds if run.setup.cfg.disc_condition == "text" else None


def latent_logits(run, x0: Tensor, cond) -> Tensor:
    s, rng = run.setup, run.state.rng
    fam = s.family
    b = x0.shape[0]
    t = fam.schedule.timesteps_from_uniform(rng.rand(b, x0.device), 0.0, 1.0)
    noise = rng.randn_like(x0)
    feats, raw = fam.features(s.fake_score, fam.schedule.add_noise(x0, noise, t), t.float(), cond, return_output=True)
    # DMD2 reads only the bottleneck; the zero-weighted output gives the rest of the network a (zero) gradient,
    # which DDP requires of every parameter on the path to the output
    return s.disc(feats[-1]) + 0.0 * raw.mean()


def fake_score_loss(run, x0_fake: Tensor, cond) -> Tensor:
    """Diffusion loss of the fake score on detached student samples, t over the full range, no CFG."""
    s, rng = run.setup, run.state.rng
    fam, cfg = s.family, s.cfg
    b = x0_fake.shape[0]
    t = fam.schedule.timesteps_from_uniform(rng.rand(b, x0_fake.device), 0.0, 1.0)
    noise = rng.randn_like(x0_fake)
    x_t = fam.schedule.add_noise(x0_fake, noise, t)
    x0_pred, eps_pred = fam.predict(s.fake_score, x_t, t.float(), cond)
    if cfg.fake_score_target == "x0":
        return denoising_loss(x0_pred, x0_fake)
    a, sig = fam.schedule.alpha_sigma(t)
    shape = (-1,) + (1,) * (x0_fake.ndim - 1)
    a, sig = a.reshape(shape).to(x0_fake.dtype), sig.reshape(shape).to(x0_fake.dtype)
    kind = fam.prediction_type
    return denoising_loss(from_x0_eps(x0_pred, eps_pred, kind, a, sig), from_x0_eps(x0_fake, noise, kind, a, sig))


def pixel_disc_loss(run, real_pixels: Tensor, x0_fake: Tensor, cond_real=None,
                    cond=None) -> tuple[Tensor, Tensor, Tensor]:
    """(per-sample D loss, mean D(real) logit, mean D(fake) logit -- both detached) on real images vs decoded
    student x0; a text-conditioned head judges each with its own conditioning (the real images' captions, the
    student's prompts)."""
    s = run.setup
    with torch.no_grad():
        fake_pixels = s.family.decode_latents(x0_fake)
    real_logits = s.disc(real_pixels, disc_text(run, cond_real) if cond_real is not None else None)
    fake_logits = s.disc(fake_pixels, disc_text(run, cond) if cond is not None else None)
    mean = lambda ls: sum(x.detach().float().mean() for x in ls) / len(ls)  # noqa: E731
    return d_loss(real_logits, fake_logits, s.cfg.disc_loss), mean(real_logits), mean(fake_logits)


def latent_disc_loss(run, real_lat: Tensor, cond_real, x0_fake: Tensor, cond) -> Tensor:
    """DMD2's classifier loss on noised real vs fake latents (each with its own captions), through the
    fake score's bottleneck -- so it also trains the fake score's features, as in DMD2."""
    return d_loss(latent_logits(run, real_lat, cond_real), latent_logits(run, x0_fake, cond), run.setup.cfg.disc_loss)


# ---------------------------------------------------------------------------------------------------
# the phases' losses


def rollout(run, cond, uncond, with_grad: bool, k: int | None = None, j: int | None = None) -> dict:
    """One student rollout for this iteration; with_grad adds the generator losses.

    Returns detached ``x0_fake_score`` (what the fake score learns from), ``x0_disc`` (what the discriminator sees
    as fake), ``loss`` (with grad: the generator's) and ``logs`` (detached scalars). ``k`` (the high-noise step) and
    ``j`` (Flash-DMD's low-noise GAN step) are the run's random draws unless given (drawn either way, so that the
    run's sequence of draws does not depend on them)."""
    s, rng = run.setup, run.state.rng
    cfg, fam = s.cfg, s.family
    b = len(cond)
    flash = cfg.method == "flashdmd"
    draw_k = rng.shared_randrange(s.n_dm if flash else len(s.timesteps))
    k = draw_k if k is None else k
    z = randn(run, (b,) + tuple(fam.latent_shape(s.resolution, s.resolution)))
    x_t = student_input(run, z, k, cond)
    logs = {}
    with torch.set_grad_enabled(with_grad):
        x0 = fam.predict(s.student, x_t, s.t(k, b), cond)[0]
        loss = torch.zeros((), device=x0.device)
        if with_grad:
            dm = dm_loss_at(run, x0, cond, uncond).mean()
            loss = loss + cfg.dm_weight * dm
            logs[f"dm_loss/t{int(round(s.timesteps[k]))}"] = dm.detach()
        x0_disc, k_gan = x0, k
        if flash and s.disc is not None and s.n_dm < len(s.timesteps):
            draw_j = s.n_dm + rng.shared_randrange(len(s.timesteps) - s.n_dm)
            k_gan = draw_j if j is None else j
            x0_clean = finish_to_clean(run, x0.detach(), k, cond)
            x_lo = renoise(x0_clean, None, s.timesteps[k_gan], fam.schedule, stochastic=True, generator=rng)
            x0_disc = fam.predict(s.student, x_lo, s.t(k_gan, b), cond)[0]
        if with_grad and s.disc is not None:
            adv = gan_generator_loss(run, x0_disc, cond).mean()
            loss = loss + cfg.disc_gen_weight * adv
            logs[f"gan_g_loss/t{int(round(s.timesteps[k_gan]))}"] = adv.detach()
    return {"x0_fake_score": x0.detach(), "x0_disc": x0_disc.detach(), "loss": loss, "logs": logs}


def critic_loss(run, x0_fake: Tensor, cond) -> tuple[Tensor, dict, tuple[str, ...]]:
    """(the critics' loss, its logs, the roles it updates): the fake score's diffusion loss on the student's samples;
    DMD2 adds its latent classifier's loss on this iteration's real images (updating fake score and head)."""
    s = run.setup
    loss = fake_score_loss(run, x0_fake, cond).mean()
    logs = {"loss/fake_score": loss.detach()}
    if s.cfg.disc_kind != "latent":
        return loss, logs, ("fake_score",)
    real, captions = real_batch(run, len(cond))
    cond_real = caption_cond(run, captions)
    with torch.no_grad():
        real_lat = s.family.encode_images(real)
    d = latent_disc_loss(run, real_lat, cond_real, x0_fake, cond).mean()
    logs["loss/disc"] = d.detach()
    return loss + s.cfg.disc_weight * d, logs, ("fake_score", "disc")


def discriminator_loss(run, x0_fake: Tensor, cond) -> tuple[Tensor, dict]:
    """(the Pixel-GAN heads' per-sample loss, its logs) on this iteration's real images vs the student's x0."""
    s = run.setup
    real, captions = real_batch(run, x0_fake.shape[0])
    if s.cfg.disc_condition == "text":
        if any(c is None for c in captions):
            raise FlashDMDError("disc_condition: text judges real images with their captions, and a real batch has "
                                "images without one: give every image in data_real a caption, or set disc_condition: none")
        loss, d_real, d_fake = pixel_disc_loss(run, real, x0_fake, encode(run, list(captions)), cond)
    else:
        loss, d_real, d_fake = pixel_disc_loss(run, real, x0_fake)
    return loss, {"disc/D_real": d_real, "disc/D_fake": d_fake}


# ---------------------------------------------------------------------------------------------------
# the steps the loop calls


def _floats(logs: dict) -> dict:
    return {k: float(v) for k, v in logs.items()}


def after_student_update(run) -> None:
    """After every generator or RL update: the student's EMA (when enabled)."""
    ema = run.state.student_ema
    if ema is not None:
        reshard(run.setup.student)
        ema.update(run.setup.accelerator.unwrap_model(run.setup.student))


def generator_step(run, cond, uncond) -> dict:
    """The generator's update (then, for Flash-DMD, the fake score's EMA pull toward the student)."""
    s = run.setup
    with phase(run):
        out = rollout(run, cond, uncond, with_grad=True)
        norm = optimise(run, "generator", out["loss"], trainable_parameters(s.student))
    out["logs"] = _floats(out["logs"])
    out["logs"]["grad_norm/generator"] = norm
    out["logs"]["loss/generator"] = out["loss"].item()
    after_student_update(run)
    if s.cfg.fake_score_ema > 0:
        reshard(s.student, s.fake_score)  # FSDP2: both as matching shards (no-op otherwise)
        ema_pull_(s.accelerator.unwrap_model(s.fake_score), s.accelerator.unwrap_model(s.student), s.cfg.fake_score_ema)
    return out


def fake_score_step(run, x0_fake: Tensor, cond) -> dict:
    with phase(run):
        loss, logs, roles = critic_loss(run, x0_fake, cond)
        params = [p for r in roles for g in run.state.opt[r].param_groups for p in g["params"]]
        norm = optimise(run, roles, loss, params)
    logs = _floats(logs)
    logs["grad_norm/fake_score"] = norm
    return logs


def discriminator_step(run, x0_fake: Tensor, cond) -> dict:
    with phase(run):
        loss, logs = discriminator_loss(run, x0_fake, cond)
        heads = [p for g in run.state.opt["disc"].param_groups for p in g["params"]]
        norm = optimise(run, "disc", run.setup.cfg.disc_weight * loss.mean(), heads)
    return {"loss/disc": loss.mean().item(), "grad_norm/disc": norm, **_floats(logs)}
