"""`flashdmd sample`: PNGs from a student run (its K steps) or a teacher folder / world name (its defaults).

Random numbers are drawn the way diffusers pipelines draw them, so a seed means the same thing here and
in a pipeline folder written by `flashdmd export`: :func:`sample_latents` takes one ``torch.Generator``
(or one per image, as a list -- diffusers' convention) and draws, with diffusers' own ``randn_tensor``,
first the initial noise of the whole batch and then one fresh noise per re-noising step of the stochastic
student sampler. :func:`flashdmd.inference.sample_images` (used by `flashdmd eval` and training
previews) keeps its own per-image seeding, which makes any subset of an evaluation set reproducible but
does not match a pipeline call; it is left as it is and this module has its own loop instead.

Every image gets its own generator seeded ``--seed + j`` (j-th image of a prompt), so the file
``{prompt index:04d}_seed{seed}.png`` is reproduced by a one-prompt pipeline call with that seed.

Beside the PNGs, ``prompts.jsonl`` holds one JSON object per PNG: ``{"file", "prompt", "seed", "steps",
"guidance_scale"}`` (the steps and guidance the image was drawn with), and ``metadata.jsonl`` the same PNGs as
``{"file_name", "text"}`` lines -- the captions file of an image folder (HF ``imagefolder``, flashdmd's
:class:`~flashdmd.data.ImageFolderSource`), so a folder of samples is a ``data_real`` as it stands. A later call into
the same folder keeps the earlier lines, drops those of PNGs it writes again (--overwrite) and appends its own; both
files are replaced atomically, also when the call stops part-way (then they list the PNGs written so far).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import torch
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image
from torch import Tensor
from tqdm.auto import tqdm

from flashdmd import FlashDMDError, io
from flashdmd.data import read_prompt_file
from flashdmd.diffusion import samplers
from flashdmd.export import EXPORT_INFO
from flashdmd.families import resolve_path
from flashdmd.inference import DTYPES, TEACHER_DEFAULT_STEPS, load_model, teacher_timesteps

DEFAULT_BATCH = 8
PROMPT_LOG = "prompts.jsonl"
METADATA = "metadata.jsonl"  # the captions of an image folder: {"file_name", "text"} per line (data/sources.py)


def plan(model, steps: int | None = None) -> tuple[list[float], str]:
    """(timesteps, initial-latent rule) exactly as sample_images chooses them: a student's own K steps
    (initial latent = the noise), else ``steps`` (default 50) of the folder's own scheduler."""
    if model.timesteps is not None and steps in (None, len(model.timesteps)):
        return [float(t) for t in model.timesteps], "noise"
    return teacher_timesteps(model.family, steps or TEACHER_DEFAULT_STEPS), "pipeline"


def _n_images(generator) -> int | None:
    return len(generator) if isinstance(generator, (list, tuple)) else None


