"""The tables of BENCHMARKS.md, made from the result files in benchmarks/results/ and nothing else.

    python benchmarks/tables.py              # print every table (Markdown)
    python benchmarks/tables.py NAME ...     # print these tables
    python benchmarks/tables.py --list       # the tables' names
    python benchmarks/tables.py --write      # rewrite every table in BENCHMARKS.md and README.md in place
    python benchmarks/tables.py --check      # exit 1 when a table in either differs from what this makes

In BENCHMARKS.md (and in README.md, its headline: HOME names a table's document) a generated table sits between
``<!-- table: NAME -->`` and ``<!-- end table -->``; the block ends with the result files it was read from. Every
number in a table is read (or computed, as its header says) from those files: a number cannot drift from its
file, and a new result file changes the document only through this script. Pure JSON reading (no torch):
tests/test_benchmarks_doc.py runs --check.
"""
from __future__ import annotations

import argparse
import difflib
import json
import re
import statistics
import sys
from functools import lru_cache
from pathlib import Path

from flashdmd.training.config import RENAMED

sys.path.insert(0, str(Path(__file__).resolve().parent))  # loaded by path too (tests): its sibling modules
import attribution  # noqa: E402  (the attribution rows of section 3a: their names)

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
DOC = ROOT / "BENCHMARKS.md"
DOCS = (DOC, ROOT / "README.md")   # the documents with generated tables
BATCH = 32            # the world runs' batch: images seen / BATCH = generator steps (convergence.py's summaries)
TABLES: dict = {}     # name -> function returning (header, rows, source files, notes)


def table(name: str):
    def register(fn):
        TABLES[name] = fn
        return fn
    return register


def existing(*names: str) -> list[str]:
    """Those of the result files ``names`` that exist (a table's sources while its runs are still landing)."""
    return [x for x in names if (RESULTS / x).is_file()]


@lru_cache(maxsize=None)
def load(name: str):
    return json.loads((RESULTS / name).read_text())


def f(x, nd: int = 2) -> str:
    """A number as the tables print it: fixed decimals, "–" for a missing one."""
    return "–" if x is None else f"{x:.{nd}f}"


def pct(x: float) -> str:
    return f"{100 * x:.0f} %"


def mean(xs) -> float:
    return sum(xs) / len(xs)


# ---------------------------------------------------------------------------------------------------------------
# Curves: [(generator step, FD, alignment)] from each kind of result file

def evals_curve(evals) -> list[tuple]:
    """A run's metrics.json "evals" (or curves.py's), Stage 1 only."""
    return [(e["step"], e["fd"], e.get("alignment")) for e in evals if e.get("stage", 1) == 1]


