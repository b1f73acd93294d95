"""Scheduler configs that make a plain diffusers pipeline run flashdmd's few-step student sampler.

The sampler (:func:`flashdmd.diffusion.samplers.trajectory` with fresh noise): at each student timestep t_k the
network predicts x0, then x_{k+1} = alpha(t_{k+1}) x0 + sigma(t_{k+1}) n_k with fresh n_k ~ N(0, I); the last x0 is
returned.

- SDXL: diffusers' ``LCMScheduler``. Its LCM timestep grid with ``original_inference_steps = n`` and
  ``num_inference_steps = K`` is searched for an ``n`` that gives exactly the run's student timesteps (n = K for the
  default [999, 749, 499, 249]). The consistency boundary condition ``denoised = c_out * x0 + c_skip * x_t`` is
  switched off by a huge ``timestep_scaling`` (1e6): with t*1e6 >= 1e6, float32 rounds c_out to exactly 1 and
  c_skip <= 2.5e-13, so ``denoised`` is x0.
- SD3: diffusers' ``FlowMatchLCMScheduler`` (x0 = x - sigma u; x' = (1 - sigma') x0 + sigma' n). Its default K-step
  sigmas are ``T(linspace(1, 1/N, K))`` where T is a time shift followed by the optional terminal stretch; both are
  Moebius maps fixing sigma = 1, so the SD3-shifted uniform student sigmas (shift_S(1, 1-1/K, ...)) are hit exactly
  by ``use_dynamic_shifting`` with ``base_shift = max_shift = ln c`` (so mu = ln c at every resolution) and
  ``shift_terminal`` = the last student sigma, for the c solved in :func:`flow_lcm_fit`. For [1000, 900, 750, 500]:
  c = 2.002004..., shift_terminal = 0.5 -- the float32 timesteps equal the run's exactly.
- FLUX: the same FlowMatchLCMScheduler fit, on the grid FluxPipeline hands its scheduler (sigmas linspace(1, 1/K,
  K), with mu from base_shift == max_shift).

Which one a family gets is its class's ``export_scheduler`` / ``pipeline_sigma_grid``. Timesteps a scheduler config
cannot produce by itself are passed per call instead (SDXL ``timesteps=``, SD3 ``sigmas=``).
"""
from __future__ import annotations

import math

import numpy as np
from diffusers import FlowMatchLCMScheduler, LCMScheduler

from flashdmd import FlashDMDError
from flashdmd.families import FAMILIES

LCM_TIMESTEP_SCALING = 1e6
TIMESTEP_TOLERANCE = 1e-3   # model-timestep units; a config is only used when it reproduces the steps this well


def _timesteps_error(actual, target) -> float:
    if len(actual) != len(target):
        return math.inf
    return max(abs(float(a) - float(b)) for a, b in zip(actual, target))


def lcm_scheduler(teacher_config: dict, timesteps: list[float]):
    """(LCMScheduler, pipeline call kwargs, max |timestep error|) for SDXL student ``timesteps``."""
    if any(float(t) != int(t) for t in timesteps):
        raise FlashDMDError(f"student timesteps {timesteps} are not integers; diffusers' LCMScheduler (and the SDXL "
                            "UNet pipeline) only run integer timesteps")
    target = [int(t) for t in timesteps]
    n_train = int(teacher_config.get("num_train_timesteps", 1000))
    if target[0] >= n_train or target[-1] < 0:
        raise FlashDMDError(f"student timesteps {target} are outside 0..{n_train - 1}")
    base = {k: teacher_config[k] for k in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule",
                                           "prediction_type", "trained_betas") if k in teacher_config}
    base.update(timestep_scaling=LCM_TIMESTEP_SCALING, clip_sample=False, thresholding=False,
                rescale_betas_zero_snr=False, set_alpha_to_one=True, steps_offset=0)
    k = len(target)
    probe = LCMScheduler(**base)
    for n in range(k, n_train + 1):
        try:
            probe.set_timesteps(k, original_inference_steps=n)
        except ValueError:
            continue
        if probe.timesteps.tolist() == target:
            return LCMScheduler(**base, original_inference_steps=n), {"num_inference_steps": k}, 0.0
    # no LCM grid holds these steps: the pipeline's custom `timesteps=` argument runs them exactly
    sched = LCMScheduler(**base, original_inference_steps=k)
    sched.set_timesteps(timesteps=target)
    return sched, {"timesteps": target}, _timesteps_error(sched.timesteps.tolist(), target)


