"""What decides Flash-DMD's convergence: a one-factor-at-a-time sweep around a base setting (issue 16, item 2).

Each row is one `flashdmd distill` run from the family's Flash-DMD preset plus the base overrides plus the row's
own, evaluated every --eval-every generator steps (FD / alignment / diversity, N = --num-images, the fixed
held-out prompt set). Rows whose folder already holds metrics.json are read, not rerun, so an interrupted sweep
resumes row by row; two invocations with disjoint --rows can share one --out (two lanes on two cores).

    .venv/bin/python benchmarks/sweep.py --family sdxl --steps 200 --rows base glr_2x flr_2x \\
        --out benchmarks/runs/sweep_sdxl
    .venv/bin/python benchmarks/sweep.py --family sdxl --no-run --out benchmarks/runs/sweep_sdxl \\
        --target-run benchmarks/runs/dmd2_sdxl/dmd2

Rows are ROW_OVERRIDES' keys; a row runs at --seed (folder OUT/<row>/seed<N>). The base is the best setting
measured before the sweep (BENCHMARKS.md section 3: TTUR 2 with the pooled Pixel-GAN head, width 256, lr 1e-3).
The screen score of a run is the mean FD of its last three evaluations (one evaluation moves by +-2-3 at
N = 300; the mean of three by less); best FD and the first evaluation at or below a target (DMD2's best, read
from --target-run's metrics.json) are reported too, and compute = generator updates x seconds per generator
update of the row's TTUR (benchmarks/results/step_cost_<family>.json, measured in one process).

Writes OUT/summary.json (atomically; every run found under OUT) and, with --plot, a figure of every curve.
"""
import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import add_run_args, parse, pyplot, run_distill_row  # noqa: E402

# explicit in every field a row varies, so that a row means the same whatever the preset says
BASE = {"fake_score_ttur": 2, "disc_head": "pooled", "disc_head_channels": 256, "disc_lr": 1e-3,
        "generator_lr": 5e-5, "fake_score_lr": 2e-4, "fake_score_ema": 0.999, "disc_gen_weight": 0.05,
        "dm_t_min": 0.02, "dm_t_max": 0.98, "optim_lr_decay": "none", "optim_betas": [0.0, 0.999],
        "disc_condition": "none"}
ROW_OVERRIDES = {
    "base": {},
    # learning rates (presets: generator 5e-5, fake score 2e-4, heads 1e-3 in the base)
    "glr_2x": {"generator_lr": 1e-4},
    "glr_half": {"generator_lr": 2.5e-5},
    "flr_2x": {"fake_score_lr": 4e-4},
    "lr_2x": {"generator_lr": 1e-4, "fake_score_lr": 4e-4},
    "flr_4x": {"fake_score_lr": 8e-4},
    # second round: combinations around the first round's best factor (fake-score lr 4e-4)
    "flr_2x_ttur_1": {"fake_score_lr": 4e-4, "fake_score_ttur": 1},
    "flr_4x_ttur_1": {"fake_score_lr": 8e-4, "fake_score_ttur": 1},
    "flr_2x_glr_half": {"fake_score_lr": 4e-4, "generator_lr": 2.5e-5},
    "dlr_3e-4": {"disc_lr": 3e-4},
    "dlr_3e-3": {"disc_lr": 3e-3},
    # the fake score's EMA pull toward the student (fake <- lam fake + (1 - lam) student after each generator step)
    "pull_0.99": {"fake_score_ema": 0.99},
    "pull_0.9999": {"fake_score_ema": 0.9999},
    "pull_off": {"fake_score_ema": 0.0},
    # fake-score updates per generator update
    "ttur_1": {"fake_score_ttur": 1},
    "ttur_3": {"fake_score_ttur": 3},
    # the generator's GAN weight (preset 0.05)
    "gan_0.02": {"disc_gen_weight": 0.02},
    "gan_0.15": {"disc_gen_weight": 0.15},
    "gan_off": {"disc_gen_weight": 0.0},  # DM only (the head still trains, so its D gap stays logged)
    # the DM loss's noise range (DMD2: 0.02..0.98) and, for flow teachers, shifted or uniform sigma
    "dm_t_min_0.2": {"dm_t_min": 0.2},
    "dm_t_max_0.8": {"dm_t_max": 0.8},
    "dm_unshifted": {"dm_t_shifted": False},
    # timestep-aware routing off: DM (and the Pixel-GAN) at every student step, the last one included -- on SD3's
    # shifted schedule the GAN-only last step starts from sigma 0.5 and the DM steps only see sigma >= 0.75
    "dm_all": {"student_dm_steps": 4},
    # the optimiser: a cosine decay of every Stage-1 rate to 10 % at the run's last step; Adam's momentum as DMD2's
    # code has it (beta1 0.9; the world presets use 0)
    "lr_cosine": {"optim_lr_decay": "cosine", "optim_lr_final": 0.1},
    "betas_0.9": {"optim_betas": [0.9, 0.999]},
    # the critic side: a text-conditioned Pixel-GAN head (projection on the pooled text embedding; DMD2's latent GAN
    # is conditioned through the fake score) and DMD2's five fake-score updates per generator update
    "cond_gan": {"disc_condition": "text"},
    "ttur_5": {"fake_score_ttur": 5},
    # the paper's patch heads (its Pixel-GAN as far as stated), at the preset's head lr
    "patch": {"disc_head": "patch", "disc_head_channels": 64, "disc_lr": 1e-4},
}


def ttur_of(row: str) -> int:
    return {**BASE, **ROW_OVERRIDES[row]}["fake_score_ttur"]