def curve(file: str, *keys: str) -> list[tuple]:
    """The FD curve at file[keys...]: an "evals" list, a sweep seed's "curve" or convergence.py's "curve" by images."""
    node = load(file)
    for k in keys:
        node = node[k]
    if "evals" in node:
        return evals_curve(node["evals"])
    points = node["curve"]
    if points and isinstance(points[0], dict):        # convergence.py: images seen, batch 32
        return [(p["images"] // BATCH, p["fd"], p.get("alignment")) for p in points]
    return [(p[0], p[1], p[2] if len(p) > 2 else None) for p in points]


def at(c, step: int):
    return next((fd for s, fd, _ in c if s == step), None)


def best(c) -> tuple:
    s, fd, _ = min(c[1:] or c, key=lambda p: p[1])
    return s, fd


def last3(c) -> float:
    return mean([fd for _, fd, _ in c[-3:]])


def late(c, first: int) -> float:
    """Mean FD of the evaluations from step ``first`` on."""
    return mean([fd for s, fd, _ in c if s >= first])


def first_below(c, target: float):
    return next(((s, fd) for s, fd, _ in c if fd < target), (None, None))


def align_range(c) -> str:
    a = [al for s, _, al in c if s > 0 and al is not None]
    return f"{min(a):.3f}-{max(a):.3f}"


def best_cell(c) -> str:
    s, fd = best(c)
    return f"{fd:.2f} ({s})"


# ---------------------------------------------------------------------------------------------------------------
# The runs each table compares (file, keys, label)

PRESET_SDXL = [("preset_sdxl.json", ("cond_gan/seed0",), 0), ("preset_sdxl.json", ("cond_gan/seed1",), 1)]
DMD2_SDXL = [("dmd2_sdxl_seed0.json", (), 0), ("dmd2_sdxl_seed1.json", (), 1)]
PRESET_SD3 = [("preset_sd3_and_dmd2_sd3.json", ("seed0",), 0), ("preset_sd3_and_dmd2_sd3.json", ("seed1",), 1)]
DMD2_SD3 = [("preset_sd3_and_dmd2_sd3.json", ("dmd2",), 0)]
DMD2_SDXL_LATE_FROM = 650   # DMD2's late level on world-sdxl: the mean of its evaluations from 650 to 800 steps


def dmd2_best(runs) -> tuple:
    return best(curve(runs[0][0], *runs[0][1]))


@table("headline")
def headline():
    t = load("teachers.json")["rows"]
    fd = {(r["model"], r["steps"]): r["fd"] for r in t}
    demo = load("demo_seeds.json")
    speed = load("speed_cpu.json")
    vram = {(r["row"], r["batch"]): r for r in load("vram_table.json")["rows"]}
    lora = vram[("SDXL Flash-DMD LoRA 64", 1)]["single"]["peak_gib"]
    plan = [load(x)["plan"]["ratio_measured_over_planned"]["main_ru_maxrss_mib"]
            for x in ("plan_check_sdxl_bf16.json", "plan_check_sd3_bf16.json")]
    rows = [
        ["teachers (1)", f"4-step / 50-step FD: world-sdxl {fd[('world-sdxl', 4)]:.2f} / {fd[('world-sdxl', 50)]:.2f}, "
                         f"world-sd3 {fd[('world-sd3', 4)]:.2f} / {fd[('world-sd3', 50)]:.2f}"],
        *(["Stage 1 against the better DMD2, pre-registered, " + t + " (3a)", attribution_claim(t)]
          for t in ("world-sdxl", "world-sd3")),
        *(["Stage 1, the method or its head, pre-registered, " + t + " (3a)", attribution_head_claim(t)]
          for t in ("world-sdxl", "world-sd3")),
        ["Stage 2 (4)", "RL alone, joint and post-hoc RL move along one oracle-against-FD line on both teachers; "
                        "ongoing distillation shrinks RL's step and adds its own FD drift, it does not regularise"],
        ["the demo (5)", f"student FD {demo['student_fd_mean']:.2f} ± {demo['student_fd_sd']:.2f} over three seeds "
                         f"(teacher: {fd[('world-sdxl', 4)]:.2f} at 4 steps, {fd[('world-sdxl', 50)]:.2f} at 50); "
                         f"every target met: {'yes' if demo['all_targets_met'] else 'no'}"],
        ["speed, CPU (6)", f"4-step student {speed['speedup_vs_50_step_teacher']:.1f}x the 50-step teacher's images/s"],
        ["memory (8)", f"plan within {pct(max(plan) - 1)} of a measured full-size iteration (CPU); SDXL LoRA 64 at "
                       f"1024 px planned at {lora:.1f} GiB on one GPU (not measured on a GPU)"],
    ]
    return ["claim (section)", "current result"], rows, [
        "teachers.json", *existing("attribution.json"), "demo_seeds.json", "speed_cpu.json", "vram_table.json",
        "plan_check_sdxl_bf16.json", "plan_check_sd3_bf16.json"], []


# ---------------------------------------------------------------------------------------------------------------
# 1. Teachers

@table("teachers")
def teachers():
    d = load("teachers.json")
    rows = [[r["model"], r["steps"], r["nfe"], f(r["fd"]), f(r["alignment"], 3), f(r["diversity"], 3),
             f(r["oracle"]), f(r["seconds_per_image"], 4)] for r in d["rows"]]
    notes = [f"FD floor (300 train-split images against the test split): {d['fd_floor']:.2f}. "
             f"N = {d['num_images']} images per row, CFG {d['rows'][0]['cfg']:g}."]
    return (["teacher", "steps", "NFE", "FD ↓", "alignment ↑", "diversity", "oracle ↑", "s / image"], rows,
            ["teachers.json"], notes)


# ---------------------------------------------------------------------------------------------------------------
# 2. Stage 1: the preset's settings, one at a time (world-sdxl)

def seeds_cell(curves, fn) -> str:
    return " / ".join(fn(c) for c in curves)


@table("stage1_settings_sdxl")
def stage1_settings_sdxl():
    paper = [curve("flash_sdxl_450_metrics.json"), curve("flash_sdxl_seed1_metrics.json"),
             curve("flash_sdxl_seed2_metrics.json")]
    ttur2 = [curve("convergence_sdxl.json", "flash_ttur2")]
    pooled = [curve("issue16_base_long_sdxl.json", "rows", "base", "seeds", f"seed{s}") for s in (0, 1, 2)]
    preset = [curve(fl, *k) for fl, k, _ in PRESET_SDXL]
    dmd2 = [curve(fl, *k) for fl, k, _ in DMD2_SDXL]
    at300 = lambda c: f(at(c, 300))  # noqa: E731
    rows = [
        ["the paper's: TTUR 1, patch heads", "`world_sdxl_flashdmd_paper.yaml`", "0 / 1 / 2",
         seeds_cell(paper, at300), seeds_cell(paper, best_cell), "–", f"{paper[0][-1][0]} / 300 / 300"],
        ["TTUR 2, patch heads", "the paper's + `fake_score_ttur: 2`", "0", seeds_cell(ttur2, at300),
         seeds_cell(ttur2, best_cell), "–", f"{ttur2[0][-1][0]}"],
        ["TTUR 2, pooled head", "the sweep's `base` row", "0 / 1 / 2", seeds_cell(pooled, at300),
         seeds_cell(pooled, best_cell), seeds_cell(pooled, lambda c: f(last3(c))),
         " / ".join(str(c[-1][0]) for c in pooled)],
        ["**TTUR 2, text-conditioned pooled head (the preset)**", "`world_sdxl_flashdmd.yaml`", "0 / 1",
         seeds_cell(preset, at300), seeds_cell(preset, best_cell), seeds_cell(preset, lambda c: f(last3(c))),
         " / ".join(str(c[-1][0]) for c in preset)],
        ["DMD2, for reference (TTUR 5, latent GAN)", "`world_sdxl_dmd2.yaml`", "0 / 1", seeds_cell(dmd2, at300),
         seeds_cell(dmd2, best_cell), seeds_cell(dmd2, lambda c: f(late(c, DMD2_SDXL_LATE_FROM))),
         " / ".join(str(c[-1][0]) for c in dmd2)],
    ]
    notes = ["Late level: the mean FD of a run's last three evaluations; DMD2's: of its seven evaluations from "
             f"{DMD2_SDXL_LATE_FROM} to 800 steps. Best FD (generator step)."]
    return (["Pixel-GAN setting", "config", "seeds", "FD at 300 steps", "best FD (step)", "late level",
             "steps run"], rows,
            ["flash_sdxl_450_metrics.json", "flash_sdxl_seed1_metrics.json", "flash_sdxl_seed2_metrics.json",
             "convergence_sdxl.json", "issue16_base_long_sdxl.json", "preset_sdxl.json", "dmd2_sdxl_seed0.json",
             "dmd2_sdxl_seed1.json"], notes)


# ---------------------------------------------------------------------------------------------------------------
# 3. Stage 1: the preset against DMD2

def versus_rows(preset, dmd2, late_fn, dmd2_late_fn) -> list[list]:
    target_step, target = dmd2_best(dmd2)
    rows = []
    for label, runs, late_of in (("Flash-DMD preset", preset, late_fn), ("DMD2", dmd2, dmd2_late_fn)):
        for fl, keys, seed in runs:
            c = curve(fl, *keys)
            s, fd = first_below(c, target)
            below = "–" if label == "DMD2" else ("not reached" if s is None else f"{s} ({fd:.2f})")
            rows.append([label, seed, best_cell(c), below, f(late_of(c)), align_range(c), c[-1][0]])
    return rows


@table("stage1_vs_dmd2_sdxl")
def stage1_vs_dmd2_sdxl():
    s, target = dmd2_best(DMD2_SDXL)
    rows = versus_rows(PRESET_SDXL, DMD2_SDXL, last3, lambda c: late(c, DMD2_SDXL_LATE_FROM))
    notes = [f"DMD2's best single evaluation (seed 0): {target:.2f} at {s} steps. Late level: the preset's last three "
             f"evaluations (575-625 steps), DMD2's seven from {DMD2_SDXL_LATE_FROM} to 800."]
    return (["method", "seed", "best FD (step)", f"first below DMD2's best {target:.2f} (step, FD)", "late level",
             "alignment", "steps run"], rows, ["preset_sdxl.json", "dmd2_sdxl_seed0.json", "dmd2_sdxl_seed1.json"],
            notes)


@table("stage1_vs_dmd2_sd3")
def stage1_vs_dmd2_sd3():
    s, target = dmd2_best(DMD2_SD3)
    rows = versus_rows(PRESET_SD3, DMD2_SD3, last3, last3)
    notes = [f"DMD2's best: {target:.2f} at {s} steps, its last evaluation (still falling slowly). Late level: the "
             "mean of the last three evaluations. N = 200 images per evaluation (FD reads higher than at 300)."]
    return (["method", "seed", "best FD (step)", f"first below DMD2's best {target:.2f} (step, FD)", "late level",
             "alignment", "steps run"], rows, ["preset_sd3_and_dmd2_sd3.json"], notes)


def cost_ratio(family: str) -> float:
    """Seconds per generator update of the preset's Flash-DMD over DMD2's, measured in one process on 1 thread.
    world-sdxl: the pooled head's cost (step_cost_sdxl_pooled.json, against TTUR 2 with patch heads measured beside
    it) times TTUR 2's over DMD2's (step_cost_sdxl.json), the less favourable of the two measurements (the other,
    step_cost_sdxl_dmd2_faithful.json, gives 0.36). world-sd3: TTUR 2 with patch heads over DMD2, an upper bound
    (the pooled head is cheaper). The text projection is not timed separately (a dot product per image)."""
    if family == "sdxl":
        pooled = load("step_cost_sdxl_pooled.json")["rows"]
        base = load("step_cost_sdxl.json")["rows"]
        return (pooled["flash_ttur2_pooled_d"]["seconds_per_generator_update"]
                / pooled["flash_ttur2"]["seconds_per_generator_update"]
                * base["flash_ttur2"]["seconds_per_generator_update"] / base["dmd2"]["seconds_per_generator_update"])
    rows = load("step_cost_sd3.json")["rows"]
    return rows["flash_ttur2"]["seconds_per_generator_update"] / rows["dmd2"]["seconds_per_generator_update"]


def compute_rows() -> list[dict]:
    out = []
    for family, preset, dmd2 in (("sdxl", PRESET_SDXL, DMD2_SDXL), ("sd3", PRESET_SD3, DMD2_SD3)):
        target_step, target = dmd2_best(dmd2)
        r = cost_ratio(family)
        for fl, keys, seed in preset:
            s, fd = first_below(curve(fl, *keys), target)
            out.append({"family": family, "seed": seed, "step": s, "fd": fd, "target_step": target_step,
                        "target": target, "ratio": r, "images": s / target_step, "time": s * r / target_step})
    return out


@table("stage1_compute")
def stage1_compute():
    rows = [[f"world-{r['family']}", r["seed"], f"{r['step']} ({r['fd']:.2f})",
             f"{r['target_step']} ({r['target']:.2f})", pct(r["images"]), f"{r['ratio']:.2f}x", pct(r["time"])]
            for r in compute_rows()]
    notes = ["Images = generator steps x batch 32, the paper's unit (its 2.1 % is counted so). CPU time = steps x "
             "seconds per generator update, 1 thread, both methods measured in one process (`step_cost` table): on "
             "world-sdxl the pooled head's cost against TTUR 2 with patch heads times TTUR 2's against DMD2; on "
             "world-sd3 TTUR 2 with patch heads, an upper bound (the pooled head is cheaper). The text projection is "
             "not timed separately."]
    return (["teacher", "preset seed", "preset: first evaluation below DMD2's best (step, FD)",
             "DMD2's best (step, FD)", "images, preset / DMD2", "cost per step, preset / DMD2",
             "CPU time, preset / DMD2"], rows,
            ["preset_sdxl.json", "dmd2_sdxl_seed0.json", "preset_sd3_and_dmd2_sd3.json", "step_cost_sdxl.json",
             "step_cost_sdxl_pooled.json", "step_cost_sd3.json"], notes)


@table("step_cost")
def step_cost():
    files = [("step_cost_sdxl.json", "world-sdxl"), ("step_cost_sdxl_pooled.json", "world-sdxl"),
             ("step_cost_sdxl_dmd2_faithful.json", "world-sdxl"), ("step_cost_sd3.json", "world-sd3")]
    names = {"dmd2": "DMD2 (TTUR 5)", "flash_ttur1": "Flash-DMD TTUR 1, patch heads",
             "flash_ttur2": "Flash-DMD TTUR 2, patch heads", "flash_ttur2_pooled_d": "Flash-DMD TTUR 2, pooled head"}
    rows = []
    for fl, teacher in files:
        d = load(fl)["rows"]
        ref = d.get("dmd2", d.get("flash_ttur2"))["seconds_per_generator_update"]
        for key, r in d.items():
            rows.append([f"`{fl}`", teacher, names[key], f(r["seconds_per_generator_update"]),
                         f"{r['seconds_per_generator_update'] / ref:.3f}"])
    notes = ["Relative: to DMD2 in the same file (to TTUR 2 with patch heads in `step_cost_sdxl_pooled.json`, "
             "which has no DMD2 row). Batch 32, 1 thread, the median of three rounds; the files differ in how many "
             "other jobs shared the machine, so compare within a file."]
    return ["file", "teacher", "row", "s / generator update", "relative"], rows, [x for x, _ in files], notes


@table("eval_noise")
def eval_noise():
    d = load("eval_noise_teacher4.json")
    rows = []
    for n in sorted({r["num_images"] for r in d["rows"]}):
        runs = [r for r in d["rows"] if r["num_images"] == n]
        s = d[f"N{n}"]
        rows.append([n, " / ".join(str(r["eval_seed"]) for r in runs), " / ".join(f(r["fd"]) for r in runs),
                     f(s["mean"]), f(s["sd"])])
    notes = ["One fixed model, the world-sdxl teacher at 4 steps with CFG 2: the spread is the evaluation's own "
             "draw, without any training."]
    return ["images", "evaluation seeds", "FD", "mean", "sd"], rows, ["eval_noise_teacher4.json"], notes


@table("disc_probe")
def disc_probe():
    d = load("disc_probe.json")
    names = {"benchmarks/runs/convergence_sdxl/flash_ttur1": "Flash-DMD, TTUR 1, patch heads (450 steps)",
             "benchmarks/runs/convergence_sdxl/dmd2": "DMD2, old latent head (350 steps)"}
    rows = []
    for run, r in d["runs"].items():
        heads = {h["lr"]: h["final_test_accuracy"] for h in r["heads"]}
        var = {(v["head"], v["lr"]): v["test_accuracy"] for v in r["variants"]}
        rows.append([names.get(run, run), " / ".join(pct(heads[lr]) for lr in (1e-4, 1e-3)),
                     " / ".join(pct(var[("patch heads (as in a run)", lr)]) for lr in (1e-4, 1e-3)),
                     " / ".join(pct(var[("pooled standardised MLP", lr)]) for lr in (1e-4, 1e-3)),
                     pct(r["linear_probe_disc_encoder"]), pct(r["linear_probe_eval_classifier"])])
    notes = [f"Held-out accuracy at telling real from student images ({d['num']} of each, a quarter held out); "
             "heads at lr 1e-4 / 1e-3, trained as in a run (hinge loss, batch 32)."]
    header = ["student", "patch heads, 300 updates", "patch heads, 1 500 updates",
              "pooled standardised head, 300 updates", "linear probe, Pixel-GAN encoder",
              "linear probe, evaluation classifier"]
    return header, rows, ["disc_probe.json"], notes


# What did not work (section 3)

@table("convergence_paper")
def convergence_paper():
    rows = []
    for fl, teacher in (("convergence_sdxl.json", "world-sdxl"), ("convergence_sd3.json", "world-sd3")):
        d = load(fl)
        for key, r in d.items():
            if key.startswith("_"):
                continue
            c = curve(fl, key)
            rows.append([teacher, r["label"], r["critic_iterations"] // r["generator_steps"], r["generator_steps"],
                         best_cell(c), f(r["final_fd"]), f(r["final_alignment"], 3)])
        if fl == "convergence_sdxl.json":
            c = curve("convergence_sdxl_pooled_seed1.json", "flash_ttur2_pooled_d")
            r = load("convergence_sdxl_pooled_seed1.json")["flash_ttur2_pooled_d"]
            rows.append([teacher, r["label"] + ", seed 1", 2, r["generator_steps"], best_cell(c), f(r["final_fd"]),
                         f(r["final_alignment"], 3)])
    notes = ["Seed 0 unless stated; world-sdxl N = 300, world-sd3 N = 200. The DMD2 rows here have the old latent "
             "head (not DMD2's) and the DM-loss range 20..979; the faithful DMD2 is in the tables above."]
    return (["teacher", "row", "TTUR", "generator steps", "best FD (step)", "final FD", "final alignment"], rows,
            ["convergence_sdxl.json", "convergence_sd3.json", "convergence_sdxl_pooled_seed1.json"], notes)


def number_text(v) -> str:
    """A setting's value as a config file would say it: 3e-4, 2.5e-5, 0.15."""
    if isinstance(v, float) and 0 < abs(v) < 0.01:
        mantissa, exponent = f"{v:.1e}".split("e")
        return f"{mantissa.removesuffix('.0')}e{int(exponent)}"
    return f"{v:g}" if isinstance(v, float) else str(v)


def setting_name(key: str) -> str:
    """A setting as a config writes it today: result files made before the role prefixes keep the old field names
    (``generator_lr``), the tables show the new ones (``student_lr``; config.RENAMED)."""
    return re.sub(r"\b\w+\b", lambda m: RENAMED.get(m.group(0), m.group(0)), key, count=1)


def override_text(o: dict) -> str:
    return ", ".join(f"`{setting_name(k)}: {number_text(v)}`" for k, v in o.items()) or "–"


@table("sweep_sdxl")
def sweep_sdxl():
    d = load("sweep_sdxl.json")
    rows = []
    for name, r in d["rows"].items():
        for seed, s in r["seeds"].items():
            c = curve("sweep_sdxl.json", "rows", name, "seeds", seed)
            pts = [at(c, k) for k in (150, 175, 200)]
            rows.append([name, override_text(r["overrides"]), seed[4:], " / ".join(f(x) for x in pts), f(mean(pts)),
                         f(at(c, 100)), f(next(a for st, _, a in c if st == 200), 3)])
    c = curve("dmd2_sdxl_seed0.json")
    pts = [at(c, k) for k in (150, 175, 200)]
    rows.append(["DMD2 (reference)", "`world_sdxl_dmd2.yaml`", "0", " / ".join(f(x) for x in pts), f(mean(pts)),
                 f(at(c, 100)), f(next(a for st, _, a in c if st == 200), 3)])
    notes = [f"Base: {override_text(d['base'])}, the preset's other values. Score: the mean FD at 150, 175 and 200 "
             "steps."]
    return (["row", "change", "seed", "FD at 150 / 175 / 200", "mean", "FD at 100", "alignment at 200"], rows,
            ["sweep_sdxl.json", "dmd2_sdxl_seed0.json"], notes)


@table("long_runs_sdxl")
def long_runs_sdxl():
    base = "issue16_base_long_sdxl.json"
    stall = "sweep_sd3_stall_sdxl_lr.json"
    runs = [("TTUR 2, pooled head (base)", "–", base, lambda s: ("rows", "base", "seeds", f"seed{s}"), (0, 1, 2)),
            ("slower generator", "`student_lr: 2.5e-5`", base, lambda s: ("rows", "glr_half", "seeds", f"seed{s}"),
             (1,)),
            ("faster fake score", "`fake_score_lr: 4e-4`", "sweep_sdxl.json",
             lambda s: ("rows", "flr_2x", "seeds", f"seed{s}"), (0, 1)),
            ("cosine decay of every rate to 10 %", "`optim_lr_decay: cosine`", stall,
             lambda s: (f"sweep_sdxl/lr_cosine/seed{s}",), (0, 1, 2)),
            ("Adam beta1 0.9 (DMD2's)", "`optim_betas: [0.9, 0.999]`", stall,
             lambda s: (f"sweep_sdxl/betas_0.9/seed{s}",), (1,)),
            ("**text-conditioned head (the preset)**", "`disc_condition: text`", "preset_sdxl.json",
             lambda s: (f"cond_gan/seed{s}",), (0, 1))]
    rows = []
    for label, change, fl, keys, seeds in runs:
        for s in seeds:
            c = curve(fl, *keys(s))
            rows.append([label, change, s, f(at(c, 300)), best_cell(c), f(last3(c)), c[-1][0]])
    notes = ["All from the TTUR 2 pooled-head base (`benchmarks/sweep.py --family sdxl --rows ROW --seeds S --steps "
             "625`); late level = the mean of the last three evaluations."]
    return (["row", "change", "seed", "FD at 300", "best FD (step)", "late level", "steps run"], rows,
            ["issue16_base_long_sdxl.json", "sweep_sdxl.json", "sweep_sd3_stall_sdxl_lr.json", "preset_sdxl.json"],
            notes)


@table("sweep_sd3")
def sweep_sd3():
    runs = [("pooled head, TTUR 2 (base)", "–", "convergence_sd3.json", ("flash_ttur2_pooled_d",)),
            ("EMA pull off", "`fake_score_ema: 0`", "issue16_curves.json", ("sweep_sd3/pull_off/seed0",)),
            ("uniform DM-loss sigma", "`dm_t_shifted: false`", "issue16_curves.json",
             ("sweep_sd3/dm_unshifted/seed0",)),
            ("faster fake score", "`fake_score_lr: 4e-4`", "issue16_sd3.json", ("rows", "flr_2x", "seeds", "seed0")),
            ("TTUR 3", "`fake_score_ttur: 3`", "issue16_sd3.json", ("rows", "ttur_3", "seeds", "seed0")),
            ("TTUR 5", "`fake_score_ttur: 5`", "sweep_sd3_critic.json", ("sweep_sd3/ttur_5/seed0",)),
            ("DM at every step", "`student_dm_steps: 4`", "sweep_sd3_stall_sdxl_lr.json", ("sweep_sd3/dm_all/seed0",)),
            ("GAN weight 0.15", "`disc_gen_weight: 0.15`", "sweep_sd3_stall_sdxl_lr.json",
             ("sweep_sd3/gan_0.15/seed0",)),
            ("GAN weight 0.02", "`disc_gen_weight: 0.02`", "sweep_sd3_stall_sdxl_lr.json",
             ("sweep_sd3/gan_0.02/seed0",)),
            ("no generator GAN loss (DM only)", "`disc_gen_weight: 0`", "sweep_sd3_stall_sdxl_lr.json",
             ("sweep_sd3/gan_off/seed0",)),
            ("cosine decay to 10 % at 240", "`optim_lr_decay: cosine`", "sweep_sd3_stall_sdxl_lr.json",
             ("sweep_sd3/lr_cosine/seed0",)),
            ("**text-conditioned head (the preset)**", "`disc_condition: text`", "preset_sd3_and_dmd2_sd3.json",
             ("seed0",)),
            ("DMD2, old latent head (reference)", "–", "convergence_sd3.json", ("dmd2",)),
            ("DMD2, faithful (reference)", "–", "preset_sd3_and_dmd2_sd3.json", ("dmd2",))]
    rows = []
    for label, change, fl, keys in runs:
        c = curve(fl, *keys)
        rows.append([label, change, " / ".join(f(at(c, s), 1) for s in (64, 96, 128, 160)), best_cell(c), c[-1][0]])
    notes = ["Seed 0, N = 200, FD every 16 generator steps; \"–\": not evaluated there (the run stopped earlier). "
             "Rows other than the references start from the unconditional pooled head at TTUR 2."]
    return (["row", "change", "FD at 64 / 96 / 128 / 160", "best FD (step)", "steps run"], rows,
            sorted({r[2] for r in runs}), notes)


# ---------------------------------------------------------------------------------------------------------------
# 4. Stage 2: the RL frontier

def cell_mean(cell: dict) -> str:
    seeds = list(cell.values())
    w = sum(s.get("hacking_warnings", 0) for s in seeds)
    out = f"{mean([s['fd'] for s in seeds]):.2f} / {mean([s['oracle'] for s in seeds]):.3f}"
    return out + (f" ({w}w)" if w else "")


def cell_seeds(cell: dict) -> str:
    parts = []
    for s in cell.values():
        w = s.get("hacking_warnings", 0)
        parts.append(f"{s['fd']:.2f} / {s['oracle']:.3f}" + (f" ({w}w)" if w else ""))
    return " ; ".join(parts)


RL_LABELS = {"joint_5": "joint 5:1 (the paper's)", "no_distill": "RL alone", "kl_anchor": "RL alone + KL anchor (w 1)",
             "joint_1": "joint 1:1", "joint_2": "joint 2:1", "joint_10": "joint 10:1", "posthoc": "post-hoc",
             "all_steps": "joint 5:1, RL at 999/749/499", "distill_2": "**control: joint 2:1, no RL**",
             "distill_5": "**control: joint 5:1, no RL**", "posthoc_distill": "**control: post-hoc, no RL**"}


def frontier(fl: str, cell) -> tuple:
    d = load(fl)
    lrs = list(d)
    names = []
    for lr in lrs:
        names += [n for n in d[lr] if n != "stage1" and n not in names]
    order = [n for n in RL_LABELS if n in names]
    rows = [[RL_LABELS[n]] + [cell(d[lr][n]) if n in d[lr] else "–" for lr in lrs] for n in order]
    s1 = next(iter(d[lrs[0]]["stage1"].values()))
    note = f"Stage 1 (the base): FD {s1['fd']:.2f} / oracle {s1['oracle']:.3f}."
    return ["row"] + [f"lr {lr}" for lr in lrs], rows, [fl], [note]


@table("rl_frontier_sdxl_base0")
def rl_frontier_sdxl_base0():
    return frontier("rl_frontier_sdxl_base0.json", cell_mean)


@table("rl_frontier_sdxl_base1")
def rl_frontier_sdxl_base1():
    return frontier("rl_frontier_sdxl_base1.json", cell_mean)


@table("rl_frontier_sd3")
def rl_frontier_sd3():
    return frontier("rl_frontier_sd3.json", cell_seeds)


@table("rl_first_student")
def rl_first_student():
    a, b = load("rl_sdxl_lr2e-6.json"), load("rl_sdxl_lr2e-5.json")

    def cell(c):
        seeds = list(c.values())
        w = sum(s.get("hacking_warnings", 0) for s in seeds)
        return (f"{mean([s['oracle'] for s in seeds]):.3f} / {mean([s['fd'] for s in seeds]):.2f} / "
                f"{mean([s['diversity'] for s in seeds]):.3f}" + (f" ({w}w)" if w else ""))
    rows = [["Stage 1" if n == "stage1" else RL_LABELS[n], cell(a[n]), cell(b[n])] for n in a]
    notes = ["Cells: held-out oracle / FD / diversity, the mean of two Stage-2 seeds; (Nw): guard warnings in the two."]
    return (["row", "lr 2e-6, 40 RL updates", "lr 2e-5, 60 RL updates"], rows,
            ["rl_sdxl_lr2e-6.json", "rl_sdxl_lr2e-5.json"], notes)


# ---------------------------------------------------------------------------------------------------------------
# 5. The demo

@table("demo_seeds")
def demo_seeds():
    d = load("demo_seeds.json")
    rows = []
    for seed, r in d["seeds"].items():
        rows.append([seed + (" (`make demo`)" if seed == "0" else ""),
                     f"{r['stage1_fd']:.2f} / {r['stage1_oracle']:.3f}",
                     f"**{r['student_fd']:.2f}** / {r['stage2_oracle']:.3f}", f"{r['ratio_to_teacher_50']:.2f}x",
                     f(r["student_alignment"], 3), "quiet" if not r["warnings"] else f"{len(r['warnings'])} warning(s)",
                     f"{r['demo_minutes']:.1f} min", f"{r['speedup_vs_teacher_50']:.1f}x"])
    r0 = next(iter(d["seeds"].values()))
    notes = [f"Student FD {d['student_fd_mean']:.2f} ± {d['student_fd_sd']:.2f} (range {d['student_fd_range'][0]:.2f}-"
             f"{d['student_fd_range'][1]:.2f}); teacher {r0['teacher_4_fd']:.2f} at 4 steps, {r0['teacher_50_fd']:.2f} "
             f"at 50; every target met in every seed: {'yes' if d['all_targets_met'] else 'no'} (code "
             f"{d['commit'][:7]})."]
    return (["seed", "end of Stage 1 (FD / oracle)", "after Stage 2 (FD / oracle)", "FD / teacher's 50-step",
             "alignment", "guard", "demo wall", "images/s vs 50-step teacher"], rows, ["demo_seeds.json"], notes)


@table("demo_history")
def demo_history():
    def row(label, fl, d, seeds):
        fds = [seeds[s]["student_fd"] for s in seeds]
        s1 = [seeds[s]["stage1_fd"] for s in seeds]
        met = all(all(r["targets"].values()) for r in seeds.values())
        spread = f"{mean(fds):.2f} ± {statistics.stdev(fds):.2f}" if len(fds) > 1 else "(one seed)"
        return [label, f"`{fl}`", d["commit"][:7], " / ".join(f(x) for x in s1), " / ".join(f(x) for x in fds),
                spread, "yes" if met else "no"]
    cur, before = load("demo_seeds.json"), load("demo_seeds_before_fork.json")
    j01, j2 = load("demo_seeds_joint5_seed01.json"), load("demo_seeds_joint5_seed2.json")
    pooled = load("demo_seeds_pooled_head.json")
    cand = load("demo_seed2_candidates.json")
    rows = [row("the demo as shipped: text-conditioned head; RL alone at 2.5e-7", "demo_seeds.json", cur, cur["seeds"]),
            row("the same, before the reward-model check ran on a forked generator", "demo_seeds_before_fork.json",
                before, before["seeds"]),
            row("text-conditioned head; joint 5:1 at 2e-6", "demo_seeds_joint5_seed01.json", j01,
                {**j01["seeds"], **j2["seeds"]}),
            row("unconditional pooled head; joint 5:1 at 2e-6", "demo_seeds_pooled_head.json", pooled,
                pooled["seeds"])]
    for key, r in cand.items():
        rows.append(row(f"the pooled-head demo, seed 2, `{setting_name(key)}`", "demo_seed2_candidates.json", r, {"2": r["seed2"]}))
    notes = ["Seeds 0 / 1 / 2 (seed 2 where a single value is shown); mean ± sd over seeds. Targets: issue 16's "
             "(beats the 4-step teacher, within 1.1x of the 50-step teacher, Stage 2 raises the oracle with FD within "
             "5 % and no guard warning, within 15 minutes). The joint 5:1 row's seed 2 is in "
             "`demo_seeds_joint5_seed2.json`. Before 3e4e484 the reward-model check drew from the seeded generator "
             "before the networks' initial weights, so a seed gave another run: the two first rows are the same "
             "setting at other draws."]
    return (["demo setting", "file", "code", "FD at the end of Stage 1", "FD after Stage 2", "mean", "targets met"],
            rows, ["demo_seeds.json", "demo_seeds_before_fork.json", "demo_seeds_joint5_seed01.json",
                   "demo_seeds_joint5_seed2.json", "demo_seeds_pooled_head.json", "demo_seed2_candidates.json"], notes)


@table("demo_paper_setting")
def demo_paper_setting():
    rows = []
    for fl, label in (("demo_metrics.json", "seed 0, before issue 14's data stream"),
                      ("demo_issue14_metrics.json", "seed 0, after issue 14's data stream")):
        d = load(fl)
        comp = {c["model"] + str(c["steps"]): c for c in d["comparison"]}
        s1 = next(e for e in d["evals"] if e["stage"] == 1 and e["generator_steps"] == 300)
        stu = comp["student (Flash-DMD)4"]
        rows.append([label, f"`{fl}`", f(s1["fd"]), f(stu["fd"]), f(stu["alignment"], 3), f(stu["oracle"]),
                     f"{comp['teacher, CFG 250']['seconds_per_image'] / stu['seconds_per_image']:.1f}x",
                     f"{d['demo_wall_seconds'] / 60:.1f} min"])
    notes = ["The demo with the paper's Pixel-GAN setting (TTUR 1, patch heads; RL:distillation 5:1 at 2e-6), "
             "300 Stage-1 and 40 Stage-2 updates. Images/s against the 50-step teacher in the same run."]
    return (["run", "file", "FD at the end of Stage 1", "FD after Stage 2", "alignment", "oracle",
             "images/s vs 50-step teacher", "demo wall"], rows, ["demo_metrics.json", "demo_issue14_metrics.json"],
            notes)


# ---------------------------------------------------------------------------------------------------------------
# 6. Speed

@table("speed_images")
def speed_images():
    d = load("speed_cpu.json")
    ips = d["images_per_second"]
    ref = ips["teacher 50 steps CFG"]
    nfe = {"student 4 steps": 4, "teacher 25 steps CFG": 50, "teacher 50 steps CFG": 100}
    rows = [[k, nfe[k], f(v), f"{v / ref:.1f}x"] for k, v in ips.items()]
    return ["model", "NFE", "images / s", "vs the 50-step teacher"], rows, ["speed_cpu.json"], [
        f"Device, as the file records it: {d['device']}; peak RSS {d['peak_rss_mib']:.0f} MiB."]


@table("speed_iteration")
def speed_iteration():
    it = load("speed_cpu.json")["stage1_iteration"]
    total = it["seconds_per_iteration"]
    names = {"generator backward+step": "generator backward + step (through the VAE decoder and the Pixel-GAN)",
             "student forward": "student forwards (both branches, finish-to-clean)", "vae decode": "VAE decode",
             "('fake_score',) backward+step": "fake-score backward + step",
             "fake_score forward": "fake-score forwards (DM loss + diffusion loss)",
             "teacher forward": "teacher forward (CFG, batched)", "discriminator forward": "Pixel-GAN forward",
             "disc backward+step": "Pixel-GAN backward + step", "text encoders": "text encoders",
             "outside network passes": "**outside network passes**",
             "backward simulation": "the backward simulation's own overhead"}
    rows = [[names.get(k, k), f(v, 3 if v >= 0.01 else 4), pct(v / total)]
            for k, v in sorted(it["breakdown_seconds"].items(), key=lambda kv: -kv[1])]
    notes = [f"One Stage-1 iteration at batch {it['batch_size']}, mean of 10: {total:.2f} s; nested calls are charged "
             f"to the innermost. Outside network passes: {pct(it['outside_share'])}."]
    return ["part", "seconds", "share"], rows, ["speed_cpu.json"], notes


@table("zero_t5")
def zero_t5():
    d = load("zero_t5.json")
    rows = []
    for what, part, key in (("world-sd3 training, DMD2 (s / generator update, batch 32)", "training", "DMD2"),
                            ("world-sd3 training, Flash-DMD preset (s / generator update, batch 32)", "training",
                             "Flash-DMD preset"),
                            ("one SD3-medium-width block, 512 px (s, forward + backward, batch 1)", "block", "512 px"),
                            ("one SD3-medium-width block, 1024 px (s, forward + backward, batch 1)", "block",
                             "1024 px")):
        field = "seconds_per_generator_update" if part == "training" else "seconds"
        pad, cnt = (d[part][f"{key} {m}"][field] for m in ("padded", "counted"))
        rows.append([what, f(pad), f(cnt), f"{pad / cnt:.2f}x"])
    rounds = len(d["block"]["512 px padded"]["rounds"])
    notes = [f"Both modes in one process, interleaved in rounds (median of {rounds}), {d['threads']} CPU thread; "
             f"code {d['commit']}, {d['date']}. The block: 77 CLIP tokens and 256 zero tokens (padded) or one "
             "counted zero token (counted) beside 1 024 / 4 096 image tokens."]
    return ["what", "padded", "counted", "speed-up"], rows, ["zero_t5.json"], notes


# ---------------------------------------------------------------------------------------------------------------
# 7. A user's own model and data

@table("run_memory")
def run_memory():
    d = load("run_memory.json")
    keys = [("tree_peak_rss_mib", "peak RSS, process tree"), ("main_ru_maxrss_mib", "main process ru_maxrss"),
            ("largest_worker_peak_rss_mib", "largest DataLoader worker")]
    a, b = d["rows"]["1000"], d["rows"]["20000"]
    rows = [[label, f(a[k], 0), f(b[k], 0), f(d["ratio_20000_over_1000"][k], 3)] for k, label in keys]
    rows.append(["images read / wall seconds", f"{a['images_read']} / {a['wall_seconds']:.0f}",
                 f"{b['images_read']} / {b['wall_seconds']:.0f}", "–"])
    notes = [f"Within 10 %: {'yes' if d['within_10_percent'] else 'no'}."]
    return ["MiB", "1 000 images", "20 000 images", "ratio"], rows, ["run_memory.json"], notes


@table("data_memory")
def data_memory():
    d = load("data_memory.json")
    keys = [("tree_peak_rss_mib", "peak RSS, process tree"), ("tree_peak_anon_pss_mib", "anonymous memory (Pss_Anon)"),
            ("self_maxrss_mib", "main process ru_maxrss"), ("workers_maxrss_mib", "largest worker ru_maxrss"),
            ("tree_peak_pss_mib", "total PSS (not in the verdict)")]
    a, b = d["rows"]["1000"], d["rows"]["20000"]
    rows = [[label, f(a[k], 0), f(b[k], 0), f(d["ratio_20000_over_1000"][k], 3)] for k, label in keys]
    rows.append(["images / s", f(a["images_per_s"], 0), f(b["images_per_s"], 0), "–"])
    notes = [f"Within 10 %: {'yes' if d['within_10_percent'] else 'no'}."]
    return ["MiB", "1 000 images", "20 000 images", "ratio"], rows, ["data_memory.json"], notes


# ---------------------------------------------------------------------------------------------------------------
# 8. Memory

@table("plan_check")
def plan_check():
    files = [("plan_check_sdxl_bf16.json", "SDXL, bf16 frozen parts"), ("plan_check_sd3_bf16.json",
             "SD3-medium (no T5), bf16 frozen parts"), ("plan_check_sdxl.json", "SDXL, fp32 (mmap'd weights)"),
             ("plan_check_sd3.json", "SD3-medium (no T5), fp32"),
             ("plan_check_sdxl_three_copies.json", "SDXL, three fp32 copies (before one shared base)")]
    rows = []
    for fl, label in files:
        d = load(fl)
        m, p = d["measured"], d["plan"]
        planned = f(p["peak_mib_per_device"], 0) if p.get("available") else "–"
        ratio = f(p["ratio_measured_over_planned"]["main_ru_maxrss_mib"], 3) if p.get("available") else "–"
        anon = f(p["ratio_measured_over_planned"]["main_peak_rss_anon_mib"], 3) if p.get("available") else "–"
        rows.append([label, d["commit"][:7], "yes" if d["completed"] else "no (memory)", f(m["main_ru_maxrss_mib"], 0),
                     f(m["main_peak_rss_anon_mib"], 0), planned, ratio, anon, f(m["wall_seconds"], 0)])
    notes = ["One Stage-1 Flash-DMD iteration, 512 px, batch 1, LoRA 64 on a shared base, gradient checkpointing, "
             "random weights from the published configs, 2 threads. Peak: ru_maxrss (MiB); ratio = measured / "
             "planned (`flashdmd plan --device cpu` on the same YAML)."]
    return (["run", "code", "completed", "measured peak RSS", "anonymous", "planned", "measured / planned",
             "anonymous / planned", "wall s"], rows, [x for x, _ in files], notes)


@table("plan_targets")
def plan_targets():
    d = load("plan_targets.json")
    rows = []
    for r in d["targets"]:
        stages = ", ".join(f"{k} {v:.1f}" for k, v in r["per_stage_gib"].items())
        if r["fits"]:
            result = "met"
        else:
            sug = r.get("suggest") or {}
            fix = (f"; `--suggest`: `{' '.join('--set ' + x for x in sug['set'])}` -> {sug['peak_gib']:.1f} GiB"
                   if sug.get("fits") else "")
            result = f"misses by {r['miss_gib']:.2f} GiB{fix}"
        moved = (f"{r['transfer_gib_per_iteration']:.1f} ({r['transfer_seconds_per_iteration']:.2f} s)"
                 if "transfer_gib_per_iteration" in r else "–")
        rows.append([r["target"], f"{r['planned_peak_gib']:.1f}", r["peak_phase"], stages,
                     f"{r['fit_limit_gib']:.1f}", moved, result])
    gbps = next((r["h2d_gbps"] for r in d["targets"] if "h2d_gbps" in r), None)
    notes = [f"Planned at {d['commit']} for {d['device']}: Flash-DMD LoRA 64, 1024 px, batch 1, text cache, one GPU; "
             "the int8 / fp8 targets quantise the text encoders too (`model_text_encoder_quant`), since they sit next "
             "to the teacher while the prompts are encoded. A card fits under 95 % of it."
             + (f" Offloaded: `model_offload`'s bytes copied host -> device per Stage-1 iteration, and their time at "
                f"an assumed {gbps:g} GB/s (PCIe 4.0 x16, pinned memory; not measured)." if gbps else "")]
    return (["target", "planned peak GiB", "peak at", "per stage GiB", "fits under GiB",
             "offloaded GiB / iteration", "result"], rows, ["plan_targets.json"], notes)


@table("quant_cost")
def quant_cost():
    d = load("quant_cost.json")
    rows = []
    for key, r in d.items():
        if "not_run" in r:
            continue
        for p in r["per_timestep"]:
            rows.append([r["teacher"], r["quant"], f(p["t"], 0), f"{100 * p['x0_rel_rms']:.3f} %",
                         f"{p['x0_max_abs']:.4f} ({p['x0_ref_max_abs']:.2f})",
                         f"{p['grad_cos_fake_ref_mean']:.4f} / {p['grad_cos_fake_ref_min']:.4f}",
                         f"{p['grad_cos_fake_same_mean']:.4f} / {p['grad_cos_fake_same_min']:.4f}"])
    skipped = sorted({r["quant"] + ": " + r["not_run"] for r in d.values() if "not_run" in r})
    notes = ["Against the same teacher unquantised, both frozen in float32; x0 with the teacher's CFG "
             "(dm_guidance_scale); DM-gradient cosine per sample, mean / min, with the fake score the unquantised "
             "teacher at CFG 1 (\"fake fp32\") or each teacher's own CFG-1 prediction (\"fake own\": an int8 run's "
             "fake score shares the int8 base). Not run: " + "; ".join(skipped) + "."]
    return (["teacher", "quant", "t", "x0 rel. RMS error", "x0 max abs error (max abs x0)",
             "DM-grad cosine, fake fp32", "DM-grad cosine, fake own"], rows, ["quant_cost.json"], notes)


@table("quant_stage1")
def quant_stage1():
    d = load("quant_stage1.json")
    rows = []
    for name, r in sorted(d.items()):
        fds = {e["step"]: e["fd"] for e in r["evals"]}
        late = [fds[k] for k in (260, 280, 300) if k in fds]
        best = min((v, k) for k, v in fds.items() if k > 0)
        base = "int8" if "int8" in name else ("bf16" if "bf16" in name else "fp32 (none)")
        rows.append([base, name.rsplit("_s", 1)[1], f(fds[0]), f"{f(best[0])} ({best[1]})", f(mean(late)),
                     " / ".join(f(fds[k]) for k in sorted(fds) if k > 0)])
    notes = ["world-sdxl, configs/world_sdxl_flashdmd.yaml with a LoRA of rank 32 (a quantised base needs one) and its "
             "learning rates x10, 300 generator steps (the preset's length: 200, then continued by a bit-exact resume), "
             "300 images per evaluation; the rows differ only in the frozen base. Step 0 is the teacher's own 4-step "
             "FD under that base."]
    return (["frozen base", "seed", "FD at step 0", "best FD (step)", "mean FD, steps 260-300", "FD at steps 20...300"],
            rows, ["quant_stage1.json"], notes)


@table("vram_table")
def vram_table():
    d = load("vram_table.json")
    cards = (24, 48, 80, 141)      # benchmarks/vram_table.py's cards; a card's nominal GB read as GiB, as
    headroom = 0.95                # flashdmd plan does (flashdmd.training.plan.FIT_HEADROOM)

    def card(gib: float) -> str:
        fits = [c for c in cards if gib <= headroom * c]
        return f"{fits[0]}+ GB" if fits else "none"

    rows = []
    for r in d["rows"]:
        s = r["single"]
        split = " / ".join(f(s[k], 1) for k in ("weights_gib", "gradients_gib", "optimizer_gib", "activations_gib",
                                                 "other_gib"))
        rows.append([r["row"], r["batch"], f"{s['peak_gib']:.1f} ({split})", card(s["peak_gib"]),
                     f(r["ddp"]["peak_gib"], 1), f(r["fsdp2"]["peak_gib"], 1), card(r["fsdp2"]["peak_gib"])])
    notes = [f"Planned for {d['device']} at {d['resolution']} px (`flashdmd plan --device cuda --processes 8`); a card "
             "fits when the peak stays under 95 % of it."]
    return (["run", "batch / GPU", "one GPU: peak GiB (weights / grads / AdamW / act. / other)", "smallest card",
             "DDP x8", "FSDP2 x8", "smallest card (FSDP2)"], rows, ["vram_table.json"], notes)


@table("data_free")
def data_free():
    d = load("data_free.json")
    names = {"teacher_reals": "the teacher's own images (make-reals)", "fashion_mnist": "Fashion-MNIST (the preset's)"}
    rows = []
    for source, label in names.items():
        runs = [r for r in d["rows"].values() if r["source"] == source]
        for r in sorted(runs, key=lambda r: r["seed"]):
            c = [(e["generator_steps"], e["fd"], e["alignment"]) for e in r["curve"]]
            trained = [x for x in c if x[0] > 0]
            best = min(trained, key=lambda x: x[1])
            rows.append([label, str(r["seed"]), f(r["final_fd"]), f"{best[1]:.2f} ({best[0]})",
                         f(c[-1][2], 3)])
        s = d["sources"][source]
        rows.append([f"**{label}: mean**", "–", f"{s['final_fd_mean']:.2f} (sd {s['final_fd_sd']:.2f})",
                     f(s["best_fd_mean"]), "–"])
    m = d["make_reals"]
    notes = [f"World-sdxl, the Flash-DMD preset's Stage 1 ({d['steps']} generator updates, batch {d['batch']}), FD "
             f"every {d['eval_every']} updates on {d['eval_num_images']} images; only data_real differs. The teacher "
             f"images: {m['num']} from {m['num_prompts']} class prompts (training templates), its own sampler at "
             f"{m['sampler_steps']} steps and guidance {m['guidance_scale']}. Teacher reals / Fashion-MNIST, final "
             f"FD: {d['teacher_reals_over_fashion_mnist_final_fd']:.3f}."]
    return ["data_real", "seed", "final FD", "best FD (step)", "final alignment"], rows, ["data_free.json"], notes


# ---------------------------------------------------------------------------------------------------------------
# Section 3a: the pre-registered attribution (benchmarks/attribution.py)

ATTR_ROWS = attribution.LABELS  # the rows and their names: attribution.py's, which runs them
ATTR_POINTS = ("B/4", "B/2", "B")


def attr_records(teacher: str, seed_filter=lambda s: s != 100) -> dict:
    """row -> [record] of one teacher (the reported seeds; seed 100 is the DMD2 sweep's tuning seed)."""
    if not (RESULTS / "attribution.json").is_file():
        return {}
    out = {}
    for r in load("attribution.json")["records"]:
        if r["teacher"] == teacher and seed_filter(r["seed"]):
            out.setdefault(r["row"], []).append(r)
    return out


def point_fds(records: list[dict], k: int) -> list[float]:
    return [r["points"][k]["test_fd_mean"] for r in records if len(r["points"]) > k]


def mean_sd(xs: list[float]) -> str:
    if not xs:
        return "–"
    return f"{mean(xs):.2f} ± {statistics.stdev(xs):.2f} ({len(xs)})" if len(xs) > 1 else f"{xs[0]:.2f} (1)"


def verdict(a: list[float], b: list[float]) -> str:
    """a against b as pre-registered: better / worse when the means differ by more than twice the standard error of
    the difference (Welch), else level; "–" below two seeds a side."""
    if len(a) < 2 or len(b) < 2:
        return "–"
    d = mean(a) - mean(b)
    return "level" if abs(d) <= 2 * welch_se(a, b) else ("better" if d < 0 else "worse")


def welch_se(a: list[float], b: list[float]) -> float:
    """The standard error of mean(a) - mean(b) (Welch: each side's own variance)."""
    return (statistics.variance(a) / len(a) + statistics.variance(b) / len(b)) ** 0.5


def attribution_rows(teacher: str) -> tuple[list, list]:
    recs = attr_records(teacher)
    rows = []
    for key, label in ATTR_ROWS.items():
        rs = recs.get(key, [])
        if not rs:
            rows.append([label, "0", "–", "–", "–", "–", "–", "–", "–"])
            continue
        c = rs[0]["compute"]
        rows.append([label, str(len(rs)), *(mean_sd(point_fds(rs, k)) for k in range(3)),
                     str(rs[0]["generator_steps"]), f"{c['images']:,}".replace(",", " "),
                     f"{c['critic_iterations']:,}".replace(",", " "), f"{c['seconds'] / 3600:.2f}"])
    notes = ["FD: the test split (held-out templates), N = 1 000, the mean over noise seeds 1-3 of the student "
             "chosen on the val split up to that point; mean ± sd over training seeds (how many). B: the teacher's "
             "budget in DMD2 updates; every row spends the same CPU time per point. Images, critic iterations and "
             "CPU hours (1 thread, from the measured seconds per update) at B."]
    return rows, notes


ATTR_HEADER = ["row", "seeds", "FD at B/4", "FD at B/2", "FD at B", "generator updates at B", "images at B",
               "critic iterations at B", "CPU h at B"]


def better_dmd2(recs: dict, k: int, min_seeds: int = 2) -> str | None:
    """The better DMD2 at point k: of `dmd2` and `dmd2_best`, the lower mean test FD (rows with >= min_seeds)."""
    dmd = {r: point_fds(recs.get(r, []), k) for r in ("dmd2", "dmd2_best")}
    return min((r for r in dmd if len(dmd[r]) >= min_seeds), key=lambda r: mean(dmd[r]), default=None)


def difference(a: list[float], b: list[float]) -> str:
    """mean(a) - mean(b) ± twice the Welch standard error of the difference, and the pre-registered verdict."""
    if len(a) < 2 or len(b) < 2:
        return "–"
    return f"{mean(a) - mean(b):+.2f} ± {2 * welch_se(a, b):.2f}: {verdict(a, b)}"


def comparison_cells(recs: dict, a: str, b: str | None) -> list[str]:
    """Row a against row b (None: the better DMD2 at each point) at every comparison point: :func:`difference`."""
    cells = []
    for k in range(len(ATTR_POINTS)):
        other = b or better_dmd2(recs, k)
        cells.append("–" if other is None else difference(point_fds(recs.get(a, []), k),
                                                           point_fds(recs.get(other, []), k)))
    return cells


# (row a, row b or None for the better DMD2, what the comparison tells)
ATTR_COMPARISONS = [("preset", None, "the claim"), ("dmd2_head", None, "the head on DMD2"),
                    ("dmd2_head", "preset", "the head explains it (level) or the method adds (worse)"),
                    ("preset_routing_off", "preset", "routing"), ("preset_pull_off", "preset", "the EMA pull"),
                    ("preset_ttur5", "preset", "the low TTUR"),
                    ("dmd2_best_head", "dmd2_best", "the head on the tuned DMD2 (added after fixing)"),
                    ("dmd2_best_head", "preset", "the tuned DMD2 with the head (added after fixing)")]


@table("attribution_verdicts")
def attribution_verdicts():
    rows = []
    for teacher in ("world-sdxl", "world-sd3"):
        recs = attr_records(teacher)
        for a, b, tells in ATTR_COMPARISONS:
            cells = comparison_cells(recs, a, b)
            against = ATTR_ROWS[b] if b else "the better DMD2"
            rows.append([teacher, f"{ATTR_ROWS[a]} against {against}", tells, *cells])
    notes = ["Each cell: the difference of the two rows' mean test FD over training seeds (negative: the first row "
             "is lower), ± twice the Welch standard error of the difference, and the verdict: better / worse when "
             "the difference is beyond that, else level; \"–\" until each side has two seeds. The better DMD2: of "
             "`dmd2` and `dmd2_best`, the one with the lower mean at that point."]
    files = existing("attribution.json")
    return ["teacher", "comparison", "tells", *(f"at {p}" for p in ATTR_POINTS)], rows, files, notes


def steps_to_reach(record: dict, target: float) -> int | None:
    """The first evaluation (after step 0) at which the record's val FD is at or below target, in generator steps."""
    return next((s for s, fd, *_ in record["val_curve"] if s > 0 and fd <= target), None)


def reach(rs: list[dict], target: float) -> tuple[list[tuple[int, dict]], float]:
    """(step, compute) of each seed that reaches target (attribution_reach's rule), and the best val FD any seed saw
    after step 0."""
    hits = [(s, r["compute"]) for r in rs if (s := steps_to_reach(r, target)) is not None]
    return hits, min(fd for r in rs for s, fd, *_ in r["val_curve"] if s > 0)


def reach_cells(rs: list[dict], target: float, images_b: float, seconds_b: float) -> list[str]:
    """Seeds that reach target; images to reach it (mean ± sd) and as a share of the DMD2 row's images and CPU time
    at B."""
    hits, best = reach(rs, target)
    if not hits:
        return [f"0 of {len(rs)}", f"not reached (best val FD {best:.2f})", "–", "–"]
    imgs = [s * c["images_per_update"] for s, c in hits]
    secs = [s * c["seconds_per_update"] for s, c in hits]
    spread = f" ± {statistics.stdev(imgs):,.0f}" if len(imgs) > 1 else ""
    return [f"{len(hits)} of {len(rs)}", f"{mean(imgs):,.0f}{spread}".replace(",", " "),
            pct(mean(imgs) / images_b), pct(mean(secs) / seconds_b)]


def reach_target(dmd2: list[dict]) -> tuple[float, float, float]:
    """The paper's unit's yardstick from the better DMD2's records: its val FD of the student chosen at B (the
    target), and its images and CPU seconds at B (means over its seeds)."""
    return (mean([r["points"][2]["val_fd"] for r in dmd2]), mean([r["compute"]["images"] for r in dmd2]),
            mean([r["compute"]["seconds"] for r in dmd2]))


@table("attribution_reach")
def attribution_reach():
    rows = []
    for teacher in ("world-sdxl", "world-sd3"):
        recs = attr_records(teacher)
        ref = better_dmd2(recs, 2, min_seeds=1)
        if ref is None:
            rows.append([teacher, "–", "–", "no DMD2 record yet", "–", "–", "–", "–"])
            continue
        target, images_b, seconds_b = reach_target(recs[ref])
        for key in (k for k in ATTR_ROWS if k not in ("dmd2", "dmd2_best")):  # every row but the yardsticks
            if recs.get(key):
                rows.append([teacher, f"{ATTR_ROWS[ref]} ({len(recs[ref])})", f"{target:.2f}", ATTR_ROWS[key],
                             *reach_cells(recs[key], target, images_b, seconds_b)])
    notes = ["The paper's unit: the preset reaches DMD2's quality with 2.1 % of DMD2's images (64 x 1k against "
             "128 x 24k). Here the target is the better DMD2's (at B) val FD of the student it chose at B, mean over "
             "its seeds (how many); a row reaches it at the first evaluation whose val FD (N = 300, noise seed 0, "
             "the val split: the curve the runs select on) is at or below it. Images to reach: mean ± sd over the "
             "seeds that reach it, then as a share of the DMD2 row's images and CPU time at B. Both ends are "
             "noisy and neither bias is removed: the target is DMD2's lowest of 16 evaluations (optimistic, so "
             "harder to reach), a row's crossing its first evaluation at or below it (earlier than a smoothed "
             "curve's)."]
    files = existing("attribution.json")
    return ["teacher", "the better DMD2 at B (seeds)", "its val FD at B", "row", "seeds reaching it",
            "images to reach it", "share of DMD2's images", "share of DMD2's CPU time"], rows, files, notes


HOME = {"attribution_headline": "README.md"}   # a table's document when it is not BENCHMARKS.md


def reach_text(rs: list[dict], recs: dict, ref: str) -> str:
    """One cell of the paper's unit: the share of the better DMD2's images (and CPU time) a row needed to reach that
    DMD2's FD at B, with how many seeds reached it (attribution_reach's rule)."""
    target, images_b, seconds_b = reach_target(recs[ref])
    hits, best = reach(rs, target)
    if not hits:
        return f"not reached (0 of {len(rs)} seeds; best val FD {best:.2f})"
    hit, _, share_img, share_cpu = reach_cells(rs, target, images_b, seconds_b)
    return f"{share_img} of its images, {share_cpu} of its CPU time ({hit} seeds reached it)"


def attribution_claim(teacher: str) -> str:
    """The at-a-glance cell of section 3a: the preset's and the better DMD2's test FD at B/4, B/2, B, the verdicts,
    and the paper's unit."""
    recs = attr_records(teacher)
    ref = better_dmd2(recs, 2, min_seeds=1)
    if not recs.get("preset") or ref is None:
        return "no run landed yet"
    fds = {key: " / ".join(f(mean(point_fds(recs[key], k))) for k in range(3)) for key in ("preset", ref)}
    verdicts = [verdict(point_fds(recs["preset"], k), point_fds(recs.get(better_dmd2(recs, k) or ref, []), k))
                for k in range(3)]
    seeds = f"{len(recs['preset'])} / {len(recs[ref])} seeds"
    return (f"test FD at B/4, B/2, B: {fds['preset']} against {fds[ref]} ({ATTR_ROWS[ref]}; {seeds}); verdicts "
            f"{' / '.join(verdicts)}; to reach its FD at B: {reach_text(recs['preset'], recs, ref)}, the paper: "
            f"2.1 % of DMD2's images")


def attribution_head_claim(teacher: str) -> str:
    """The at-a-glance cell of the head question: DMD2 given the preset's head (the pre-registered row, and the tuned
    one added after fixing) against the preset at B/4, B/2, B, with the rule's reading."""
    recs = attr_records(teacher)
    parts = []
    for row, what in (("dmd2_head", "DMD2 + the head"), ("dmd2_best_head", "DMD2 tuned + the head (added)")):
        if recs.get(row) and recs.get("preset"):
            verdicts = [verdict(point_fds(recs[row], k), point_fds(recs["preset"], k)) for k in range(3)]
            parts.append(f"{what} against the preset at B/4, B/2, B: {' / '.join(verdicts)} "
                         f"({len(recs[row])} / {len(recs['preset'])} seeds)")
    if not parts:
        return "no run landed yet"
    return "; ".join(parts) + " (worse: the method adds to the head; level: the head explains the lead)"


@table("attribution_headline")
def attribution_headline():
    """README's headline: the preset, the better DMD2 and DMD2 given the preset's head (as shipped, and tuned: the
    row added after fixing), the verdicts that say whether the method or the head makes the difference, and the
    paper's unit beside ours."""
    rows = []
    for teacher in ("world-sdxl", "world-sd3"):
        recs = attr_records(teacher)
        ref = better_dmd2(recs, 2, min_seeds=1)
        if not recs.get("preset") or ref is None:
            rows.append([teacher, "no record of the preset and DMD2 yet", "–", "–", "–", "–", "–"])
            continue
        for key, label in (("preset", ATTR_ROWS["preset"]), (ref, f"the better DMD2: {ATTR_ROWS[ref]}"),
                           ("dmd2_head", ATTR_ROWS["dmd2_head"]), ("dmd2_best_head", ATTR_ROWS["dmd2_best_head"])):
            rs = recs.get(key, [])
            fds = [mean_sd(point_fds(rs, k)) for k in range(3)]
            paper_unit = "the target" if key == ref else reach_text(rs, recs, ref) if rs else "–"
            rows.append([teacher, label, str(len(rs)), *fds, paper_unit])
        for a, b, label in (("preset", None, "preset against the better DMD2 (verdict)"),
                            ("dmd2_head", "preset", "DMD2 + the head against the preset (verdict)"),
                            ("dmd2_best_head", "preset", "DMD2 tuned + the head against the preset (verdict, added)")):
            rows.append([teacher, label, "", *comparison_cells(recs, a, b), ""])
    notes = ["FD: test split (held-out templates), N = 1 000, noise seeds 1-3, of the student chosen on the val "
             "split; mean ± sd over training seeds (how many). B: the teacher's budget, the same CPU time for every "
             "row. A verdict: the difference of the means ± twice its Welch standard "
             "error; better / worse beyond that, else level; \"–\" below two seeds a side. The last column is the "
             "paper's unit, in which the paper reports 2.1 % of DMD2's images: the images a row needed to first "
             "reach the better DMD2's val FD at B, as a share of that DMD2's images (and CPU time) at B. BENCHMARKS.md "
             "section 3a has every row, the ablations and the rules, fixed before the runs."]
    return ["teacher", "row", "seeds", "FD at B/4", "FD at B/2", "FD at B",
            "to reach the better DMD2's FD at B (the paper: 2.1 % of DMD2's images)"], rows, \
        existing("attribution.json"), notes


@table("attribution_sdxl")
def attribution_sdxl():
    rows, notes = attribution_rows("world-sdxl")
    files = existing("attribution.json", "attribution_cost_sdxl.json")
    return ATTR_HEADER, rows, files, notes


@table("attribution_sd3")
def attribution_sd3():
    rows, notes = attribution_rows("world-sd3")
    files = existing("attribution.json", "attribution_cost_sd3.json")
    return ATTR_HEADER, rows, files, notes


@table("attribution_cost")
def attribution_cost():
    rows = []
    for fam in ("sdxl", "sd3"):
        fl = f"attribution_cost_{fam}.json"
        if not (RESULTS / fl).is_file():
            rows.append([f"world-{fam}", "not measured yet", "–", "–", "–", "–"])
            continue
        d = load(fl)
        for key, r in d["rows"].items():
            rows.append([f"world-{fam}", ATTR_ROWS.get(key, key), str(r["critic_iterations_per_update"]),
                         str(r["images_per_update"]), f(r["seconds_per_generator_update"]),
                         f"{r['relative_to_dmd2']:.3f}"])
    notes = ["Every row of a teacher timed in one process, interleaved in rounds (the median of three), 1 thread, "
             "batch 32: the seconds fix each row's number of generator updates at the budget."]
    files = existing("attribution_cost_sdxl.json", "attribution_cost_sd3.json")
    return ["teacher", "row", "critic iterations / update", "images / update", "s / generator update",
            "relative to DMD2"], rows, files, notes


@table("dmd2_sweep")
def dmd2_sweep():
    recs = attr_records("world-sdxl", lambda s: s == 100)
    rows = []
    for key in ("dmd2", "sweep_b09", "sweep_b09_eq_lo", "sweep_b09_eq_hi", "sweep_b09_eq_lo_warm",
                "sweep_b09_eq_hi_warm", "sweep_gan_2x"):
        rs = recs.get(key, [])
        if not rs:
            rows.append([key, "–", "not run yet", "–"])
            continue
        r = rs[0]
        v = min((p for p in r["val_curve"] if p[0] > 0), key=lambda p: p[1])
        rows.append([key, override_text(r["overrides"]) if r["overrides"] else "as shipped", f"{v[1]:.2f} ({v[0]})",
                     f(r["points"][-1]["test_fd_mean"])])
    notes = ["World-sdxl, tuning seed 100, half the budget (300 DMD2 updates). The lowest best val FD picks "
             "`dmd2_best`; the test FD (N = 1 000, noise seeds 1-3) is shown, not used."]
    files = existing("attribution.json")
    return ["row", "settings", "best val FD (step)", "test FD of that student"], rows, files, notes


# ---------------------------------------------------------------------------------------------------------------
# Section 4: the pre-registered Stage-2 comparison (benchmarks/rl_prereg.py summary)

S2_ROWS = ("rl_alone", "joint_5", "distill_5", "rl_alone_shuffled")
S2_CONTROL = {"joint_5": "distill_5"}      # the label of rl_prereg.CONTROL; the changes come computed in the summary
S2_METRICS = ("fd", "alignment", "diversity", "oracle", "confidence")   # the Δ columns, rl_prereg.METRICS


def s2_summary():
    return load("stage2_prereg.json") if (RESULTS / "stage2_prereg.json").is_file() else None


def mean_se_cell(xs: list[float], nd: int = 3) -> str:
    if not xs:
        return "–"
    if len(xs) == 1:
        return f"{xs[0]:+.{nd}f} (1)"
    se = statistics.stdev(xs) / len(xs) ** 0.5
    return f"{mean(xs):+.{nd}f} ± {se:.{nd}f}"


@table("stage2_tuning")
def stage2_tuning():
    s = s2_summary()
    rows = []
    tuning = (s or {}).get("tuning") or {}
    recs = (s or {}).get("records", [])
    for row in ("rl_alone", "joint_5"):
        for lr in ("1e-7", "2.5e-7", "5e-7"):
            cells = []
            for b in (0, 1):
                r = next((x for x in recs if x["phase"] == "tune" and x["row"] == row and x["base_seed"] == b
                          and x["rl_lr"] == float(lr)), None)
                if r is None:
                    cells.append("not run yet")
                    continue
                last = str(max(int(k) for k in r["checkpoints"]))
                m0, m = r["checkpoints"]["0"]["mean"], r["checkpoints"][last]["mean"]
                cells.append(f"{m0['fd']:.2f} -> {m['fd']:.2f} ({100 * (m['fd'] / m0['fd'] - 1):+.1f} %), "
                             f"oracle {m['oracle'] - m0['oracle']:+.3f}")
            chosen = tuning.get(row, {}).get("rl_lr")
            rows.append([row, lr, *cells, "–" if not tuning else ("**chosen**" if chosen == lr else "")])
    notes = ["Test FD of the base -> after 400 RL updates (N = 1 000, mean over noise seeds 1-3) and the oracle's "
             "change, on the tuning bases (the demo's Stage 1 at seeds 0 and 1). The rule: the largest rl_lr within "
             "+5 % of its base on both, else the smallest; `rl_alone_shuffled` takes `rl_alone`'s."]
    return ["row", "rl_lr", "base 0: FD, oracle change", "base 1: FD, oracle change", "choice"], rows, \
        ["stage2_prereg.json"] if s else [], notes


@table("stage2_prereg")
def stage2_prereg():
    s = s2_summary()
    recs = (s or {}).get("records", [])
    rows = []
    for row in S2_ROWS:
        lrs = sorted({r["rl_lr"] for r in recs if r["phase"] == "report" and r["row"] == row})
        first = True
        cks = sorted({c for r in recs if r["phase"] == "report" and r["row"] == row for c in r["checkpoints"]}
                     - {"0"}, key=int) or ["400"]   # every 100 RL updates as pre-registered
        per_base = (s or {}).get("changes", {}).get(row, {})   # rl_prereg._changes: base -> checkpoint -> change
        for ck in cks:
            ch = {b: c[ck] for b, c in per_base.items() if ck in c}
            rows.append([row if first else "", ", ".join(number_text(x) for x in lrs) or "–",
                         S2_CONTROL.get(row, "its base"), ck, ", ".join(ch) or "not run yet",
                         *(mean_se_cell([c[k] for c in ch.values()], 2 if k == "fd" else 3) for k in S2_METRICS)])
            first = False
    v = (s or {}).get("verdict") or {}
    notes = ["Each row's change against its control on the report bases (the demo's Stage 1 at seeds 3, 4, 5) after "
             "100-400 RL updates: mean ± standard error over the bases. Test split, N = 1 000, the mean over noise "
             "seeds 1-3. Confidence: the evaluation classifier's mean log-probability of the prompted class (the "
             "held-out judge; the oracle labelled the reward model's pairs)."]
    for key in ("regularises", "learns_preference"):
        if key in v:
            notes.append(v[key]["statement"] + ".")
    sh = (s or {}).get("shuffled_lrm")
    if sh:
        def acc(d):   # held-out pair accuracy at low / mid / high noise, the pair's two images on shared noise
            return " / ".join(f"{d['shared_noise'][k]:.2f}" for k in ("low", "mid", "high"))
        notes.append(f"The shuffled LRM: {sh['flips']['flipped']} of {sh['flips']['pairs']} preferences flipped; its "
                     f"held-out accuracy on the original pairs {acc(sh['shuffled_heldout_accuracy_on_original_pairs'])}"
                     f" (low / mid / high noise), the shipped LRM's on the same regenerated pairs "
                     f"{acc(sh['shipped_lrm_heldout_accuracy_on_regenerated_pairs'])}.")
    if v.get("deviations"):
        notes.append("Deviations from the pre-registration: " + ", ".join(v["deviations"]) + ".")
    if v:
        notes.append(v["paper"])
    return ["row", "rl_lr", "against", "RL updates", "bases", "Δ FD", "Δ alignment", "Δ diversity", "Δ oracle",
            "Δ confidence"], rows, ["stage2_prereg.json"] if s else [], notes


# ---------------------------------------------------------------------------------------------------------------
# The result files

RESULT_FILES = {   # file -> (what it holds, where it is used); the date is when it entered the repository
    "teachers.json": ("both world teachers at 1-50 steps, CFG 2 (benchmarks/teachers.py)", "1", "2026-11-26"),
    "flash_sdxl_450_metrics.json": ("the paper's setting on world-sdxl, seed 0, to 450 steps (metrics.json)", "2",
                                    "2026-11-26"),
    "flash_sdxl_seed1_metrics.json": ("the paper's setting on world-sdxl, seed 1, 300 steps", "2", "2026-11-26"),
    "flash_sdxl_seed2_metrics.json": ("the paper's setting on world-sdxl, seed 2, 300 steps", "2", "2026-11-26"),
    "disc_probe.json": ("can a Pixel-GAN head tell real from student images (benchmarks/disc_probe.py)", "2",
                        "2026-11-26"),
    "issue16_base_long_sdxl.json": ("the unconditional pooled head (sweep base), three seeds, and the slower "
                                    "generator, to 625 steps", "2, 3", "2026-12-02"),
    "preset_sdxl.json": ("the preset (text-conditioned head) on world-sdxl, seeds 0 and 1, to 625 steps", "2, 3",
                         "2026-12-03"),
    "dmd2_sdxl_seed0.json": ("the faithful DMD2 on world-sdxl, seed 0, to 800 steps", "2, 3", "2026-12-02"),
    "dmd2_sdxl_seed1.json": ("the faithful DMD2 on world-sdxl, seed 1, to 800 steps (code c758761)", "2, 3",
                             "2026-12-02"),
    "preset_sd3_and_dmd2_sd3.json": ("the preset on world-sd3 (seeds 0, 1; 240 steps) and the faithful DMD2 "
                                     "(seed 0; 320 steps)", "3", "2026-12-02"),
    "dmd2_sd3_first128.json": ("the faithful DMD2 on world-sd3, its first 128 steps (the run later finished in "
                               "preset_sd3_and_dmd2_sd3.json)", "3", "2026-12-02"),
    "step_cost_sdxl.json": ("seconds per generator update on world-sdxl: DMD2 (old head), TTUR 1, TTUR 2", "3",
                            "2026-11-26"),
    "step_cost_sdxl_pooled.json": ("the pooled head against TTUR 2 with patch heads, world-sdxl", "3", "2026-11-26"),
    "step_cost_sdxl_dmd2_faithful.json": ("seconds per generator update with the faithful DMD2, world-sdxl", "3",
                                          "2026-12-02"),
    "step_cost_sd3.json": ("seconds per generator update on world-sd3", "3", "2026-11-26"),
    "eval_noise_teacher4.json": ("FD of one fixed model under different evaluation seeds", "3", "2026-12-02"),
    "convergence_sdxl.json": ("the paper's Pixel-GAN rows and ablations against the old DMD2, world-sdxl "
                              "(benchmarks/convergence.py)", "3", "2026-11-26"),
    "convergence_sdxl_pooled_seed1.json": ("the pooled-head row of convergence_sdxl.json, seed 1", "3", "2026-11-26"),
    "convergence_sd3.json": ("the paper's Pixel-GAN rows against the old DMD2, world-sd3", "3", "2026-11-26"),
    "sweep_sdxl.json": ("one factor at a time around the pooled head, world-sdxl, 200 steps (benchmarks/sweep.py)",
                        "3", "2026-12-02"),
    "issue16_curves.json": ("curves of the first sweep round, its long fake-score-lr rows, two world-sd3 rows and the "
                            "faithful DMD2 (benchmarks/curves.py)", "3", "2026-12-02"),
    "issue16_sd3.json": ("world-sd3: faster fake score, TTUR 3", "3", "2026-12-02"),
    "sweep_sd3_stall_sdxl_lr.json": ("world-sd3: routing, GAN weight, DM only, lr decay; world-sdxl: lr decay, "
                                     "Adam beta1 0.9", "3", "2026-12-02"),
    "sweep_sd3_critic.json": ("world-sd3: the text-conditioned head's first runs, TTUR 5", "3", "2026-12-02"),
    "rl_frontier_sdxl_base0.json": ("the RL frontier on world-sdxl from the demo's seed-0 Stage 1 (benchmarks/rl.py)",
                                    "4", "2026-12-03"),
    "rl_frontier_sdxl_base1.json": ("the RL frontier on world-sdxl from the demo's seed-1 Stage 1", "4", "2026-12-03"),
    "rl_frontier_sd3.json": ("the RL frontier on world-sd3", "4", "2026-12-03"),
    "rl_sdxl_lr2e-6.json": ("the first frontier (the paper's Stage-1 student), RL lr 2e-6", "4", "2026-11-26"),
    "rl_sdxl_lr2e-5.json": ("the first RL frontier (the paper's Stage-1 student), RL lr 2e-5, 60 updates", "4",
                            "2026-11-26"),
    "demo_seeds.json": ("the demo as shipped, three seeds from a fresh clone (benchmarks/demo_seeds.py)", "5",
                        "2026-12-07"),
    "demo_seeds_before_fork.json": ("the demo as shipped, three seeds, before the reward-model check's forked "
                                    "generator (afb11f3)", "5", "2026-12-03"),
    "demo_seeds_joint5_seed01.json": ("the demo with the text-conditioned head and joint 5:1, seeds 0 and 1", "5",
                                      "2026-12-03"),
    "demo_seeds_joint5_seed2.json": ("the demo with the text-conditioned head and joint 5:1, seed 2", "5",
                                     "2026-12-03"),
    "demo_seeds_pooled_head.json": ("the demo with the unconditional pooled head, three seeds", "5", "2026-12-02"),
    "demo_seed2_candidates.json": ("three settings tried on the pooled-head demo's seed 2", "5", "2026-12-02"),
    "demo_metrics.json": ("the demo with the paper's setting, seed 0 (metrics.json)", "5", "2026-11-26"),
    "demo_fresh_threads_auto_metrics.json": ("the paper's-setting demo, seed 0, from a fresh clone with --threads "
                                             "auto", "5", "2026-11-26"),
    "demo_issue14_metrics.json": ("the paper's-setting demo, seed 0, after the real-image stream changed", "5",
                                  "2026-12-02"),
    "zero_t5.json": ("SD3 without T5: the zero T5 tokens counted against padded (benchmarks/zero_t5.py)", "6",
                     "2026-12-07"),
    "speed_cpu.json": ("images per second and a Stage-1 iteration's parts (benchmarks/speed.py)", "6", "2026-11-26"),
    "run_memory.json": ("a whole distill run's memory at 1 000 and 20 000 images (benchmarks/run_memory.py)", "7",
                        "2026-12-02"),
    "data_memory.json": ("the real-image stream's memory at 1 000 and 20 000 images (benchmarks/data_memory.py)", "7",
                         "2026-12-02"),
    "plan_check_sdxl_bf16.json": ("a full-size SDXL iteration's peak RSS against the plan (benchmarks/plan_check.py)",
                                  "8", "2026-12-02"),
    "plan_check_sd3_bf16.json": ("a full-size SD3-medium iteration's peak RSS against the plan", "8", "2026-12-02"),
    "plan_check_sdxl.json": ("a full-size SDXL iteration's peak RSS with fp32 frozen parts", "8", "2026-12-02"),
    "plan_check_sd3.json": ("a full-size SD3-medium iteration's peak RSS with fp32 frozen parts", "8", "2026-12-02"),
    "plan_check_sdxl_three_copies.json": ("a full-size SDXL iteration before one shared base (three fp32 copies)",
                                          "8", "2026-12-02"),
    "vram_table.json": ("the planned VRAM table (benchmarks/vram_table.py)", "8", "2026-12-06"),
    "quant_cost.json": ("an int8 teacher's x0 error and DM-gradient cosine (benchmarks/quant_cost.py)", "8",
                        "2026-12-06"),
    "quant_stage1.json": ("world-sdxl Stage 1 with an int8 / fp32 / bf16 frozen base, two seeds "
                          "(benchmarks/quant_stage1.py)", "8", "2026-12-06"),
    "data_free.json": ("world-sdxl Stage 1 with the teacher's own images (make-reals) against Fashion-MNIST as "
                       "data_real, two seeds (benchmarks/data_free.py)", "7", "2026-12-06"),
    "attribution.json": ("the pre-registered attribution runs, one record per row, teacher and training seed "
                         "(benchmarks/attribution.py run)", "3a", "2026-12-06"),
    "attribution_cost_sd3.json": ("seconds per generator update of every attribution row, world-sd3, one process, "
                                  "beside two training lanes (benchmarks/attribution.py cost)", "3a", "2026-12-06"),
    "attribution_cost_sdxl.json": ("seconds per generator update of every attribution row, world-sdxl, one process "
                                   "(benchmarks/attribution.py cost)", "3a", "2026-12-06"),
    "stage2_prereg.json": ("the pre-registered Stage-2 comparison: its records, tuning choice, shuffled-LRM check and "
                           "verdict (benchmarks/rl_prereg.py summary)", "4", "2026-12-06"),
    "plan_targets.json": ("issue 31's planned single-card targets with a quantised or offloaded base "
                          "(benchmarks/plan_targets.py)",
                          "8", "2026-12-06"),
}


@table("results_index")
def results_index():
    rows = []
    for path in sorted(RESULTS.glob("*.json")):
        what, where, date = RESULT_FILES.get(path.name, ("not described: add it to RESULT_FILES in "
                                                         "benchmarks/tables.py", "–", "–"))
        d = load(path.name)
        code = d.get("commit", "") if isinstance(d, dict) else ""
        rows.append([f"[`{path.name}`](benchmarks/results/{path.name})", what, where, date,
                     code[:7] if isinstance(code, str) and code else "–"])
    gone = sorted(set(RESULT_FILES) - {p.name for p in RESULTS.glob("*.json")})
    notes = [f"Described but missing: {', '.join(gone)}."] if gone else []
    return ["file", "what it holds", "section", "recorded", "code (where the file says)"], rows, [], notes


# ---------------------------------------------------------------------------------------------------------------
# Rendering, --write and --check

def render(name: str) -> str:
    header, rows, sources, notes = TABLES[name]()
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        assert len(r) == len(header), (name, r)
        lines.append("| " + " | ".join(str(x) for x in r) + " |")
    for note in notes:
        lines += ["", note]
    if sources:
        links = ", ".join(f"[`{s}`](benchmarks/results/{s})" for s in sources)
        lines += ["", ("Source: " if len(sources) == 1 else "Sources: ") + links + "."]
    return "\n".join(lines)


START = re.compile(r"^<!-- table: ([\w-]+) -->$", re.M)
BLOCK = re.compile(r"^(<!-- table: (?P<name>[\w-]+) -->\n)(?P<body>(?:(?!<!-- table: ).)*?)^(<!-- end table -->)$",
                   re.S | re.M)


def regenerate(text: str) -> tuple[str, list[str], list[str]]:
    """BENCHMARKS.md with every table block remade; the names of the blocks whose text changed; the problems
    (a start marker without its end marker, a name this script does not make)."""
    changed, problems = [], []
    if len(START.findall(text)) != len(BLOCK.findall(text)):
        problems.append("a `<!-- table: NAME -->` line without its `<!-- end table -->`")

    def sub(m):
        name = m.group("name")
        if name not in TABLES:
            problems.append(f"unknown table {name!r}")
            return m.group(0)
        new = render(name) + "\n"
        if new != m.group("body"):
            changed.append(name)
        return m.group(1) + new + m.group(4)
    return BLOCK.sub(sub, text), changed, problems


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("names", nargs="*", help="tables to print (default: all)")
    p.add_argument("--write", action="store_true", help="rewrite the tables in the documents in place")
    p.add_argument("--check", action="store_true", help="exit 1 when a table in a document is not what this makes")
    p.add_argument("--list", action="store_true")
    p.add_argument("--doc", action="append", default=[], help="a document to check or write (repeatable; default "
                   "BENCHMARKS.md and README.md); a table is missing when its home document is given without it")
    a = p.parse_args(argv)
    if a.list:
        print("\n".join(f"{n} ({HOME.get(n, DOC.name)})" for n in TABLES))
        return 0
    if a.write or a.check:
        status = 0
        for doc in [Path(d) for d in a.doc] or DOCS:
            status = max(status, write_or_check(doc, a.check))
        return status
    for name in a.names or TABLES:
        print(f"<!-- table: {name} -->\n{render(name)}\n<!-- end table -->\n")
    return 0


def write_or_check(doc: Path, check: bool) -> int:
    """Remake the table blocks of one document: with ``check`` print the difference and return 1 when a block is
    out of date or a table whose home is this document is absent, else write the document."""
    text = doc.read_text()
    new, changed, problems = regenerate(text)
    present = {m.group("name") for m in BLOCK.finditer(text)}
    missing = [n for n in TABLES if HOME.get(n, DOC.name) == doc.name and n not in present]
    if problems:
        print(f"{doc}: {'; '.join(problems)}", file=sys.stderr)
        return 1
    if check:
        for line in difflib.unified_diff(text.splitlines(), new.splitlines(), doc.name, "generated",
                                         lineterm="", n=1):
            print(line)
        if changed or missing:
            print(f"{doc.name}: tables out of date: {', '.join(changed) or '-'}; not in the document: "
                  f"{', '.join(missing) or '-'} (python benchmarks/tables.py --write)", file=sys.stderr)
            return 1
        return 0
    doc.write_text(new)
    print(f"{doc.name}: rewrote {len(changed)} table(s): {', '.join(changed) or '-'}; not in the document: "
          f"{', '.join(missing) or '-'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
