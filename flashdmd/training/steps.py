"""The short steps the Stage-1 loop calls. Each takes the run context and tensors, computes one loss
from flashdmd.losses, and returns the detached quantities the loop logs.

Notation: timesteps[k] are the K student steps (high noise first); for Flash-DMD the first
``n_dm`` get the DM loss and the rest the GAN loss; for DMD2 every step gets both.
"""
from __future__ import annotations

import torch
from torch import Tensor

from flashdmd.diffusion import from_x0_eps
from flashdmd.diffusion.samplers import backward_simulate, renoise
from flashdmd.losses import d_loss, denoising_loss, dmd_loss, g_loss


def _t(t: float | Tensor, n: int, device) -> Tensor:
    if isinstance(t, Tensor):
        return t.to(device=device, dtype=torch.float32)
    return torch.full((n,), float(t), device=device, dtype=torch.float32)


def student_input(ctx, z: Tensor, k: int, cond) -> Tensor:
    """x_t at student step k: pure noise at k = 0, else backward simulation with the current student
    (no grad, fresh noise per re-noising) -- or, with backward simulation off, noised real latents."""
    fam = ctx.family
    if k == 0:
        return z
    if ctx.cfg.student_backward_simulation:
        return backward_simulate(fam.denoiser_fn(ctx.student, cond), z, ctx.timesteps, fam.schedule, k,
                                 generator=ctx.rng)
    real = ctx.real_latents(z.shape[0])
    noise = ctx.rng.randn_like(real)
    return fam.schedule.add_noise(real, noise, _t(ctx.timesteps[k], z.shape[0], z.device))


@torch.no_grad()
def finish_to_clean(ctx, x0: Tensor, k: int, cond) -> Tensor:
    """Detach(B(x_{t_k}, 0)): run the student's remaining steps k+1..K-1 from its x0 at step k."""
    fam = ctx.family
    for j in range(k + 1, len(ctx.timesteps)):
        x = renoise(x0, None, ctx.timesteps[j], fam.schedule, stochastic=True, generator=ctx.rng)
        x0, _ = fam.predict(ctx.student, x, _t(ctx.timesteps[j], x.shape[0], x.device), cond)
    return x0


def dm_loss_at(ctx, x0: Tensor, cond, uncond) -> Tensor:
    """Per-sample DM loss of the student's x0 (with graph): noise it at t ~ U[dm_t_min, dm_t_max] (inclusive) and
    compare the teacher with CFG against the fake score without CFG (both no grad)."""
    fam, cfg = ctx.family, ctx.cfg
    b = x0.shape[0]
    t = fam.schedule.timesteps_from_uniform(ctx.rng.rand(b, x0.device), cfg.dm_t_min, cfg.dm_t_max, inclusive=True,
                                            shifted=cfg.dm_t_shifted)
    noise = ctx.rng.randn_like(x0)
    x_t = fam.schedule.add_noise(x0.detach(), noise, t)
    with torch.no_grad():
        x0_real, _ = fam.predict(ctx.teacher, x_t, t.float(), cond, guidance_scale=cfg.dm_guidance_scale, uncond=uncond)
        x0_fake, _ = fam.predict(ctx.fake_score, x_t, t.float(), cond)
    return dmd_loss(x0, x0_real, x0_fake)


def gan_generator_loss(ctx, x0: Tensor, cond) -> Tensor:
    """Per-sample generator GAN loss of the student's x0 (with graph), by the configured discriminator."""
    cfg = ctx.cfg
    if cfg.disc_kind == "pixel":
        logits = ctx.disc(ctx.family.decode_latents(x0), disc_text(ctx, cond))
    else:  # DMD2: classifier on the fake score's bottleneck at a random noise level (diffusion-GAN)
        logits = latent_logits(ctx, x0, cond)
    return g_loss(logits, cfg.disc_loss)


def disc_text(ctx, cond) -> Tensor | None:
    """What a text-conditioned Pixel-GAN head takes with the pixels: the pooled text embedding; None otherwise."""
    return cond.pooled_embeds if ctx.cfg.disc_condition == "text" else None


def latent_logits(ctx, x0: Tensor, cond) -> Tensor:
    fam = ctx.family
    b = x0.shape[0]
    t = fam.schedule.timesteps_from_uniform(ctx.rng.rand(b, x0.device), 0.0, 1.0)
    noise = ctx.rng.randn_like(x0)
    feats, raw = fam.features(ctx.fake_score, fam.schedule.add_noise(x0, noise, t), t.float(), cond, return_output=True)
    # DMD2 reads only the bottleneck; the zero-weighted output gives the rest of the network a (zero) gradient,
    # which DDP requires of every parameter on the path to the output
    return ctx.disc(feats[-1]) + 0.0 * raw.mean()


def fake_score_loss(ctx, x0_fake: Tensor, cond) -> Tensor:
    """Diffusion loss of the fake score on detached student samples, t over the full range, no CFG."""
    fam, cfg = ctx.family, ctx.cfg
    b = x0_fake.shape[0]
    t = fam.schedule.timesteps_from_uniform(ctx.rng.rand(b, x0_fake.device), 0.0, 1.0)
    noise = ctx.rng.randn_like(x0_fake)
    x_t = fam.schedule.add_noise(x0_fake, noise, t)
    x0_pred, eps_pred = fam.predict(ctx.fake_score, x_t, t.float(), cond)
    if cfg.fake_score_target == "x0":
        return denoising_loss(x0_pred, x0_fake)
    a, s = fam.schedule.alpha_sigma(t)
    shape = (-1,) + (1,) * (x0_fake.ndim - 1)
    a, s = a.reshape(shape).to(x0_fake.dtype), s.reshape(shape).to(x0_fake.dtype)
    kind = fam.prediction_type
    return denoising_loss(from_x0_eps(x0_pred, eps_pred, kind, a, s), from_x0_eps(x0_fake, noise, kind, a, s))


def pixel_disc_loss(ctx, real_pixels: Tensor, x0_fake: Tensor, cond_real=None, cond=None) -> tuple[Tensor, float, float]:
    """(per-sample D loss, mean D(real) logit, mean D(fake) logit) on real images vs decoded student x0; a
    text-conditioned head judges each with its own conditioning (the real images' captions, the student's prompts)."""
    with torch.no_grad():
        fake_pixels = ctx.family.decode_latents(x0_fake)
    real_logits = ctx.disc(real_pixels, disc_text(ctx, cond_real) if cond_real is not None else None)
    fake_logits = ctx.disc(fake_pixels, disc_text(ctx, cond) if cond is not None else None)
    mean = lambda ls: float(sum(x.detach().float().mean() for x in ls) / len(ls))  # noqa: E731
    return d_loss(real_logits, fake_logits, ctx.cfg.disc_loss), mean(real_logits), mean(fake_logits)


def latent_disc_loss(ctx, real_latents: Tensor, cond_real, x0_fake: Tensor, cond) -> Tensor:
    """DMD2's classifier loss on noised real vs fake latents (each with its own captions), through the
    fake score's bottleneck -- so it also trains the fake score's features, as in DMD2."""
    return d_loss(latent_logits(ctx, real_latents, cond_real), latent_logits(ctx, x0_fake, cond),
                  ctx.cfg.disc_loss)
