"""``flashdmd world pretrain``: train the embedded world's generative models from Fashion-MNIST.

Stages (in this order; later ones read what earlier ones wrote into ``--out``):

==========  ==================================================================================
``text``    CLIP tokenizer files + two CLIP text encoders, contrastive against a small image tower
``vae``     AutoencoderKL (32x32 RGB <-> 8x8x4), reconstruction + small KL; latent scale/shift
``sdxl``    SDXL-style UNet teacher, eps-MSE at uniform t in [0, 999] (VP, scaled_linear betas)
``sd3``     SD3-style MMDiT teacher, rectified flow (target eps - x0) at SD3's shifted timesteps
``eval``    the evaluation / oracle / discriminator nets (:func:`flashdmd.world.evalnets.pretrain_eval`)
==========  ==================================================================================

Outputs: ``OUT/world-sdxl`` and ``OUT/world-sd3`` (standard diffusers pipeline folders), ``OUT/eval``,
``OUT/samples/*.png`` (sample grids) and ``OUT/pretrain_log.json`` (per stage: wall time, final loss,
settings). Long stages checkpoint weights, EMA and AdamW state as safetensors under ``OUT/_work`` every
``--checkpoint-every`` steps; rerunning the same command resumes there (the checkpoint is deleted when its
stage completes). A full run skips stages already logged as done unless ``--force``; ``--only`` always
runs the named stages. Batches and noise are drawn from generators seeded by (seed, stage, step), so a
resumed run sees the same data as an uninterrupted one.

The stages are :mod:`flashdmd.world.pretrain_stages` (the ``eval`` stage: :mod:`flashdmd.world.evalnets`), the
loop, checkpoint and settings they share :mod:`flashdmd.world.pretrain_loop`; this module is the command: the stage
order, the log, the sample grids.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from flashdmd import FlashDMDError, io
from flashdmd.world.data import CLASS_NAMES
from flashdmd.world.evalnets import pretrain_eval
from flashdmd.world.pretrain_loop import FULL, QUICK, Checkpoint, RunOptions
from flashdmd.world.pretrain_stages import SD3_DIR, SDXL_DIR, stage_sd3, stage_sdxl, stage_text, stage_vae

STAGES = ("text", "vae", "sdxl", "sd3", "eval")
CFG_SCALE = 2.0  # guidance used for the sample grids (the recommended teacher CFG, see assets/README.md)


# ------------------------------------------------------------------------------------------ sample grids

@torch.no_grad()
def sample_grid(folder: Path, path: Path, steps: int, per_class: int = 6, guidance_scale: float = CFG_SCALE,
                seed: int = 0) -> Path:
    """Load ``folder`` with its diffusers pipeline and save a grid (rows: samples, columns: 10 classes)."""
    pipe = load_pipeline(folder)
    pipe.set_progress_bar_config(disable=True)
    prompts = [f"a photo of a {c}" for _ in range(per_class) for c in CLASS_NAMES]
    img = pipe(prompt=prompts, num_inference_steps=steps, guidance_scale=guidance_scale, height=32, width=32,
               generator=torch.Generator().manual_seed(seed), output_type="np").images
    grid = img.reshape(per_class, 10, 32, 32, 3).transpose(0, 2, 1, 3, 4).reshape(per_class * 32, 320, 3)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((grid * 255).round().clip(0, 255).astype(np.uint8)).resize((640, per_class * 64),
                                                                                Image.NEAREST).save(path)
    return path


def load_pipeline(folder: Path):
    """``StableDiffusionXLPipeline`` or ``StableDiffusion3Pipeline`` (without T5) from a world folder."""
    # here, not at the top: diffusers' pipeline classes import transformers' image processors, which print a
    # warning per class without torchvision -- on every `flashdmd` command, since the CLI imports this module
    from diffusers import StableDiffusion3Pipeline, StableDiffusionXLPipeline
    index = Path(folder) / "model_index.json"
    if not index.is_file():
        raise FlashDMDError(f"{folder} has no model_index.json: run `flashdmd world pretrain` for it first")
    cls = io.read_json(index).get("_class_name")
    if cls == "StableDiffusionXLPipeline":
        return StableDiffusionXLPipeline.from_pretrained(folder)
    if cls == "StableDiffusion3Pipeline":
        return StableDiffusion3Pipeline.from_pretrained(folder, text_encoder_3=None, tokenizer_3=None)
    raise FlashDMDError(f"{index}: unsupported pipeline class {cls!r}")


# -------------------------------------------------------------------------------------------------- CLI

STAGE_FNS = {"text": stage_text, "vae": stage_vae, "sdxl": stage_sdxl, "sd3": stage_sd3}
TEACHER_FOLDERS = {"sdxl": SDXL_DIR, "sd3": SD3_DIR}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="folder to write world-sdxl/, world-sd3/, eval/ and "
                        "pretrain_log.json into")
    parser.add_argument("--only", default=None, help=f"comma-separated stages to run, from {','.join(STAGES)} "
                        "(default: all, skipping stages already done)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--quick", action="store_true", help="a few iterations per stage on 64 images (tests)")
    parser.add_argument("--force", action="store_true", help="rerun stages already logged as done")
    parser.add_argument("--checkpoint-every", type=int, default=200, help="steps between resumable checkpoints")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's; 1 is "
                        "faster on a CPU shared with other jobs)")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    parser.add_argument("--no-samples", action="store_true", help="skip the sample grids after teacher stages")


def _parse_stages(only: str | None) -> tuple[list[str], bool]:
    if not only:
        return list(STAGES), False
    stages = [s.strip() for s in only.split(",") if s.strip()]
    bad = [s for s in stages if s not in STAGES]
    if bad or not stages:
        raise FlashDMDError(f"--only {only!r}: unknown stage(s) {bad}; choose from {', '.join(STAGES)}")
    return [s for s in STAGES if s in stages], True


def _read_log(out: Path) -> dict:
    p = out / "pretrain_log.json"
    return io.read_json(p) if p.is_file() else {}


def _write_log(out: Path, log: dict) -> None:
    io.atomic_write_text(out / "pretrain_log.json", json.dumps(log, indent=2, sort_keys=True) + "\n")


def _run_eval(out: Path, seed: int, quick: bool) -> dict:
    t0 = time.time()
    pretrain_eval(out_dir=out / "eval", seed=seed, quick=quick)
    return {"wall_s": round(time.time() - t0, 1), "final_loss": None}


def _run_stage(stage: str, out: Path, args) -> dict:
    cfg = (QUICK if args.quick else FULL).get(stage)
    if stage == "eval":
        entry = _run_eval(out, args.seed, args.quick)
    else:
        opts = RunOptions(seed=args.seed, progress=not args.no_progress, checkpoint_every=args.checkpoint_every)
        entry = STAGE_FNS[stage](out, cfg, opts)
        entry["config"] = asdict(cfg)
        Checkpoint(out, stage).remove()
    if stage in TEACHER_FOLDERS and not args.no_samples:
        entry["samples"] = _write_samples(out, stage, args.quick)
    return entry


def _write_samples(out: Path, stage: str, quick: bool) -> list[str]:
    folder = out / TEACHER_FOLDERS[stage]
    steps = (2,) if quick else (50, 4)
    return [str(sample_grid(folder, out / "samples" / f"{stage}_{s}steps_cfg{CFG_SCALE:g}.png", s,
                            per_class=1 if quick else 6).relative_to(out)) for s in steps]


def run(args) -> int:
    """Run the requested stages; each stage's wall time and final loss land in OUT/pretrain_log.json."""
    out = Path(args.out)
    stages, explicit = _parse_stages(args.only)
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    out.mkdir(parents=True, exist_ok=True)
    log = _read_log(out)
    for stage in stages:
        if not explicit and not args.force and log.get(stage, {}).get("done") and log[stage].get("quick") == args.quick:
            print(f"pretrain {stage}: already done (see pretrain_log.json); --force reruns it", file=sys.stderr)
            continue
        entry = _run_stage(stage, out, args)
        entry.update(done=True, seed=args.seed, quick=args.quick, finished=time.strftime("%Y-%m-%d %H:%M:%S"))
        log = _read_log(out)
        log[stage] = entry
        _write_log(out, log)
        print(f"pretrain {stage}: {entry['wall_s']} s, final loss {entry['final_loss']}", file=sys.stderr)
    work = out / "_work"
    if work.is_dir() and not any(work.iterdir()):
        work.rmdir()
    return 0


def main(argv=None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    parser = argparse.ArgumentParser(prog="python -m flashdmd.world.pretrain", description=__doc__.split("\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except FlashDMDError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
