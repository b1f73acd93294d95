"""Joint RL against reward hacking on world-sdxl (BENCHMARKS.md section 4, issue 8).

Every row starts from the same Stage-1 Flash-DMD checkpoint (--base, e.g. the last checkpoint of
benchmarks/convergence.py's flash_ttur1 row) and runs --rl-steps Stage-2 RL updates with the row's settings, for
each of --seeds (the seed picks a different stream of prompts, noise and candidates from the same state). The
Stage-1 student itself is the first row. Rows whose run folder already holds metrics.json are read, not rerun.

    .venv/bin/python benchmarks/rl.py --base benchmarks/runs/convergence_sdxl/flash_ttur1/checkpoints/step_00000300 \
        --out benchmarks/runs/rl_sdxl --rl-steps 60 --seeds 0 1

Rows:
    joint_1 / joint_2 / joint_5 / joint_10   joint Stage 2, RL:distillation 1:1, 2:1, 5:1 (paper), 10:1
    posthoc        distillation first (as many generator updates as joint 5:1 makes), then RL alone
    no_distill     RL alone right after Stage 1 (rl_distill_ratio 0)
    all_steps      joint 5:1 with RL at every student step that has a next step (999, 749, 499) instead of the
                   high-noise ones (999, 749)
Columns: held-out oracle score (the world's stand-in for human raters, never a training signal), LRM score (mean
over the last quarter of RL updates of the training candidates' scores), FD, alignment, diversity.
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import add_run_args, parse  # noqa: E402
ROWS = {
    "joint_1": {"rl_distill_ratio": 1},
    "joint_2": {"rl_distill_ratio": 2},
    "joint_5": {"rl_distill_ratio": 5},
    "joint_10": {"rl_distill_ratio": 10},
    "posthoc": {"rl_distill_ratio": 0},      # plus extra Stage-1 steps first (see run_row)
    "no_distill": {"rl_distill_ratio": 0},
    "all_steps": {"rl_distill_ratio": 5, "rl_step_indices": "[0,1,2]"},
}
COLUMNS = ("oracle", "lrm", "fd", "alignment", "diversity")


def run_row(name: str, seed: int, args, base: Path, base_steps: int) -> dict:
    from flashdmd.training.checkpoint import load_checkpoint
    from flashdmd.training.config import DistillConfig
    from flashdmd.training.distill import _WriterState, setup, train
    folder = Path(args.out) / f"{name}_seed{seed}"
    if (folder / "metrics.json").is_file():
        return json.loads((folder / "metrics.json").read_text())
    overrides = dict(ROWS[name])
    extra = args.rl_steps // 5 if name == "posthoc" else 0   # joint 5:1's distillation updates, done first
    sets = [f"{k}={v}" for k, v in overrides.items()] + [
        "rl_enabled=true", f"rl_steps={args.rl_steps}", f"max_steps={base_steps + extra}", "eval_every_steps=1000000",
        f"eval_num_images={args.num_images}", "sample_every_steps=0", "checkpoint_every_steps=0",
        f"seed={seed}", f"log_every_steps={max(1, args.rl_steps // 20)}"] + list(args.set)
    cfg = DistillConfig.from_sources(str(ROOT / "configs" / args.preset), sets)
    ctx = setup(cfg)
    load_checkpoint(ctx, _WriterState(), base)
    ctx.rng.seed = seed  # the same Stage-1 state, this row's own stream of draws
    print(f"{name} seed {seed}: {' '.join(sets)}", flush=True)
    t0 = time.time()
    result = train(cfg, folder, ctx=ctx, overwrite=True, progress=not args.no_progress)
    print(f"{name} seed {seed}: done in {time.time() - t0:.0f} s", flush=True)
    return result


def row_metrics(result: dict) -> dict:
    final = result["evals"][-1]
    lrm = [h["rl/lrm_score"] for h in result["history"] if "rl/lrm_score" in h]
    tail = lrm[-max(1, len(lrm) // 4):]
    return {"oracle": final.get("oracle"), "lrm": sum(tail) / len(tail) if tail else None, "fd": final["fd"],
            "alignment": final["alignment"], "diversity": final["diversity"],
            "hacking_warnings": len(result.get("warnings", [])), "wall_seconds": result["wall_seconds"]}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, help="a Stage-1 checkpoint folder (checkpoints/step_XXXXXXXX)")
    p.add_argument("--preset", default="world_sdxl_flashdmd_paper.yaml",
                   help="the config the base run used (configs/; section 4's base used the paper's setting)")
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--rl-steps", type=int, default=60)
    add_run_args(p)
    a = parse(p)
    base = Path(a.base)
    base_steps = json.loads((base / "state.json").read_text())["generator_steps"]
    table = {"stage1": {}}
    for name in a.rows:
        for seed in a.seeds:
            result = run_row(name, seed, a, base, base_steps)
            table.setdefault(name, {})[seed] = row_metrics(result)
            if not table["stage1"]:
                b = [e for e in result["evals"] if e.get("stage") == 2][0]   # the guard's baseline = Stage-1 student
                table["stage1"][0] = {"oracle": b.get("oracle"), "lrm": None, "fd": b["fd"],
                                      "alignment": b["alignment"], "diversity": b["diversity"]}
    out = Path(a.out)
    (out / "summary.json").write_text(json.dumps(table, indent=2))
    print(f"{'row':12s} " + " ".join(f"{c:>16s}" for c in COLUMNS))
    for name, seeds in table.items():
        cells = []
        for c in COLUMNS:
            vals = [m[c] for m in seeds.values() if m.get(c) is not None]
            cells.append(" / ".join(f"{v:.3f}" for v in vals) if vals else "-")
        print(f"{name:12s} " + " ".join(f"{x:>16s}" for x in cells), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
