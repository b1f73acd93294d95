"""Joint RL against its alternatives: the quality-preference frontier (BENCHMARKS.md section 4, issues 8 and 17).

Every row starts from the same Stage-1 Flash-DMD checkpoint (--base, a `checkpoints/step_XXXXXXXX` folder of a run
made with --preset) and runs --rl-steps Stage-2 RL updates with the row's settings, for each of --seeds (the seed
picks a different stream of prompts, noise and candidates from the same state) and each RL step size in --rl-lrs
(folder OUT/lr<LR>/<row>_seed<S>). The Stage-1 student itself is the first row. Rows whose run folder already
holds metrics.json are read, not rerun, so an interrupted frontier resumes row by row.

    .venv/bin/flashdmd distill --config configs/world_sdxl_flashdmd.yaml --out benchmarks/runs/bases/sdxl
    .venv/bin/python benchmarks/rl.py --base benchmarks/runs/bases/sdxl/checkpoints/step_00000300 \
        --preset world_sdxl_flashdmd.yaml --rl-lrs 2e-6 6e-6 2e-5 --seeds 0 1 --out benchmarks/runs/rl_sdxl \
        --plot docs/figures/rl_frontier_sdxl.png

Rows:
    joint_1 / joint_2 / joint_5 / joint_10   joint Stage 2, RL:distillation 1:1, 2:1, 5:1 (paper), 10:1
    posthoc        distillation first (as many generator updates as joint 5:1 makes), then RL alone
    no_distill     RL alone right after Stage 1 (rl_distill_ratio 0)
    all_steps      joint 5:1 with RL at every student step that has a next step (999, 749, 499) instead of the
                   high-noise ones (999, 749)
    kl_anchor      RL alone, anchored to the Stage-1 student by an explicit KL penalty (rl_kl_weight = --kl-weight)
                   instead of ongoing distillation: the usual alternative regulariser
    distill_2      the control: joint 2:1 with RL switched off by a vanishing step (rl_lr 1e-12 whatever --rl-lrs
                   says; 40 such updates leave FD unchanged to 3 decimals), the same draws and distillation updates
                   -- how far FD and the oracle drift from Stage 1 by distillation alone
    distill_5      the same control for joint 5:1 (its 8 distillation updates in 40 RL updates)
    posthoc_distill  post-hoc's control: its distillation updates first, then RL at the vanishing step
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
from common import add_run_args, parse, pyplot  # noqa: E402
ROWS = {
    "joint_1": {"rl_distill_ratio": 1},
    "joint_2": {"rl_distill_ratio": 2},
    "joint_5": {"rl_distill_ratio": 5},
    "joint_10": {"rl_distill_ratio": 10},
    "posthoc": {"rl_distill_ratio": 0},      # plus extra Stage-1 steps first (see run_row)
    "no_distill": {"rl_distill_ratio": 0},
    "all_steps": {"rl_distill_ratio": 5, "rl_step_indices": "[0,1,2]"},
    "kl_anchor": {"rl_distill_ratio": 0},   # plus rl_kl_weight = --kl-weight (see run_row)
    "distill_2": {"rl_distill_ratio": 2, "rl_lr": 1e-12},   # the same at every step size: run it at one
    "distill_5": {"rl_distill_ratio": 5, "rl_lr": 1e-12},   # joint 5:1's control, likewise
    "posthoc_distill": {"rl_distill_ratio": 0, "rl_lr": 1e-12},   # post-hoc's control: its distillation, no RL
}
COLUMNS = ("oracle", "lrm", "fd", "alignment", "diversity")
MARKERS = dict(zip(ROWS, "v<o>sxDP*hd^"))   # the frontier plot's marker of each row, in ROWS' order


def row_folder(out: str, lr: str | None, name: str, seed: int) -> Path:
    """OUT/lr<LR>/<row>_seed<S> for a step size of --rl-lrs, OUT/<row>_seed<S> for the preset's."""
    return Path(out) / (f"lr{lr}" if lr else "") / f"{name}_seed{seed}"


def run_row(name: str, seed: int, args, base: Path, base_steps: int, lr: str | None) -> dict:
    from flashdmd.training.checkpoint import load_checkpoint
    from flashdmd.training.config import DistillConfig
    from flashdmd.training.distill import _WriterState, setup, train
    folder = row_folder(args.out, lr, name, seed)
    if (folder / "metrics.json").is_file():
        return json.loads((folder / "metrics.json").read_text())
    overrides = dict(ROWS[name])
    if name == "kl_anchor":
        overrides["rl_kl_weight"] = args.kl_weight
    if lr and "rl_lr" not in ROWS[name]:   # the controls keep their vanishing step
        overrides["rl_lr"] = lr
    extra = args.rl_steps // 5 if name.startswith("posthoc") else 0   # joint 5:1's distillation updates, done first
    sets = [f"{k}={v}" for k, v in overrides.items()] + [
        "rl_enabled=true", f"rl_steps={args.rl_steps}", f"run_max_steps={base_steps + extra}",
        "eval_every_steps=1000000",
        f"eval_num_images={args.num_images}", "run_sample_every_steps=0", "run_checkpoint_every_steps=0",
        f"run_seed={seed}", f"run_log_every_steps={max(1, args.rl_steps // 20)}"] + list(args.set)
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
    kl = [h["rl/kl"] for h in result["history"] if "rl/kl" in h]
    return {"oracle": final.get("oracle"), "lrm": sum(tail) / len(tail) if tail else None, "fd": final["fd"],
            "kl_last": kl[-1] if kl else None,
            "alignment": final["alignment"], "diversity": final["diversity"],
            "hacking_warnings": len(result.get("warnings", [])), "wall_seconds": result["wall_seconds"]}


