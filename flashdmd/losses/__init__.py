"""Losses as pure functions of tensors. Each returns a per-sample tensor of shape (B,); the caller
reduces (usually ``.mean()``) and weights. No optimiser, I/O or config in here."""
from flashdmd.losses.diffusion import denoising_loss
from flashdmd.losses.dmd import dmd_gradient, dmd_loss
from flashdmd.losses.dpo import lcm_step_log_prob, step_dpo_loss, step_kl
from flashdmd.losses.gan import d_loss, g_loss

__all__ = ["denoising_loss", "dmd_gradient", "dmd_loss", "lcm_step_log_prob", "step_dpo_loss", "step_kl", "d_loss",
           "g_loss"]
