"""Is it Flash-DMD or the discriminator? The pre-registered comparison of BENCHMARKS.md section 3a (issue 33).

Every row is one `flashdmd distill` run of a shipped world preset plus the row's overrides, at one training seed, for
the same compute: the family's budget B in DMD2-update equivalents (seconds per generator update of the shipped DMD2,
measured with every row in one process: `cost`), so a row that is cheaper per update runs more updates. A run
evaluates its student on the *val* prompt split (training templates; N = 300, noise seed 0) 16 times and keeps each
new best student (eval_keep_students: improved). At each comparison point (B/4, B/2, B) the student with the lowest
val FD so far is chosen and scored on the *test* split (held-out templates) with N = 1 000 at noise seeds 1, 2, 3;
that mean is the row's figure at that point. Nothing on the test split is seen before the choice.

    # 1. seconds per generator update of every row, in one process (fixes each row's number of updates)
    .venv/bin/python benchmarks/attribution.py cost --family sdxl
    # 2. DMD2's tuning sweep (tuning seed 100, half the budget; its best is the row dmd2_best)
    .venv/bin/python benchmarks/attribution.py run --family sdxl --rows SWEEP --seeds 100 --fraction 0.5
    # 3. the rows, three training seeds (two lanes: two invocations with disjoint --rows / --seeds)
    .venv/bin/python benchmarks/attribution.py run --family sdxl --rows preset dmd2 --seeds 0 1 2
    # 4. the tables (benchmarks/tables.py reads benchmarks/results/attribution.json) and the figures
    .venv/bin/python benchmarks/attribution.py figure --family sdxl          # docs/figures/attribution_sdxl.png
    .venv/bin/python benchmarks/attribution.py figure --family sdxl --sweep  # docs/figures/attribution_sweep.png

Each finished run is scored and lands in --results (default benchmarks/results/attribution.json) as one record
(row, teacher, seed, its val curve, its compute in three units, the three points); rows whose record is there are
skipped, and an interrupted run resumes from its newest checkpoint (every evaluation writes one).
"""
import argparse
import datetime
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import add_threads_arg, check_own_flashdmd, git_commit, parse, pyplot, run_distill_row  # noqa: E402

# the budget B in generator updates of the shipped DMD2 (TTUR 5); the comparison points are these fractions of it
BUDGET = {"sdxl": 600, "sd3": 480}  # world-sd3: 160 until 2026-12-07, raised before any world-sd3 run (BENCHMARKS 3a)
POINTS = (0.25, 0.5, 1.0)
EVALS = 16                      # val-split evaluations per run (every point is one of them)
VAL_IMAGES, TEST_IMAGES, TEST_SEEDS = 300, 1000, (1, 2, 3)
BATCH = 32
TUNING_SEED = 100
# the text-conditioned pooled Pixel-GAN head of the shipped preset, whole: its encoder, head, loss, rates and weights
HEAD = {"disc_kind": "pixel", "disc_backbone": "world", "disc_head": "pooled", "disc_head_channels": 256,
        "disc_condition": "text", "disc_loss": "hinge", "disc_lr": 1e-3, "disc_gen_weight": 0.05, "disc_weight": 1.0}
