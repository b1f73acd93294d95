"""What training, evaluation, sampling and export all need: a loaded model and its sampling rules.

A *model spec* is a diffusers pipeline folder, a hub id, a plug-in's model name (``world-sdxl``), or a run
folder of `flashdmd distill` (holds run.json). :func:`load_model` returns the family adapter, the network
to sample with and that model's own defaults (a student: its K steps, stochastic student sampler, no CFG;
a teacher: 50 steps of its own scheduler, deterministic, its recommended CFG). A run folder's record and student
are read by :mod:`flashdmd.runfolder`. This layer sits below training/ and evaluation/ and imports neither.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from flashdmd import io, runfolder
from flashdmd.families import load_family, name_part, resolve_path

TEACHER_DEFAULT_STEPS = 50
TEACHER_DEFAULT_CFG = 5.0  # diffusers' SDXL / SD3 pipeline default; a folder's flashdmd.json may override
# `--dtype` of sample / eval (export's names): the dtype the networks are loaded in
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Model:
    family: object
    net: torch.nn.Module
    kind: str                 # "teacher" | "student"
    timesteps: list[float] | None   # student: its K steps; teacher: None (use its scheduler)
    guidance_scale: float
    stochastic: bool
    resolution: int | None = None   # image side in pixels; None = the family's default (the teacher's own)

    @property
    def image_size(self) -> int:
        return int(self.resolution or self.family.default_resolution)


def load_model(spec: str, device="cpu", dtype: torch.dtype | None = None) -> Model:
    """The model ``spec`` names, its networks (teacher or student, text encoders, VAE) loaded in ``dtype`` (default
    float32; a float16 VAE that asks for ``force_upcast`` stays float32, see ``Family.vae_dtype``). The networks take
    and give the caller's latents' dtype: float32 in :func:`sample_images`; `flashdmd sample` draws them in the text
    embeddings' dtype, as a diffusers pipeline loaded in ``dtype`` does."""
    path = resolve_path(spec)
    if runfolder.is_run(path):
        return load_student(path, device=device, dtype=dtype)
    fam = load_family(spec, device=device, frozen_dtype=dtype)
    extra = path / "flashdmd.json"
    cfg = io.read_json(extra).get("guidance_scale", TEACHER_DEFAULT_CFG) if extra.is_file() else TEACHER_DEFAULT_CFG
    return Model(fam, fam.denoiser, "teacher", None, float(cfg), False)


def teacher_spec(spec: str) -> str:
    """The teacher a model spec stands for: a run folder's run.json ``teacher``, else ``spec`` itself."""
    path = resolve_path(spec)
    if runfolder.is_run(path):
        return str(runfolder.read_record(path)["teacher"])
    return spec


def teacher_timesteps(family, steps: int) -> list[float]:
    """The folder's own scheduler's timesteps for ``steps`` steps (what its diffusers pipeline uses)."""
    return family.scheduler_timesteps(steps)


@torch.no_grad()
def sample_latent_chunks(model: Model, prompts: list[str], seed: int = 0, steps: int | None = None,
                         guidance_scale: float | None = None, batch_size: int = 100, progress=None):
    """Yield clean latents (n, C, h, w) for ``prompts`` in chunks of ``batch_size``. Image i's initial noise is
    seeded by (seed, i), so any subset or batch size starts from the same noise; a student's re-noising draws
    come from a generator seeded per chunk."""
    fam = model.family
    w = model.guidance_scale if guidance_scale is None else guidance_scale
    if model.timesteps is not None and steps in (None, len(model.timesteps)):
        ts, init = model.timesteps, "noise"
    else:
        ts, init = teacher_timesteps(fam, steps or TEACHER_DEFAULT_STEPS), "pipeline"
    res = model.image_size
    shape = fam.latent_shape(res, res)
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(seed * 1_000_003 + start + i))
                             for i in range(len(chunk))]).to(fam.device)
        gen = torch.Generator(device=fam.device).manual_seed(seed + start)
        cond = fam.encode_prompts(chunk, res, res)
        yield fam.sample_latents(model.net, cond, noise, ts, guidance_scale=w, stochastic=model.stochastic,
                                 generator=gen, init=init)
        if progress is not None:
            progress.update(len(chunk))


@torch.no_grad()
def sample_images(model: Model, prompts: list[str], seed: int = 0, steps: int | None = None,
                  guidance_scale: float | None = None, batch_size: int = 100, progress=None) -> Tensor:
    """Pixels (N, 3, H, W) in [-1, 1] for ``prompts`` (see :func:`sample_latent_chunks` for the seeding)."""
    return torch.cat([model.family.decode_latents(lat).clamp(-1, 1).cpu() for lat in
                      sample_latent_chunks(model, prompts, seed, steps, guidance_scale, batch_size, progress)])


def nfe(model: Model, steps: int | None, guidance_scale: float | None) -> int:
    k = len(model.timesteps) if model.timesteps is not None and steps in (None, len(model.timesteps)) \
        else (steps or TEACHER_DEFAULT_STEPS)
    w = model.guidance_scale if guidance_scale is None else guidance_scale
    return k * (2 if w != 1.0 else 1)


def load_student(run_dir: str | Path, device="cpu", dtype: torch.dtype | None = None):
    """A distill run folder -> evaluation Model with the student's weights and its K steps, every network in
    ``dtype`` (default float32; LoRA adapters in their base's)."""
    run_dir = Path(run_dir)
    info = runfolder.read_record(run_dir)
    fam = load_family(info["teacher"], family=info["family"], device=device, frozen_dtype=dtype)
    if info.get("resolution"):
        fam.use_resolution(int(info["resolution"]), int(info["resolution"]))  # FLUX: the run's noise shift
    fam.embedded_guidance = float(info.get("embedded_guidance", fam.embedded_guidance))
    net = name_part(runfolder.load_student_net(fam, run_dir, info), "student")
    return Model(fam, net, "student", [float(t) for t in info["student_timesteps"]], 1.0, True,
                 info.get("resolution"))