def plot_frontier(tables: dict, path: str, title: str) -> None:
    """Held-out oracle (up is better) against FD (left is better): one point per row and step size, the mean over
    seeds with the seeds' range as bars; a row's step sizes joined by a line from Stage 1 (the star), small to
    large."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 5.5))
    lrs = sorted(tables, key=lambda x: float(x) if x != "config" else 0.0)
    rows = [r for r in ROWS if any(r in tables[lr] for lr in lrs)]
    colors = dict(zip(rows, plt.cm.tab10.colors))
    stage1 = next((t["stage1"][0] for t in tables.values() if t["stage1"]), None)
    for row in rows:
        xs, ys = ([stage1["fd"]], [stage1["oracle"]]) if stage1 else ([], [])   # every line leaves Stage 1
        for j, lr in enumerate(lrs):
            seeds = list(tables[lr].get(row, {}).values())
            if not seeds:
                continue
            fd = [m["fd"] for m in seeds]
            orc = [m["oracle"] for m in seeds]
            x, y = sum(fd) / len(fd), sum(orc) / len(orc)
            ax.errorbar(x, y, xerr=[[x - min(fd)], [max(fd) - x]], yerr=[[y - min(orc)], [max(orc) - y]],
                        fmt=MARKERS[row], color=colors[row], ms=4 + 2.5 * j, alpha=0.85, capsize=2,
                        label=row if len(xs) <= (1 if stage1 else 0) else None)
            xs.append(x)
            ys.append(y)
        ax.plot(xs, ys, "-", color=colors[row], alpha=0.5)
    if stage1:
        ax.plot(stage1["fd"], stage1["oracle"], "*", color="black", ms=14, label="Stage 1")
    ax.set_xlabel("FD (lower is better)")
    ax.set_ylabel("held-out oracle (higher is better)")
    ax.set_title(title + f"\nmarker size: RL step size {', '.join(lrs)} (small to large); bars: seed range", fontsize=9)
    ax.legend(fontsize=8, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", help="a Stage-1 checkpoint folder (checkpoints/step_XXXXXXXX)")
    p.add_argument("--preset", default="world_sdxl_flashdmd_paper.yaml",
                   help="the config the base run used (configs/; section 4's first tables used the paper's setting)")
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--rl-steps", type=int, default=60)
    p.add_argument("--rl-lrs", nargs="+", help="RL step sizes (rl_lr), each its own column of the frontier "
                   "(OUT/lr<LR>/); default: the preset's rl_lr, in OUT itself")
    p.add_argument("--kl-weight", type=float, default=1.0, help="rl_kl_weight of the kl_anchor row")
    p.add_argument("--plot", help="write the frontier figure here (oracle against FD)")
    p.add_argument("--title", default="Stage 2: held-out oracle against FD")
    p.add_argument("--no-run", action="store_true", help="only read the rows' metrics.json under --out")
    add_run_args(p)
    a = parse(p)
    if not a.no_run and not a.base:
        p.error("--base is required unless --no-run")
    base = Path(a.base) if a.base else None
    base_steps = json.loads((base / "state.json").read_text())["generator_steps"] if base else 0
    tables = {}
    for lr in a.rl_lrs or [None]:
        table = {"stage1": {}}
        for name in a.rows:
            for seed in a.seeds:
                if a.no_run and not (row_folder(a.out, lr, name, seed) / "metrics.json").is_file():
                    continue
                result = run_row(name, seed, a, base, base_steps, lr)
                table.setdefault(name, {})[seed] = row_metrics(result)
                if not table["stage1"]:
                    b = [e for e in result["evals"] if e.get("stage") == 2][0]   # the guard's baseline: Stage 1
                    table["stage1"][0] = {"oracle": b.get("oracle"), "lrm": None, "fd": b["fd"],
                                          "alignment": b["alignment"], "diversity": b["diversity"]}
        tables[lr or "config"] = table
        print(f"RL step size {lr or 'as configured'}")
        print(f"{'row':12s} " + " ".join(f"{c:>16s}" for c in COLUMNS))
        for name, seeds in table.items():
            cells = []
            for c in COLUMNS:
                vals = [m[c] for m in seeds.values() if m.get(c) is not None]
                cells.append(" / ".join(f"{v:.3f}" for v in vals) if vals else "-")
            print(f"{name:12s} " + " ".join(f"{x:>16s}" for x in cells), flush=True)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = tables if a.rl_lrs else tables["config"]
    tmp = out / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2))
    os.replace(tmp, out / "summary.json")
    if a.plot:
        plot_frontier(tables, a.plot, a.title)
    return 0


if __name__ == "__main__":
    sys.exit(main())