# row -> (preset, overrides); a preset is configs/world_<family>_<preset>.yaml
ROWS = {
    "preset": ("flashdmd", {}),
    "dmd2": ("dmd2", {}),
    "dmd2_head": ("dmd2", dict(HEAD)),                          # the paper's "+A": DMD2 given the preset's head
    "preset_routing_off": ("flashdmd", {"student_dm_steps": 4}),  # DM loss (and the head) at every student step
    "preset_pull_off": ("flashdmd", {"fake_score_ema": 0.0}),   # no EMA pull of the fake score toward the student
    "preset_ttur5": ("flashdmd", {"fake_score_ttur": 5}),       # DMD2's five critic updates per generator update
}
# DMD2's tuning sweep: its own code's optimiser (Adam beta1 0.9, equal generator / critic rates, a warm-up counted
# in iterations) and its GAN weight, around the shipped DMD2 (beta1 0, rates 5e-5 / 2e-4)
SWEEP = {
    "sweep_b09": {"optim_betas": [0.9, 0.999]},
    "sweep_b09_eq_lo": {"optim_betas": [0.9, 0.999], "fake_score_lr": 5e-5},
    "sweep_b09_eq_hi": {"optim_betas": [0.9, 0.999], "student_lr": 2e-4},
    "sweep_b09_eq_lo_warm": {"optim_betas": [0.9, 0.999], "fake_score_lr": 5e-5, "optim_warmup_steps": 100},
    "sweep_b09_eq_hi_warm": {"optim_betas": [0.9, 0.999], "student_lr": 2e-4, "optim_warmup_steps": 100},
    "sweep_gan_2x": {"disc_gen_weight": 1e-2, "disc_weight": 2e-2},
}
ROWS.update({name: ("dmd2", o) for name, o in SWEEP.items()})
# rows resolved from the sweep's winner: dmd2_best (pre-registered) and, added after fixing (BENCHMARKS 3a, before any
# of its runs), dmd2_best_head: the winner's optimiser with the preset's head, TTUR 5 -- DMD2 both tuned and given it
FROM_SWEEP = ("dmd2_best", "dmd2_best_head")
# a row not timed by `cost` costs what the row with its networks and TTUR does (its optimiser changes no update's work)
COST_AS = {"dmd2_best_head": "dmd2_head"}
# each row's name in the tables (benchmarks/tables.py) and the figures, in their order: the one list of the rows
LABELS = {"preset": "Flash-DMD preset", "dmd2": "DMD2 as shipped", "dmd2_best": "DMD2, best of its sweep",
          "dmd2_head": "DMD2 + the preset's head", "preset_routing_off": "preset, routing off",
          "preset_pull_off": "preset, pull off", "preset_ttur5": "preset, TTUR 5",
          "dmd2_best_head": "DMD2, best of its sweep + the head (added)"}


def cost_file(family: str) -> Path:
    return ROOT / "benchmarks" / "results" / f"attribution_cost_{family}.json"


def row_spec(row: str, results: list[dict], family: str) -> tuple[str, dict]:
    """(preset, overrides) of a row; dmd2_best is the sweep row with the lowest val FD on world-sdxl, dmd2_best_head
    that row with the preset's head."""
    if row not in FROM_SWEEP:
        return ROWS[row]
    best = sweep_winner(results)
    if best is None:
        raise SystemExit(f"{row}: the DMD2 sweep on world-sdxl has not finished (run `attribution.py run --rows "
                         "SWEEP --seeds 100 --fraction 0.5` first)")
    preset, overrides = ROWS[best]
    return (preset, {**overrides, **HEAD}) if row == "dmd2_best_head" else (preset, overrides)


def row_cost(cost: dict, row: str) -> dict:
    """A row's entry of the cost file: its own, else COST_AS's, else the shipped DMD2's (dmd2_best, the sweep rows)."""
    return cost.get(COST_AS.get(row, row), cost["dmd2"])


def sweep_winner(results: list[dict]) -> str | None:
    """The pre-registered choice: among the shipped DMD2 and the sweep rows run on world-sdxl at the tuning seed, the
    lowest val FD of the best kept student (half the budget); None until every one of them has a record."""
    names = ["dmd2", *SWEEP]
    got = {r["row"]: r for r in results if r["teacher"] == "world-sdxl" and r["seed"] == TUNING_SEED}
    if any(n not in got for n in names):
        return None
    return min(names, key=lambda n: min(p[1] for p in got[n]["val_curve"] if p[0] > 0))


def measured_cost(family: str) -> dict:
    path = cost_file(family)
    if not path.is_file():
        raise SystemExit(f"{path} is missing: run `attribution.py cost --family {family}` first (it fixes each row's "
                         "number of generator updates)")
    return json.loads(path.read_text())["rows"]


def row_steps(row: str, family: str, fraction: float = 1.0) -> tuple[int, int]:
    """(generator updates, evaluation interval) of a row at ``fraction`` of the budget: the budget's seconds over
    the row's seconds per update (dmd2_best and the sweep rows cost what the shipped DMD2 does: the same networks and
    TTUR), rounded to a multiple of EVALS so that every comparison point is an evaluation."""
    cost = measured_cost(family)
    per = row_cost(cost, row)["seconds_per_generator_update"]
    updates = BUDGET[family] * fraction * cost["dmd2"]["seconds_per_generator_update"] / per
    every = max(1, round(updates / EVALS))
    return every * EVALS, every


