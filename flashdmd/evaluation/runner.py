"""Sampling for evaluation, and `flashdmd eval`.

A *model spec* is a diffusers pipeline folder, a shipped world name (world-sdxl / world-sd3), or a run
folder of `flashdmd distill` (holds run.json). :func:`load_model` returns the family adapter, the network
to sample with and that model's own defaults (a student: its K steps, stochastic student sampler, no CFG;
a teacher: 50 steps of its own scheduler, deterministic, its recommended CFG).
"""
from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from flashdmd import FlashDMDError

TEACHER_DEFAULT_STEPS = 50
TEACHER_DEFAULT_CFG = 5.0  # diffusers' SDXL / SD3 pipeline default; a folder's flashdmd.json may override


@dataclass
class Model:
    family: object
    net: torch.nn.Module
    kind: str                 # "teacher" | "student"
    timesteps: list[float] | None   # student: its K steps; teacher: None (use its scheduler)
    guidance_scale: float
    stochastic: bool


def load_model(spec: str, device="cpu") -> Model:
    from flashdmd.families import load_family, resolve_path
    path = resolve_path(spec)
    if (path / "run.json").is_file():
        from flashdmd.training.run import load_student
        return load_student(path, device=device)
    fam = load_family(spec, device=device)
    extra = path / "flashdmd.json"
    cfg = json.loads(extra.read_text()).get("guidance_scale", TEACHER_DEFAULT_CFG) if extra.is_file() \
        else TEACHER_DEFAULT_CFG
    return Model(fam, fam.denoiser, "teacher", None, float(cfg), False)


def teacher_timesteps(family, steps: int) -> list[float]:
    """The folder's own scheduler's timesteps for ``steps`` steps (what its diffusers pipeline uses)."""
    sched = copy.deepcopy(family.scheduler)
    sched.set_timesteps(steps)
    return [float(t) for t in sched.timesteps]


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
    res = fam.default_resolution
    shape = fam.latent_shape(res, res)
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(seed * 1_000_003 + start + i))
                             for i in range(len(chunk))]).to(fam.device)
        gen = torch.Generator(device=fam.device).manual_seed(seed + start)
        cond = fam.encode_prompts(chunk)
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


def evaluate_world(model: Model, num_images: int = 500, seed: int = 0, steps: int | None = None,
                   guidance_scale: float | None = None, progress: bool = False) -> dict:
    """World metrics of a model: FD, alignment, diversity (evaluation classifier), oracle score,
    seconds per image and NFE, on the fixed evaluation prompt set (held-out templates)."""
    from tqdm.auto import tqdm

    from flashdmd.evaluation.metrics import evaluate_images
    from flashdmd.world.prompts import eval_prompts
    prompts, labels = eval_prompts(num_images)
    bar = tqdm(total=num_images, desc="eval", unit="img", disable=not progress)
    t0 = time.perf_counter()
    images = sample_images(model, prompts, seed, steps, guidance_scale, progress=bar)
    secs = (time.perf_counter() - t0) / num_images
    bar.close()
    metrics = evaluate_images(images, labels)
    try:
        from flashdmd.world.oracle import Oracle
        metrics["oracle"] = float(Oracle.load().score(images, labels).mean())
    except FlashDMDError:
        pass
    metrics.update(seconds_per_image=secs, nfe=nfe(model, steps, guidance_scale), num_images=num_images)
    return metrics


# ---------------------------------------------------------------------------------------------------
# CLI

def add_arguments(p):
    p.add_argument("--model", required=True, help="pipeline folder, world-sdxl / world-sd3, or a distill run folder")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's own)")
    p.add_argument("--cfg", type=float, default=None, help="guidance scale w in uncond + w*(cond-uncond)")
    p.add_argument("--num-images", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", required=True, help="write the metrics here")
    p.add_argument("--floor", action="store_true", help="also report FD of train vs test at the same N")
    real = p.add_argument_group(
        "real models", "--prompts or any metric backend below switches from the embedded world's metrics to these "
        "(local weights only; docs/EVALUATION.md says what each expects on disk and gives the COCO-10k command)")
    real.add_argument("--prompts", default=None, help="UTF-8 text file, one prompt per line; image i uses line i mod lines")
    real.add_argument("--fid-inception", default=None, metavar="PTH",
                      help="pytorch-fid weights pt_inception-2015-12-05-6726825d.pth (or a .safetensors conversion)")
    real.add_argument("--fid-ref", default=None, metavar="DIR_OR_STATS",
                      help="real images folder, or statistics .npz (pytorch-fid) / .safetensors (flashdmd eval-stats)")
    real.add_argument("--clip", default=None, metavar="DIR", help="transformers CLIPModel folder: CLIP score")
    real.add_argument("--pickscore", default=None, metavar="DIR", help="PickScore_v1 CLIPModel + processor folder")
    real.add_argument("--hpsv2", default=None, metavar="DIR", help="HPSv2 converted to a CLIPModel folder")
    real.add_argument("--imagereward", default=None, metavar="DIR",
                      help="BlipForImageTextRetrieval folder + mlp_head.safetensors: ImageReward")
    real.add_argument("--batch-size", type=int, default=16, help="sampling batch size (images do not depend on it)")
    real.add_argument("--metric-batch-size", type=int, default=50, help="batch size of the metric networks")
    real.add_argument("--device", default=None, help="default: cuda if available, else cpu")


REAL_FLAGS = ("prompts", "fid_inception", "fid_ref", "clip", "pickscore", "hpsv2", "imagereward")


def run(args):
    if any(getattr(args, k, None) is not None for k in REAL_FLAGS):
        from flashdmd.evaluation.real import run_eval
        if args.floor:
            raise FlashDMDError("--floor is a world metric; it does not combine with --prompts / metric backends")
        run_eval(args)
        return
    if args.num_images < 20:
        raise FlashDMDError("--num-images must be at least 20 (two per class: diversity and FD need pairs)")
    if args.steps is not None and args.steps < 1:
        raise FlashDMDError("--steps must be >= 1")
    out = Path(args.json)
    if not out.parent.exists():
        raise FlashDMDError(f"folder {out.parent} for --json does not exist")
    model = load_model(args.model, device=getattr(args, "device", None) or "cpu")
    if model.family.default_resolution != 32:
        raise FlashDMDError(f"{args.model} works at {model.family.default_resolution}px, not the embedded world's 32px: "
                            "give --prompts FILE and metric backends (--fid-inception/--fid-ref, --clip, ...)")
    metrics = evaluate_world(model, args.num_images, args.seed, args.steps, args.cfg, progress=True)
    metrics.update(model=args.model, kind=model.kind, steps=args.steps, cfg=args.cfg)
    if args.floor:
        from flashdmd.evaluation.metrics import floor
        metrics["fd_floor"] = floor(args.num_images, args.seed)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(json.dumps(metrics, indent=2))
    tmp.replace(out)
    print(json.dumps(metrics, indent=2))