def flow_lcm_fit(target_sigmas: list[float], sigma_min: float) -> tuple[float, float | None] | None:
    """(c, shift_terminal) such that FlowMatchLCMScheduler(use_dynamic_shifting, mu = ln c, shift_terminal)
    gives ``target_sigmas`` from its default grid u = linspace(1, sigma_min, K); None if no such pair.

    sigma(u) = A(T_c(u)) with T_c(u) = c u / (1 + (c-1) u) and A the terminal stretch (affine, fixes 1,
    A(T_c(sigma_min)) = shift_terminal). Fit c on the second step; the caller verifies every step.
    """
    k = len(target_sigmas)
    if k == 0 or abs(target_sigmas[0] - 1.0) > 1e-9:
        return None
    if k == 1:
        return 1.0, None
    st = float(target_sigmas[-1])
    if not 0.0 < st < 1.0:
        return None
    if k == 2:
        return 1.0, st
    u1 = 1.0 - (1.0 - sigma_min) / (k - 1)
    r0 = (1.0 - u1) / (1.0 - sigma_min)
    q = ((1.0 - target_sigmas[1]) / (1.0 - st)) / r0
    denom = sigma_min - q * u1
    if denom == 0:
        return None
    c = 1.0 + (q - 1.0) / denom
    return (c, st) if c > 0 and math.isfinite(c) else None


def _flow_pipeline_timesteps(sched, call: dict, k: int, grid: str = "scheduler") -> list[float]:
    """The timesteps a flow pipeline will run with ``call``: its mu rule for dynamic shifting, and the sigma grid it
    hands the scheduler (``grid``: "scheduler" -- its own, StableDiffusion3Pipeline -- or "linspace" --
    linspace(1, 1/K, K), FluxPipeline)."""
    kwargs = {}
    if sched.config.get("use_dynamic_shifting"):
        # the pipeline's calculate_shift with base_shift == max_shift is that constant at every resolution
        kwargs["mu"] = float(sched.config["base_shift"])
    if "sigmas" in call:
        sched.set_timesteps(sigmas=call["sigmas"], **kwargs)
    elif grid == "linspace":
        sched.set_timesteps(sigmas=np.linspace(1.0, 1 / k, k), **kwargs)
    else:
        sched.set_timesteps(k, **kwargs)
    return sched.timesteps.tolist()


def flow_lcm_scheduler(teacher_config: dict, timesteps: list[float], grid: str = "scheduler", dynamic: bool = True):
    """(FlowMatchLCMScheduler, pipeline call kwargs, max |timestep error|) for flow student ``timesteps`` (SD3,
    FLUX; ``grid`` as in :func:`_flow_pipeline_timesteps`). ``dynamic`` False (a pipeline that computes mu itself,
    FLUX.2): the fitted shift c is the scheduler's fixed ``shift``, which ignores the pipeline's mu."""
    n_train = int(teacher_config.get("num_train_timesteps", 1000))
    target = [float(t) for t in timesteps]
    k = len(target)
    sigma_min = FlowMatchLCMScheduler(num_train_timesteps=n_train, use_dynamic_shifting=True).sigma_min \
        if grid == "scheduler" else 1.0 / k
    fit = flow_lcm_fit([t / n_train for t in target], sigma_min)
    if fit is not None:
        c, st = fit
        shifting = dict(use_dynamic_shifting=True, base_shift=math.log(c), max_shift=math.log(c)) if dynamic \
            else dict(shift=c)
        sched = FlowMatchLCMScheduler(num_train_timesteps=n_train, shift_terminal=st, **shifting)
        err = _timesteps_error(_flow_pipeline_timesteps(sched, {}, k, grid), target)
        if err <= TIMESTEP_TOLERANCE:
            return sched, {"num_inference_steps": k}, err
    # fall back: the pipeline's `sigmas=` argument -- the unshifted student sigmas under the teacher's fixed shift
    # (SD3); with a resolution-dependent shift (FLUX) the student's own sigmas, unshifted (shift 1)
    shift = float(teacher_config.get("shift", 1.0)) if grid == "scheduler" else 1.0
    sched = FlowMatchLCMScheduler(num_train_timesteps=n_train, shift=shift)
    sig = [t / n_train for t in target]
    unshifted = [s / (shift - (shift - 1.0) * s) for s in sig]
    call = {"sigmas": unshifted}
    return sched, call, _timesteps_error(_flow_pipeline_timesteps(sched, call, k, grid), target)


def student_scheduler(family: str, teacher_config: dict, timesteps: list[float]):
    """(scheduler, pipeline call kwargs, max |timestep error|) reproducing the student sampler."""
    cls = FAMILIES[family]
    if cls.export_scheduler == "lcm":
        if teacher_config.get("prediction_type", "epsilon") not in ("epsilon", "v_prediction", "sample"):
            raise FlashDMDError(f"teacher prediction_type {teacher_config.get('prediction_type')!r} is not supported "
                                "by LCMScheduler")
        return lcm_scheduler(teacher_config, timesteps)
    return flow_lcm_scheduler(teacher_config, timesteps, cls.pipeline_sigma_grid, dynamic=not cls.pipeline_own_mu)