def load_results(path: Path) -> list[dict]:
    return json.loads(path.read_text())["records"] if path.is_file() else []


def save_record(path: Path, record: dict) -> None:
    """Replace (row, teacher, seed)'s record in the results file, atomically, under a lock (two lanes share it)."""
    import fcntl
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        records = [r for r in load_results(path)
                   if (r["row"], r["teacher"], r["seed"]) != (record["row"], record["teacher"], record["seed"])]
        records.append(record)
        records.sort(key=lambda r: (r["teacher"], r["row"], r["seed"]))
        body = {"protocol": protocol(), "records": records}
        with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as f:
            f.write(json.dumps(body, indent=1))
        os.replace(f.name, path)


def protocol() -> dict:
    return {"budget_dmd2_updates": BUDGET, "points": POINTS, "evals_per_run": EVALS, "val_images": VAL_IMAGES,
            "test_images": TEST_IMAGES, "test_seeds": TEST_SEEDS, "batch": BATCH, "tuning_seed": TUNING_SEED,
            "selection": "lowest val-split FD (N 300, noise seed 0) among the evaluations up to the point",
            "figure": "mean test-split FD (N 1000) over noise seeds 1, 2, 3 of the chosen student"}


def score(folder: Path, evals: list[dict], steps: int, fractions, label: str) -> list[dict]:
    """Each comparison point: the kept student with the lowest val FD so far, scored on the test split."""
    from flashdmd.inference import load_model
    from flashdmd.world.plugin import WorldEvaluator
    points, cache = [], {}
    for frac in fractions:
        limit = round(steps * frac)
        upto = [e for e in evals if e["generator_steps"] <= limit]
        chosen = min(upto, key=lambda e: e["fd"])
        step = chosen["step"]
        if step not in cache:
            student = folder / "students" / f"step_{step:08d}"
            model = load_model(str(student))
            runs = []
            for s in TEST_SEEDS:
                done = student / f"test_seed{s}.json"
                if not done.is_file():
                    m = WorldEvaluator(TEST_IMAGES, split="test").evaluate(model, seed=s)
                    done.write_text(json.dumps(m))
                runs.append(json.loads(done.read_text()))
            cache[step] = runs
            shown = " / ".join(f"{r['fd']:.2f}" for r in runs)
            print(f"{label}: student of step {step} (val FD {chosen['fd']:.2f}): test FD {shown}", flush=True)
        runs = cache[step]
        fds = [r["fd"] for r in runs]
        points.append({"fraction": frac, "generator_steps": limit, "selected_step": step,
                       "selected_generator_steps": chosen["generator_steps"], "val_fd": chosen["fd"],
                       "test_fd": fds, "test_fd_mean": sum(fds) / len(fds),
                       "test_alignment_mean": sum(r["alignment"] for r in runs) / len(runs),
                       "test_diversity_mean": sum(r["diversity"] for r in runs) / len(runs)})
    return points