@torch.no_grad()
def sample_latents(model, prompts: Sequence[str], generator: torch.Generator | list[torch.Generator] | None,
                   steps: int | None = None, guidance_scale: float | None = None) -> Tensor:
    """Clean latents (B, C, h, w) for ``prompts`` from ``model`` (a :class:`flashdmd.inference.Model`).

    Draw order, as a diffusers pipeline with a one-generator scheduler step (``LCMScheduler``): the initial
    noise (B, C, h, w), then one fresh (B, C, h, w) noise per step but the last. ``generator`` may be a list
    of B generators (each image its own stream) or None (torch's global generator). A student runs its
    stochastic sampler (:func:`flashdmd.diffusion.samplers.trajectory` with fresh noise); a teacher its
    deterministic one, which draws only the initial noise.
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    n = _n_images(generator)
    if n is not None and n != len(prompts):
        raise FlashDMDError(f"sample_latents: {n} generators for {len(prompts)} prompts")
    fam = model.family
    w = model.guidance_scale if guidance_scale is None else float(guidance_scale)
    ts, init = plan(model, steps)
    res = model.image_size
    shape = (len(prompts), *fam.latent_shape(res, res))
    cond = fam.encode_prompts(prompts, res, res)
    dtype = cond.prompt_embeds.dtype
    noise = randn_tensor(shape, generator=generator, device=fam.device, dtype=dtype)
    x = fam.initial_latents(noise, ts[0], init)
    denoise = fam.denoiser_fn(model.net, cond, w)
    x0 = None
    for k, t in enumerate(ts):
        x0, eps = denoise(x, torch.full((x.shape[0],), float(t), device=x.device, dtype=torch.float32))
        if k + 1 < len(ts):
            fresh = fam.step_noise(x0, generator) if model.stochastic else eps
            # renoise with the noise given explicitly: alpha' x0 + sigma' * fresh (the stochastic sampler's step)
            x = samplers.renoise(x0, fresh, ts[k + 1], fam.schedule, stochastic=False)
    return x0


def to_uint8(pixels: Tensor) -> Tensor:
    """(3, H, W) in [-1, 1] -> (H, W, 3) uint8, rounding like diffusers' image processor."""
    return ((pixels / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu()


def save_png(pixels: Tensor, path: Path) -> None:
    """One PNG, written atomically; a full disk is one line naming the folder (at most the raw pixels needed)."""
    im = Image.fromarray(to_uint8(pixels).numpy())
    io.atomic_write(path, lambda f: im.save(f, format="PNG"), f"image {path.name}", im.width * im.height * 3)


def image_name(prompt_index: int, seed: int) -> str:
    return f"{prompt_index:04d}_seed{seed}.png"


def read_prompt_log(out: Path) -> list[dict]:
    """The records of ``out/prompts.jsonl`` (none when it is absent)."""
    path = out / PROMPT_LOG
    if not path.is_file():
        return []
    records = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if not isinstance(record, dict) or not isinstance(record.get("file"), str):
            raise FlashDMDError(f"{path} line {n} is not a JSON object with a \"file\"; fix or remove that file")
        records.append(record)
    return records


def write_metadata(out: Path, rows: list[dict]) -> None:
    """``out/metadata.jsonl`` := ``rows`` (each holds ``file_name`` and ``text``), one JSON object a line (tmp +
    rename): the captions :class:`~flashdmd.data.ImageFolderSource` and HF ``imagefolder`` read."""
    io.atomic_write_text(out / METADATA, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def write_prompt_log(out: Path, earlier: list[dict], new: list[dict]) -> None:
    """``out/prompts.jsonl`` := the ``earlier`` records less those of files in ``new``, then ``new`` (tmp + rename);
    ``out/metadata.jsonl`` := the same files with their prompts as captions."""
    again = {r["file"] for r in new}
    records = [r for r in earlier if r["file"] not in again] + list(new)
    io.atomic_write_text(out / PROMPT_LOG, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    write_metadata(out, [{"file_name": r["file"], "text": r["prompt"]} for r in records
                         if isinstance(r.get("prompt"), str)])


def generate(model, prompts: list[str], seed: int = 0, num_per_prompt: int = 1, steps: int | None = None,
             guidance_scale: float | None = None, batch_size: int = DEFAULT_BATCH):
    """Yield (prompt index, seed, pixels (3, H, W) in [-1, 1]); image j of prompt i uses seed ``seed + j``."""
    jobs = [(i, seed + j) for i in range(len(prompts)) for j in range(num_per_prompt)]
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start:start + batch_size]
        gens = [torch.Generator().manual_seed(s) for _, s in chunk]
        lat = sample_latents(model, [prompts[i] for i, _ in chunk], gens, steps, guidance_scale)
        pixels = model.family.decode_latents(lat).clamp(-1, 1).cpu()
        for (i, s), px in zip(chunk, pixels):
            yield i, s, px


# ---------------------------------------------------------------------------------------------------
# CLI

def add_arguments(p):
    p.add_argument("--model", required=True,
                   help="a distill run folder (its K steps), a diffusers pipeline folder or world-sdxl / world-sd3")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompts", default=None, help="a UTF-8 text file, one prompt per line")
    p.add_argument("--out", required=True, help="folder for the PNGs and their prompts.jsonl (created)")
    p.add_argument("--seed", type=int, default=0, help="image j of every prompt uses seed SEED+j")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's own)")
    p.add_argument("--cfg", type=float, default=None, help="guidance scale (default: the model's own; students 1)")
    p.add_argument("--num-per-prompt", type=int, default=1, help="images per prompt")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH, help="images per network batch")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32",
                   help="dtype of the networks (student or teacher, text encoders, VAE; a float16 VAE whose config "
                        "sets force_upcast stays float32, as in diffusers' pipelines); latents and the sampler's "
                        "steps follow the text embeddings, as a diffusers pipeline loaded in that dtype. Default fp32")
    p.add_argument("--overwrite", action="store_true", help="replace existing PNGs of the same name")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def collect_prompts(args) -> list[str]:
    prompts = []
    for p in args.prompt:
        if not p.strip():
            raise FlashDMDError("--prompt is empty; give some text")
        prompts.append(p)
    if args.prompts is not None:
        prompts += read_prompt_file(args.prompts)
    if not prompts:
        raise FlashDMDError("no prompts: give --prompt TEXT (repeatable) or --prompts FILE")
    return prompts


def prepare_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise FlashDMDError(f"--out {out} exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-probe-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise FlashDMDError(f"cannot write to --out {out}: {e.strerror or e}") from None


def check_not_export(spec: str) -> None:
    path = resolve_path(spec)
    if (path / EXPORT_INFO).is_file():
        raise FlashDMDError(f"{path} was written by `flashdmd export` for diffusers; sample it with diffusers "
                            "(see its README.md) or pass the distill run folder")


def run(args):
    for name in ("num_per_prompt", "batch_size"):
        if getattr(args, name) < 1:
            raise FlashDMDError(f"--{name.replace('_', '-')} must be >= 1")
    if args.steps is not None and args.steps < 1:
        raise FlashDMDError("--steps must be >= 1")
    if args.seed < 0:
        raise FlashDMDError("--seed must be >= 0")
    prompts = collect_prompts(args)
    out = Path(args.out)
    names = [image_name(i, args.seed + j) for i in range(len(prompts)) for j in range(args.num_per_prompt)]
    prepare_out(out)
    existing = [n for n in names if (out / n).exists()]
    if existing and not args.overwrite:
        raise FlashDMDError(f"{len(existing)} of the PNGs already exist in {out} (e.g. {existing[0]}); "
                            "pass --overwrite to replace them")
    earlier = read_prompt_log(out)  # a broken log stops the call before any work
    check_not_export(args.model)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(args.model, device=device, dtype=DTYPES[args.dtype])
    steps = len(plan(model, args.steps)[0])
    guidance = args.cfg if args.cfg is not None else model.guidance_scale
    records = []
    bar = tqdm(total=len(names), desc="sample", unit="img", disable=args.no_progress, dynamic_ncols=True)
    try:
        for i, s, px in generate(model, prompts, args.seed, args.num_per_prompt, args.steps, args.cfg,
                                 args.batch_size):
            save_png(px, out / image_name(i, s))
            records.append({"file": image_name(i, s), "prompt": prompts[i], "seed": s, "steps": steps,
                            "guidance_scale": guidance})
            bar.update(1)
    finally:  # also after an interruption: the PNGs written so far are described
        bar.close()
        if records:
            write_prompt_log(out, earlier, records)
    print(f"wrote {len(records)} PNGs, {PROMPT_LOG} and {METADATA} to {out} ({model.kind}, {steps} steps, "
          f"guidance {guidance})")
