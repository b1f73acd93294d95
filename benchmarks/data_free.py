"""Data-free Pixel-GAN reals on world-sdxl: the teacher's own images (`flashdmd make-reals`) against the real
Fashion-MNIST images as the preset's data_real, two seeds each.

1. prompts: the world's training class prompts, class i mod 10 with a training template and synonym drawn by
   random.Random(i) (flashdmd/world/prompts.py), --num-prompts lines -> WORK/prompts.txt
2. `flashdmd make-reals --model world-sdxl --prompts WORK/prompts.txt --num N --out WORK/reals`: the teacher's own
   sampler at its defaults (50 steps, guidance 2); resumable, so an interrupted benchmark continues
3. per seed, configs/world_sdxl_flashdmd.yaml twice, Stage 1 only, FD / alignment / diversity every --eval-every
   steps: data_real = WORK/reals (teacher_reals) and data_real = world (fashion_mnist, the preset's own); the
   prompts stay the world's class templates in both rows, so only the GAN's real images differ
4. --out JSON: per row the FD curve, final and best FD; per source the mean and spread over seeds; the make-reals
   record and wall time; the commit

    .venv/bin/python benchmarks/data_free.py --out benchmarks/results/data_free.json      # about 1-1.5 h on a CPU
    .venv/bin/python benchmarks/data_free.py --smoke --out /tmp/data_free_smoke.json     # seconds: the same code,
                                                                                         # tiny sizes

The estimate: 10 000 teacher images at 50 steps with guidance (0.22 s an image in teachers.json, batch 100) take
about 35 min; each of the four rows of 300 updates takes about what the demo's Stage 1 takes (5-10 min).
Rows whose folder under --work already holds metrics.json are read, not rerun (benchmarks/common.py), and the
make-reals folder is continued, so the script resumes after an interruption.
"""
import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import add_run_args, git_commit, parse, run_distill_row  # noqa: E402

PRESET = ROOT / "configs" / "world_sdxl_flashdmd.yaml"
TEACHER = "world-sdxl"
SOURCES = ("teacher_reals", "fashion_mnist")
# --smoke: every size at its smallest that still runs each part (one update, one evaluation of the world's minimum
# of 20 images, 2-step teacher images); the numbers mean nothing
SMOKE = {"num_reals": 8, "num_prompts": 10, "reals_steps": 2, "steps": 1, "eval_every": 1, "num_images": 20,
         "batch": 2, "seeds": [0],
         "sets": ["disc_calibration_images=4", "data_workers=0", "run_checkpoint_every_steps=0"]}


def write_prompts(path: Path, n: int) -> list[str]:
    from flashdmd.world.prompts import prompt_for
    prompts = [prompt_for(i % 10, random.Random(i)) for i in range(n)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(prompts) + "\n", encoding="utf-8")
    return prompts


def make_teacher_reals(work: Path, a) -> dict:
    from flashdmd import reals
    prompts = write_prompts(work / "prompts.txt", a.num_prompts)
    req = reals.Request(TEACHER, tuple(prompts), a.num_reals, seed=0, steps=a.reals_steps,
                        batch_size=a.reals_batch)
    t0 = time.time()
    summary = reals.make_reals(req, work / "reals", progress=not a.no_progress)
    summary["wall_seconds"] = time.time() - t0
    print(f"make-reals: {a.num_reals} images in {summary['wall_seconds']:.0f} s ({summary['written_by_this_process']} "
          "drawn now)", flush=True)
    return summary


def curve(result: dict) -> list[dict]:
    return [{"generator_steps": e["generator_steps"], "fd": e["fd"], "alignment": e.get("alignment"),
             "diversity": e.get("diversity"), "wall_seconds": e.get("wall_seconds")} for e in result["evals"]]


def summarise(rows: dict, seeds: list[int]) -> dict:
    per_source = {}
    for source in SOURCES:
        finals = [rows[f"{source}_seed{s}"]["final_fd"] for s in seeds]
        bests = [rows[f"{source}_seed{s}"]["best_fd"] for s in seeds]
        per_source[source] = {"final_fd_mean": statistics.mean(finals), "best_fd_mean": statistics.mean(bests),
                              "final_fd_range": [min(finals), max(finals)],
                              "final_fd_sd": statistics.stdev(finals) if len(finals) > 1 else 0.0}
    ratio = per_source["teacher_reals"]["final_fd_mean"] / per_source["fashion_mnist"]["final_fd_mean"]
    return {"sources": per_source, "teacher_reals_over_fashion_mnist_final_fd": ratio}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default=None, help="make-reals folder and run folders (default benchmarks/runs/"
                   "data_free, or /tmp/flashdmd-data-free-smoke with --smoke)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--num-reals", type=int, default=10000, help="teacher images (each seen about once in 300 "
                   "updates of batch 32)")
    p.add_argument("--num-prompts", type=int, default=1000, help="class prompts the teacher images cycle through")
    p.add_argument("--reals-steps", type=int, default=None, help="teacher steps (default: its own, 50)")
    p.add_argument("--reals-batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=300, help="generator updates per row (the preset's run_max_steps)")
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--smoke", action="store_true", help="the same code at tiny sizes (seconds; numbers mean nothing)")
    add_run_args(p)
    a = parse(p)
    if a.smoke:
        for k, v in SMOKE.items():
            if k == "sets":
                a.set = v + list(a.set)
            else:
                setattr(a, k, v)
    work = Path(a.work or ("/tmp/flashdmd-data-free-smoke" if a.smoke else ROOT / "benchmarks" / "runs" / "data_free"))
    made = make_teacher_reals(work, a)
    rows = {}
    for seed in a.seeds:
        for source, data_real in (("teacher_reals", str(work / "reals")), ("fashion_mnist", "world")):
            name = f"{source}_seed{seed}"
            result = run_distill_row(name, PRESET, {"data_real": data_real}, work / name, a, a.steps, seed)
            c = curve(result)
            trained = [e for e in c if e["generator_steps"] > 0] or c
            rows[name] = {"source": source, "data_real": data_real, "seed": seed, "final_fd": c[-1]["fd"],
                          "best_fd": min(e["fd"] for e in trained), "curve": c}
    commit = git_commit(ROOT, short=False)
    out = {"commit": commit, "date": time.strftime("%Y-%m-%d"), "teacher": TEACHER, "preset": PRESET.name,
           "smoke": a.smoke, "seeds": a.seeds, "steps": a.steps, "batch": a.batch, "eval_every": a.eval_every,
           "eval_num_images": a.num_images, "sets": a.set,
           "make_reals": {k: made[k] for k in ("num", "num_prompts", "seed", "sampler_steps", "guidance_scale",
                                              "resolution", "wall_seconds")},
           **summarise(rows, a.seeds), "rows": rows}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2) + "\n")
    for source, s in out["sources"].items():
        print(f"{source:14s} final FD {s['final_fd_mean']:.2f} (range {s['final_fd_range'][0]:.2f}-"
              f"{s['final_fd_range'][1]:.2f}), best {s['best_fd_mean']:.2f}", flush=True)
    print(f"teacher reals / Fashion-MNIST, final FD: {out['teacher_reals_over_fashion_mnist_final_fd']:.3f}; "
          f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