def run_one(row: str, seed: int, a, results_path: Path) -> None:
    teacher = f"world-{a.family}"
    if any((r["row"], r["teacher"], r["seed"]) == (row, teacher, seed) for r in load_results(results_path)):
        print(f"{row} {teacher} seed {seed}: recorded", flush=True)
        return
    preset, overrides = row_spec(row, load_results(results_path), a.family)
    steps, every = row_steps(row, a.family, a.fraction)
    folder = Path(a.out) / a.family / row / f"seed{seed}"
    ns = argparse.Namespace(eval_every=every, num_images=VAL_IMAGES, batch=BATCH, no_progress=a.no_progress,
                            set=["eval_split=val", "eval_keep_students=improved", f"run_checkpoint_every_steps={every}",
                                 "run_checkpoint_keep_last=1", *a.set])
    label = f"{row} {teacher} seed {seed}"
    t0 = time.time()
    result = run_distill_row(label, ROOT / "configs" / f"world_{a.family}_{preset}.yaml", overrides, folder, ns,
                             steps, seed)
    evals = [e for e in result["evals"] if e["stage"] == 1]
    fractions = POINTS if a.fraction == 1.0 else (1.0,)
    cost = measured_cost(a.family)
    per = row_cost(cost, row)["seconds_per_generator_update"]
    ttur = {**_preset_ttur(preset), **overrides}.get("fake_score_ttur")
    record = {"row": row, "teacher": teacher, "seed": seed, "preset": f"world_{a.family}_{preset}.yaml",
              "overrides": overrides, "resolved_from": sweep_winner(load_results(results_path))
              if row in FROM_SWEEP else None, "budget_fraction": a.fraction, "generator_steps": steps,
              "eval_every": every,
              "val_curve": [(e["generator_steps"], round(e["fd"], 4), round(e["alignment"], 4)) for e in evals],
              "compute": {"images_per_update": BATCH, "critic_iterations_per_update": ttur,
                          "seconds_per_update": per, "images": steps * BATCH, "critic_iterations": steps * ttur,
                          "seconds": steps * per, "seconds_from": cost_file(a.family).name},
              "points": score(folder, evals, steps, fractions, label),
              "wall_seconds": time.time() - t0, "commit": git_commit(ROOT), "date": datetime.date.today().isoformat()}
    save_record(results_path, record)
    print(f"{label}: recorded in {results_path}", flush=True)


def _preset_ttur(preset: str) -> dict:
    return {"fake_score_ttur": 5 if preset == "dmd2" else 2}  # the shipped world presets' TTUR