def run(row: str, seed: int, a, out: Path) -> dict:
    return run_distill_row(f"{row} seed {seed}", ROOT / "configs" / f"world_{a.family}_flashdmd.yaml",
                           {**BASE, **ROW_OVERRIDES[row]}, out / row / f"seed{seed}", a, a.steps, seed)


def seconds_per_update(family: str) -> dict:
    path = ROOT / "benchmarks" / "results" / f"step_cost_{family}.json"
    if not path.is_file():
        return {}
    rows = json.loads(path.read_text())["rows"]
    return {int(v["ttur"]): v["seconds_per_generator_update"] for k, v in rows.items() if k.startswith("flash_ttur")}


def summarise_run(metrics: dict, target: float | None, per_update: float | None) -> dict:
    ev = [e for e in metrics["evals"] if e["generator_steps"] > 0]
    last = ev[-3:]
    best = min(ev, key=lambda e: e["fd"])
    reach = next((e["generator_steps"] for e in ev if target is not None and e["fd"] <= target), None)
    return {"steps": ev[-1]["generator_steps"], "last3_mean_fd": sum(e["fd"] for e in last) / len(last),
            "best_fd": best["fd"], "best_at_steps": best["generator_steps"], "final_fd": ev[-1]["fd"],
            "final_alignment": ev[-1]["alignment"], "steps_to_target": reach,
            "compute_to_target_s": None if reach is None or per_update is None else reach * per_update,
            "curve": [(e["generator_steps"], round(e["fd"], 3), round(e["alignment"], 3)) for e in metrics["evals"]]}


def summarise(out: Path, a) -> dict:
    target, target_curve, more_curves = None, None, []
    for k, t in enumerate(map(Path, a.target_run or [])):
        # a run folder, or a JSON with its "evals" (benchmarks/results/*.json); the first is the target
        t_ev = json.loads((t / "metrics.json" if t.is_dir() else t).read_text())["evals"]
        curve = [(e["generator_steps"], round(e["fd"], 3)) for e in t_ev]
        if k == 0:
            target, target_curve = min(e["fd"] for e in t_ev if e["generator_steps"] > 0), curve
        else:
            more_curves.append(curve)
    cost = seconds_per_update(a.family)
    runs = {}
    for m in sorted(out.glob("*/seed*/metrics.json")):
        row, seed = m.parent.parent.name, m.parent.name
        if row not in ROW_OVERRIDES:
            continue
        runs.setdefault(row, {})[seed] = summarise_run(json.loads(m.read_text()), target, cost.get(ttur_of(row)))
    summary = {"family": a.family, "base": BASE, "target_fd": target, "target_run": a.target_run,
               "target_curve": target_curve, "other_target_curves": more_curves,
               "rows": {r: {"overrides": ROW_OVERRIDES[r], "seeds": s,
                            "last3_mean_fd_mean": sum(v["last3_mean_fd"] for v in s.values()) / len(s)}
                        for r, s in runs.items()}}
    tmp = out / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2))
    tmp.replace(out / "summary.json")
    for r, s in sorted(summary["rows"].items(), key=lambda kv: kv[1]["last3_mean_fd_mean"]):
        for seed, v in s["seeds"].items():
            print(f"{r:14s} {seed}: last-3 mean {v['last3_mean_fd']:6.2f}  best {v['best_fd']:6.2f} "
                  f"@{v['best_at_steps']}  final {v['final_fd']:6.2f}  to target: {v['steps_to_target']}", flush=True)
    return summary


def plot(summary: dict, path: Path, title: str | None = None):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9, 5))
    for i, (r, s) in enumerate(summary["rows"].items()):
        for j, (seed, v) in enumerate(s["seeds"].items()):
            c = v["curve"]
            ax.plot([p[0] for p in c], [p[1] for p in c], color=f"C{i % 10}", ls=["-", "--", ":"][j % 3],
                    label=f"{r} {seed}")
    if summary["target_fd"] is not None:
        ax.axhline(summary["target_fd"], color="grey", ls=":", lw=1)
        c = summary["target_curve"]
        ax.plot([p[0] for p in c], [p[1] for p in c], color="black", lw=2, alpha=0.5, label="target run (DMD2)")
        for c in summary.get("other_target_curves", []):
            ax.plot([p[0] for p in c], [p[1] for p in c], color="black", lw=2, alpha=0.5, ls="--",
                    label="DMD2, another seed")
    ax.set(xlabel="generator steps", ylabel="FD (lower is better)",
           ylim=(5, 30) if summary["family"] == "sdxl" else (10, 50),
           title=title or f"world-{summary['family']}: Flash-DMD, one factor at a time around TTUR 2 + pooled head")
    ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", choices=["sdxl", "sd3"], default="sdxl")
    p.add_argument("--rows", nargs="+", default=[], choices=list(ROW_OVERRIDES))
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--target-run", nargs="+", help="DMD2 run folders or JSONs holding their evals (e.g. "
                   "benchmarks/results/dmd2_sdxl_seed0.json): the first one's best FD is the target; "
                   "the others are drawn too (other seeds)")
    p.add_argument("--plot", help="write a figure of every curve here")
    p.add_argument("--title", help="the figure's title")
    p.add_argument("--no-run", action="store_true", help="only summarise the runs under --out")
    add_run_args(p)
    a = parse(p)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if not a.no_run:
        for row in a.rows:
            for seed in a.seeds:
                run(row, seed, a, out)
    summary = summarise(out, a)
    if a.plot:
        plot(summary, Path(a.plot), a.title)
    return 0


if __name__ == "__main__":
    sys.exit(main())
