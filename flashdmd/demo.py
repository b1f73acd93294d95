"""The main job (`make demo` = `flashdmd demo`): Flash-DMD Stage 1 + Stage 2 on the embedded world's
SDXL-style teacher, evaluation of the teacher (4 and 50 steps, CFG) and the 4-step student, and a report."""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from flashdmd import FlashDMDError, io
from flashdmd.evaluation.report import save_grid, write_report
from flashdmd.inference import load_model, sample_images
from flashdmd.training.config import DistillConfig
from flashdmd.training.distill import train
from flashdmd.world import plugin
from flashdmd.world.metrics import evaluate_world
from flashdmd.world.prompts import eval_prompts

PRESET = Path(__file__).resolve().parent.parent / "configs" / "world_sdxl_demo.yaml"
GRID_PROMPTS = 10   # one per class
GRID_SEEDS = 2


def run(args):
    plugin.register()  # the demo chooses the embedded world

    if not PRESET.is_file():
        raise FlashDMDError(f"demo preset {PRESET} is missing: run from a flashdmd checkout (pip install -e .)")
    out = Path(args.out)
    seed = getattr(args, "seed", 0)
    # --seed chooses the training run (initial heads, noise, data order); the evaluation's noise stays seed 0 so
    # that the runs of different seeds are compared on the same images' noise
    cfg = DistillConfig.from_sources(PRESET, [f"run_seed={seed}"] + list(getattr(args, "set", None) or []))
    t0 = time.time()
    print(f"[demo] Stage 1 + Stage 2 distillation of {cfg.model_teacher} into a {len(cfg.student_timesteps or [0]*4)}"
          f"-step student on {torch.get_num_threads()} CPU thread(s) (flashdmd --threads N to choose), "
          f"training seed {cfg.run_seed}")
    train(cfg, out, progress=True, overwrite=True)  # the demo folder is regenerated on every `make demo`
    t_train = time.time() - t0

    print("[demo] evaluating teacher (4 and 50 steps, CFG) and student (4 steps)")
    teacher, student = load_model(cfg.model_teacher), load_model(str(out))
    n = cfg.eval_num_images
    rows = []
    for name, model, steps in (("teacher", teacher, 50), ("teacher", teacher, 4), ("student (Flash-DMD)", student, None)):
        m = evaluate_world(model, n, seed=0, steps=steps, progress=True)
        rows.append({"model": name + (f", CFG {model.guidance_scale:g}" if model.kind == "teacher" else ""),
                     "steps": steps or len(model.timesteps), **m})

    prompts = [p for p in eval_prompts(GRID_PROMPTS)[0] for _ in range(GRID_SEEDS)]
    grids = []
    for tag, model, steps in (("teacher_50", teacher, 50), ("teacher_4", teacher, 4), ("student_4", student, None)):
        save_grid(sample_images(model, prompts, seed=7, steps=steps), out / f"grid_{tag}.png", nrow=GRID_PROMPTS * GRID_SEEDS // 2, scale=3)
    captions = {"teacher_50": "Teacher, 50 steps with CFG", "teacher_4": "Teacher, 4 steps with CFG (what the student replaces)",
                "student_4": "Flash-DMD student, 4 steps, no CFG (same prompts and noise seeds)"}
    grids = [(f"grid_{k}.png", v) for k, v in captions.items()]
    metrics_path = out / "metrics.json"
    metrics = io.read_json(metrics_path)
    metrics["comparison"] = rows
    metrics["demo_wall_seconds"] = time.time() - t0
    metrics["demo_seed"] = cfg.run_seed
    io.atomic_write_text(metrics_path, json.dumps(metrics, indent=2))
    s, t50, t4 = rows[2], rows[0], rows[1]
    summary = (f"A {len(student.timesteps)}-step student distilled (training seed {cfg.run_seed}) from the embedded "
               f"SDXL-architecture teacher in "
               f"{t_train / 60:.1f} min on this machine: FD {s['fd']:.2f} vs the teacher's {t4['fd']:.2f} at 4 steps and "
               f"{t50['fd']:.2f} at 50 steps, {t50['seconds_per_image'] / s['seconds_per_image']:.0f}x faster than the "
               f"50-step teacher. Each grid: the ten classes in order (held-out prompt templates), two noise seeds per class side by side, five classes per row.")
    report = write_report(out, rows, grids, title="flashdmd demo: Flash-DMD on the embedded world", summary=summary)
    print(f"[demo] done in {(time.time() - t0) / 60:.1f} min: {report}")