def measure_cost(a) -> None:
    """Seconds per generator update of every row (the sweep rows and dmd2_best cost what dmd2 does), interleaved in
    rounds in one process (benchmarks/step_cost.py's method), with images and critic iterations per update."""
    from step_cost import time_rows
    names = a.rows or list(ROWS)[:6]
    specs = {n: (ROOT / "configs" / f"world_{a.family}_{ROWS[n][0]}.yaml", ROWS[n][1]) for n in names}
    runs = time_rows(specs, BATCH, a.updates, a.rounds)
    rows = {}
    for name, (ttur, times) in runs.items():
        s = sorted(times)[len(times) // 2]
        rows[name] = {"critic_iterations_per_update": ttur, "images_per_update": BATCH,
                      "seconds_per_generator_update": s, "rounds": times}
        print(f"{name:20s} TTUR {ttur}: {s:.2f} s per generator update (median of {len(times)} rounds)", flush=True)
    d = rows["dmd2"]["seconds_per_generator_update"]
    for r in rows.values():
        r["relative_to_dmd2"] = r["seconds_per_generator_update"] / d
    body = {"family": a.family, "batch_size": BATCH, "threads": a.threads, "commit": git_commit(ROOT),
            "date": datetime.date.today().isoformat(), "rows": rows}
    cost_file(a.family).write_text(json.dumps(body, indent=2))


def figure_series(records: list[dict], teacher: str, sweep: bool = False) -> dict:
    """What the figure draws, per row of one teacher (the reported seeds, or with ``sweep`` the tuning seed's rows):
    "val": [(CPU hours, mean val FD, min, max)] over the seeds at each evaluation, "test": [(CPU hours, mean test FD,
    sd)] at the comparison points. CPU hours = generator updates x the row's measured seconds per update / 3600."""
    out = {}
    rows = ["dmd2", *SWEEP] if sweep else list(LABELS)
    for row in rows:
        rs = [r for r in records if r["teacher"] == teacher and r["row"] == row
              and (r["seed"] == TUNING_SEED) == sweep]
        if not rs:
            continue
        per = rs[0]["compute"]["seconds_per_update"] / 3600
        steps = sorted(set.intersection(*({p[0] for p in r["val_curve"]} for r in rs)))
        val = []
        for st in steps:
            fds = [next(p[1] for p in r["val_curve"] if p[0] == st) for r in rs]
            val.append((st * per, sum(fds) / len(fds), min(fds), max(fds)))
        test = []
        for k in range(min(len(r["points"]) for r in rs)):
            fds = [r["points"][k]["test_fd_mean"] for r in rs]
            m = sum(fds) / len(fds)
            sd = (sum((x - m) ** 2 for x in fds) / (len(fds) - 1)) ** 0.5 if len(fds) > 1 else 0.0
            test.append((rs[0]["points"][k]["generator_steps"] * per, m, sd))
        out[row] = {"seeds": sorted(r["seed"] for r in rs), "val": val, "test": test}
    return out


def draw_figure(series: dict, teacher: str, path: Path, sweep: bool = False) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 1 if sweep else 2, figsize=(6 if sweep else 11, 4), dpi=110, squeeze=False)
    for i, (row, s) in enumerate(series.items()):
        colour = f"C{i}"
        label = f"{LABELS.get(row, row)} ({len(s['seeds'])} seed{'s' * (len(s['seeds']) > 1)})"
        x, m, lo, hi = zip(*s["val"])
        axes[0][0].plot(x, m, color=colour, label=label, lw=1.2)
        axes[0][0].fill_between(x, lo, hi, color=colour, alpha=0.15, lw=0)
        if not sweep and s["test"]:
            tx, tm, tsd = zip(*s["test"])
            axes[0][1].errorbar(tx, tm, yerr=tsd, color=colour, marker="o", ms=4, capsize=3, label=label)
    axes[0][0].set(xlabel="CPU hours (1 thread)", ylabel="val FD (N 300, noise seed 0)",
                   title=f"{teacher}: val FD while training" + (" (DMD2 sweep, seed 100)" if sweep else ""))
    if not sweep:
        axes[0][1].set(xlabel="CPU hours (1 thread): B/4, B/2, B", ylabel="test FD (N 1000, noise seeds 1-3)",
                       title="chosen on val, scored on test (mean ± sd over seeds)")
    axes[0][0].legend(fontsize=7)
    for ax in axes[0]:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["cost", "run", "figure"])
    p.add_argument("--family", choices=["sdxl", "sd3"], default="sdxl")
    p.add_argument("--rows", nargs="+", default=[], help=f"rows: {', '.join([*ROWS, *FROM_SWEEP])}; SWEEP = the "
                   "DMD2 sweep's rows and dmd2")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--fraction", type=float, default=1.0, help="of the budget (the sweep runs at 0.5)")
    p.add_argument("--updates", type=int, default=2, help="cost: generator updates per row per round")
    p.add_argument("--rounds", type=int, default=3, help="cost: rounds")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "runs" / "attribution"), help="run folders")
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / "attribution.json"))
    p.add_argument("--set", action="append", default=[], help="extra key=value for every row (not for figures)")
    p.add_argument("--plot", default=None, help="figure: the PNG (default docs/figures/attribution_<family>.png, "
                   "with --sweep attribution_sweep.png)")
    p.add_argument("--sweep", action="store_true", help="figure: the DMD2 sweep's rows at the tuning seed")
    p.add_argument("--no-progress", action="store_true")
    add_threads_arg(p)
    a = parse(p)
    if a.what != "figure":
        check_own_flashdmd()  # the records' commit is this checkout's: the code that runs must be too
    if a.what == "cost":
        measure_cost(a)
        return 0
    if a.what == "figure":
        teacher = f"world-{a.family}"
        plot = Path(a.plot or ROOT / "docs" / "figures" / f"attribution_{'sweep' if a.sweep else a.family}.png")
        series = figure_series(load_results(Path(a.results)), teacher, a.sweep)
        if not series:
            raise SystemExit(f"{a.results} has no {teacher} record {'at the tuning seed ' if a.sweep else ''}yet")
        draw_figure(series, teacher, plot, a.sweep)
        print(f"wrote {plot} ({', '.join(series)})")
        return 0
    rows = [r for name in a.rows for r in (["dmd2", *SWEEP] if name == "SWEEP" else [name])]
    unknown = [r for r in rows if r not in ROWS and r not in FROM_SWEEP]
    if unknown:
        p.error(f"unknown row {unknown[0]}")
    for seed in a.seeds:
        for row in rows:
            run_one(row, seed, a, Path(a.results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
