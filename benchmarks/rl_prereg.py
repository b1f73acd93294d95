"""The pre-registered Stage-2 comparison (BENCHMARKS.md section 4, "Pre-registered next: Stage 2 with held-out judges
and controls", fixed 2026-12-06): its runs, its scoring and its verdict, in five resumable steps.

    P=".venv/bin/python benchmarks/rl_prereg.py"
    $P bases --seeds 0 1 3 4 5 --out R   # Stage 1 of `flashdmd demo --seed N` (300 generator updates): R/bases/seedN
    $P shuffled-lrm --out R              # lrm-sdxl's 2 000 pairs again, each preference flipped at random (p 0.5,
                                         # seed 0), an LRM trained on them: R/lrm-sdxl-shuffled, R/shuffled_lrm.json
    $P tune --out R                      # rl_alone, joint_5 on bases 0, 1 at rl_lr 1e-7 / 2.5e-7 / 5e-7: R/tuning.json
    $P report --out R                    # rl_alone, joint_5, distill_5, rl_alone_shuffled on bases 3, 4, 5
    $P verdict --out R                   # the pre-registered "What will be said": R/verdict.json
    $P summary --out R --to benchmarks/results/stage2_prereg.json   # all of it so far, for the tables

Every step reads back what an earlier call finished and does only the rest: a base whose checkpoint at the end of
Stage 1 exists, pairs files whose .meta.json exists, an LRM folder with metrics.json, a Stage-2 row whose folder holds
metrics.json (benchmarks/rl.py's run_row, whose granularity is the row), a score file per (student, noise seed). Every
file is written atomically (flashdmd.io). R/stage2_prereg.json: one record per (phase, row, base, rl_lr), each with
the scores of the base (update 0) and of the students at RL updates 100, 200, 300, 400: per noise seed and their mean.

The bases. `flashdmd demo --seed N` builds DistillConfig.from_sources(configs/world_sdxl_demo.yaml, ["run_seed=N"])
and trains it, Stage 2 included (flashdmd/demo.py). Its set-up, with rl_enabled true, loads the shipped LRM once to
check it (training/reward_model.check_reward_model), which draws from torch's global generator before the roles'
random initial weights are drawn: with rl_enabled false the same seed gave another Stage 1. (Since commit 3e4e484
the check runs on a forked generator and rl_enabled no longer moves Stage 1; the recorded run's bases were made at
996160a, before that, so the same command now gives other bases.) So a base here is that very config, stopped
after Stage 1 (training.distill.train(max_iterations = run_max_steps x fake_score_ttur), which skips Stage 2),
with the preset's checkpoint every 100 generator updates: checkpoints/step_00000300 is the state at the last
Stage-1 step and the run folder's student (the EMA) is the demo's Stage-1 student.

The students at RL updates 100 ... 400. Every Stage-2 row is benchmarks/rl.py's run_row from the base checkpoint,
with eval_keep_students=all: at every evaluation the evaluated student (the EMA, what the run's own evaluations and
its final student are) is written as the run folder students/step_<global step>. Evaluations fall on global steps
(training/run.py maybe_eval: global_step % eval_every_steps == 0), and the global step counts every student update:
RL updates and, in the joint rows, the generator update of each Stage-1 cycle (training/state.py student_updated).
A cycle follows every rl_distill_ratio-th RL update (stage2.run_stage2 / iterations_due), its generator update first,
so after RL update u the student that includes the cycles owed so far sits at global step
base + u + u // ratio (:func:`global_step`): 400, 500, 600, 700 for rl_alone from a 300-step base, 420, 540, 660, 780
for joint_5 / distill_5 (its 80 cycles at 400 included). eval_every_steps is their greatest common divisor (100; 60,
whose evaluations in between are extra); each kept student's run.json (rl_steps, generator_steps) is checked against
the update it stands for. The run's own evaluations use --eval-images (default 100) and seed 0: only the mechanism
that writes the students (they draw from their own generators, not the run's); the numbers are the scores below.

Update 0 is the base run folder's student (Stage 1's EMA: what Stage 2 starts from), scored once per base; where that
folder's student is not Stage 1's (a `flashdmd demo` folder put at OUT/bases/seedN, which went on into Stage 2), the
row's own copy of it, kept by its baseline evaluation at the base's global step.

Scoring (:func:`score_images`): sample_images once per (student, noise seed) on the test split's evaluation prompts
(flashdmd.world.prompts.eval_prompts(N, "test")), N = 1 000, noise seeds 1, 2, 3; from those images FD, alignment,
diversity (flashdmd.world.metrics.evaluate_images), the oracle's mean score, and confidence: the mean of the
evaluation classifier's log_softmax at the prompted class (the classifier FD uses).

tune and report take --bases / --rows (and tune --lrs) to split the work into lanes that share OUT (one process per
core; records are merged by key, rows never overlap). The hidden sizing options (--smoke, --rl-steps, --checkpoints,
--num-images, --noise-seeds, --eval-images, --set, --base-set, --pairs-each, --lrm-train) exist for the tests: a record
lists every one that differs from the pre-registration under "deviations", and `verdict` refuses report records that
have any (or bases other than 3, 4, 5) unless --allow-deviations.
"""
import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import rl  # noqa: E402  (benchmarks/rl.py: run_row, row_folder, ROWS)

PRESET = "world_sdxl_demo.yaml"
TUNE_BASES = (0, 1)
REPORT_BASES = (3, 4, 5)
LRS = ("1e-7", "2.5e-7", "5e-7")
RL_STEPS = 400
CHECKPOINTS = (100, 200, 300, 400)
NUM_IMAGES = 1000
NOISE_SEEDS = (1, 2, 3)
EVAL_IMAGES = 100          # the runs' own evaluations (>= 20, the world's minimum): they only write the students
STAGE2_SEED = 0
FD_BAR = 0.05              # the demo's bar: test FD within +5 % of the base
MARGIN_SE = 2.0            # "by more than twice its standard error"
METRICS = ("fd", "alignment", "diversity", "oracle", "confidence")
DISTILL_OFF_LR = 1e-12     # rl.py's distill_5: RL switched off by a vanishing step
# the pre-registration's rows -> (benchmarks/rl.py's row, RL:distillation ratio)
ROWS = {"rl_alone": ("no_distill", 0), "joint_5": ("joint_5", 5), "distill_5": ("distill_5", 5),
        "rl_alone_shuffled": ("no_distill", 0)}
TUNED_ROWS = ("rl_alone", "joint_5")
CONTROL = {"joint_5": "distill_5"}   # every other row's control is its base (update 0)
SHIPPED_LRM = "world (flashdmd/world/assets/lrm-sdxl)"
PAPER_CLAIM = ("The paper (Flash-DMD, arXiv 2511.20549) reports joint RL at 5:1 better than post-hoc RL, with the "
               "ongoing distillation as the regulariser against reward hacking.")

# the shipped lrm-sdxl (flashdmd/world/assets/lrm-sdxl/README.md, "Exact commands"): its two pair files and its recipe
PAIR_FILES = (("same16", ["--steps-a", "16", "--steps-b", "16", "--seed", "0"]),
              ("steps16v4", ["--steps-a", "16", "--steps-b", "4", "--seed", "1"]))
PAIRS_EACH = 1000
LRM_TRAIN = ["--steps", "1000", "--batch", "64", "--lr", "1e-3", "--threads", "1", "--log-every", "100"]
README_A_PREFERRED = {"same16": 0.502, "steps16v4": 0.605}   # the README's table, to compare the regenerated files
FLIP_P, FLIP_SEED = 0.5, 0


# ---------------------------------------------------------------------------------------------------
# small pure pieces


def global_step(base_steps: int, ratio: int, u: int) -> int:
    """The global step of the student after RL update ``u`` and the Stage-1 cycles owed by then (one generator update
    after every ``ratio``-th RL update; ratio 0: none)."""
    return base_steps + u + (u // ratio if ratio else 0)


def eval_every(targets) -> int:
    """The largest eval_every_steps whose evaluations fall on every target global step."""
    return math.gcd(*targets)


def flip_records(records: list[dict], p: float = FLIP_P, seed: int = FLIP_SEED) -> tuple[list[dict], list[bool]]:
    """Each pair's preference flipped with probability ``p`` (torch.Generator seeded ``seed``, one uniform draw per
    pair in order): ``preferred`` a <-> b, which swaps winner and loser as the pairs format defines them
    (rewards/pairs.load_pairs orients by it). Records are copied, ``meta.flipped`` says which; the rest is untouched."""
    import torch
    draws = (torch.rand(len(records), generator=torch.Generator().manual_seed(seed)) < p).tolist()
    out = []
    for r, flip in zip(records, draws):
        r = dict(r, meta={**(r.get("meta") or {}), "flipped": flip})
        if flip:
            r["preferred"] = {"a": "b", "b": "a"}[r["preferred"]]
        out.append(r)
    return out, draws


def mean_se(xs) -> tuple[float, float]:
    """Mean and standard error (sample standard deviation / sqrt n; inf below two values)."""
    xs = [float(x) for x in xs]
    m = sum(xs) / len(xs)
    if len(xs) < 2:
        return m, math.inf
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1) / len(xs))


def mean_metrics(per_seed: dict) -> dict:
    return {k: sum(s[k] for s in per_seed.values()) / len(per_seed) for k in METRICS}


def choose_lrs(records: list[dict], bases=TUNE_BASES, lrs=LRS, bar: float = FD_BAR) -> dict:
    """The pre-registered step size per tuned row: the largest rl_lr whose test FD after the last RL update stays
    within +``bar`` of its base's on every tuning base; the smallest if none does. Returns the choice and every
    number it used."""
    out = {}
    by = {(r["row"], r["base_seed"], r["rl_lr"]): r for r in records if r["phase"] == "tune"}
    for row in TUNED_ROWS:
        table, ok = {}, []
        for lr in sorted(lrs, key=float):
            cells = {}
            for b in bases:
                rec = by.get((row, b, float(lr)))
                if rec is None:
                    raise ValueError(f"tuning lacks {row} on base {b} at rl_lr {lr}")
                last = str(max(int(k) for k in rec["checkpoints"]))
                fd0, fd = rec["checkpoints"]["0"]["mean"]["fd"], rec["checkpoints"][last]["mean"]["fd"]
                cells[str(b)] = {"base_fd": fd0, "fd": fd, "rl_steps": int(last), "fd_change": fd / fd0 - 1,
                                 "within": fd <= (1 + bar) * fd0}
            within = all(c["within"] for c in cells.values())
            table[lr] = {"bases": cells, "within_on_every_base": within}
            if within:
                ok.append(lr)
        chosen = max(ok, key=float) if ok else min(lrs, key=float)
        out[row] = {"rl_lr": chosen, "rule": "largest within" if ok else "none within: the smallest", "lrs": table}
    out["rl_alone_shuffled"] = {"rl_lr": out["rl_alone"]["rl_lr"], "rule": "rl_alone's"}
    out["bar"] = bar
    return out


def _changes(by: dict, row: str, base: int, ckpt: str) -> dict:
    """The row's change against its own control at a checkpoint (joint_5: distill_5 at the same one; otherwise the
    base, update 0), every metric."""
    rec = by[(row, base)]["checkpoints"]
    ctrl = by[(CONTROL[row], base)]["checkpoints"][ckpt] if row in CONTROL else rec["0"]
    return {k: rec[ckpt]["mean"][k] - ctrl["mean"][k] for k in METRICS}


def verdict(records: list[dict], k: float = MARGIN_SE) -> dict:
    """The pre-registered "What will be said", from the report records (the students after the last RL update, means
    over the noise seeds, per base against the row's own control):

    * joint RL "regularises" only if joint_5's FD change per unit of oracle gain (against distill_5) is lower than
      rl_alone's (against the base) by more than ``k`` standard errors of their per-base difference, over the report
      bases, with joint_5's confidence not falling (its mean change against distill_5 >= 0). A row whose oracle gain
      is not positive on some base has no FD cost per unit of gain: not shown.
    * RL "learns the preference" only if rl_alone's oracle gain beats rl_alone_shuffled's (both against the base) by
      more than ``k`` standard errors of their per-base difference.
    """
    rep = [r for r in records if r["phase"] == "report"]
    by = {(r["row"], r["base_seed"]): r for r in rep}
    bases = sorted({r["base_seed"] for r in rep})
    missing = [f"{row} on base {b}" for b in bases for row in ROWS if (row, b) not in by]
    out = {"bases": bases, "paper": PAPER_CLAIM}
    if not bases or missing:
        out["incomplete"] = missing or ["no report records"]
        out["regularises"] = {"shown": False, "statement": "Joint RL regularises: not shown (incomplete: "
                              + ", ".join(out["incomplete"]) + ")"}
        out["learns_preference"] = {"shown": False, "statement": "RL learns the preference: not shown (incomplete)"}
        return out
    last = str(min(max(int(c) for c in r["checkpoints"]) for r in rep))
    out["rl_steps"] = int(last)
    out["per_base"] = {row: {str(b): {c: _changes(by, row, b, c) for c in sorted(by[(row, b)]["checkpoints"], key=int)
                                      if c != "0"} for b in bases} for row in ROWS}
    ch = {row: {b: _changes(by, row, b, last) for b in bases} for row in ROWS}

    # regularisation: FD change per unit of oracle gain, joint_5 (vs distill_5) against rl_alone (vs base)
    reg = {"per_base": {}}
    bad = [f"{row} on base {b} (oracle {ch[row][b]['oracle']:+.4f})" for row in TUNED_ROWS for b in bases
           if ch[row][b]["oracle"] <= 0]
    for b in bases:
        reg["per_base"][str(b)] = {row: {"fd_change": ch[row][b]["fd"], "oracle_gain": ch[row][b]["oracle"],
                                         "fd_per_oracle": (ch[row][b]["fd"] / ch[row][b]["oracle"]
                                                           if ch[row][b]["oracle"] > 0 else None)}
                                   for row in TUNED_ROWS}
    conf, conf_se = mean_se(ch["joint_5"][b]["confidence"] for b in bases)
    reg.update(joint_confidence_change=conf, joint_confidence_change_se=conf_se, confidence_not_falling=conf >= 0)
    if bad:
        reg.update(shown=False, statement="Joint RL regularises: not shown (no positive oracle gain, so no FD cost per "
                   "unit of gain, for " + ", ".join(bad) + ")")
    else:
        d = [ch["joint_5"][b]["fd"] / ch["joint_5"][b]["oracle"] - ch["rl_alone"][b]["fd"] / ch["rl_alone"][b]["oracle"]
             for b in bases]
        m, se = mean_se(d)
        lower = m < -k * se
        reg.update(difference=m, difference_se=se, lower_by_margin=lower, shown=lower and conf >= 0)
        why = (f"joint_5's FD change per unit oracle gain minus rl_alone's: {m:+.3f} (SE {se:.3f}, "
               f"{'beyond' if lower else 'not beyond'} {k:g} SE); joint_5's confidence change {conf:+.4f} "
               f"({'not falling' if conf >= 0 else 'falling'})")
        reg["statement"] = f"Joint RL regularises: {'shown' if reg['shown'] else 'not shown'} ({why})"
    out["regularises"] = reg

    # learning the preference: rl_alone's oracle gain against rl_alone_shuffled's
    d = [ch["rl_alone"][b]["oracle"] - ch["rl_alone_shuffled"][b]["oracle"] for b in bases]
    m, se = mean_se(d)
    shown = m > k * se
    out["learns_preference"] = {
        "per_base": {str(b): {"rl_alone": ch["rl_alone"][b]["oracle"], "rl_alone_shuffled":
                              ch["rl_alone_shuffled"][b]["oracle"]} for b in bases},
        "difference": m, "difference_se": se, "shown": shown,
        "statement": (f"RL learns the preference: {'shown' if shown else 'not shown'} (rl_alone's oracle gain minus "
                      f"rl_alone_shuffled's: {m:+.4f}, SE {se:.4f}, {'beyond' if shown else 'not beyond'} {k:g} SE)")}
    out["confidence_change"] = {row: mean_se(ch[row][b]["confidence"] for b in bases)[0] for row in ROWS}
    return out


# ---------------------------------------------------------------------------------------------------
# files


def write_json(path: Path, obj) -> None:
    from flashdmd import io
    path.parent.mkdir(parents=True, exist_ok=True)
    io.atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def read_records(out: Path) -> list[dict]:
    path = out / "stage2_prereg.json"
    return json.loads(path.read_text()) if path.is_file() else []


def save_record(out: Path, rec: dict) -> None:
    """Add or replace the record of (phase, row, base, rl_lr) in OUT/stage2_prereg.json."""
    import fcntl
    key = ("phase", "row", "base_seed", "rl_lr")
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "stage2_prereg.lock", "w") as lock:   # lanes sharing OUT: one read-modify-write at a time
        fcntl.flock(lock, fcntl.LOCK_EX)
        recs = [r for r in read_records(out) if tuple(r[k] for k in key) != tuple(rec[k] for k in key)] + [rec]
        recs.sort(key=lambda r: ({"tune": 0, "report": 1}.get(r["phase"], 2), r["base_seed"],
                                 list(ROWS).index(r["row"]), r["rl_lr"]))
        write_json(out / "stage2_prereg.json", recs)


# ---------------------------------------------------------------------------------------------------
# scoring


def score_images(images, labels, classifier=None, oracle=None) -> dict:
    """FD, alignment, diversity, the oracle's mean score and confidence (the evaluation classifier's mean
    log-probability of the prompted class) of one set of generated images (N, 1|3, 32, 32) in [-1, 1] and their
    prompted classes."""
    import torch
    from flashdmd.world.classifier import load_eval_classifier
    from flashdmd.world.metrics import classifier_outputs, evaluate_images
    from flashdmd.world.oracle import Oracle
    classifier = classifier or load_eval_classifier()
    oracle = oracle or Oracle.load()
    y = torch.as_tensor(labels, dtype=torch.long)
    m = evaluate_images(images, y, classifier)
    _, logits = classifier_outputs(classifier, images)
    m["confidence"] = float(torch.log_softmax(logits.double(), 1).gather(1, y[:, None]).mean())
    m["oracle"] = float(oracle.score(images, y).mean())
    return m


def score_student(folder: Path, num_images: int, seeds) -> dict:
    """{seed: metrics} of the run folder's student, one sample_images per noise seed; each seed's numbers are kept in
    FOLDER/prereg_scores/n<N>_seed<S>.json and read back."""
    from flashdmd.inference import load_model, sample_images
    from flashdmd.world.prompts import eval_prompts
    out, model = {}, None
    for seed in seeds:
        path = folder / "prereg_scores" / f"n{num_images}_seed{seed}.json"
        if path.is_file():
            out[str(seed)] = json.loads(path.read_text())
            continue
        model = model or load_model(str(folder))
        prompts, labels = eval_prompts(num_images, "test")
        t0 = time.time()
        images = sample_images(model, prompts, seed)
        m = score_images(images, labels)
        m.update(num_images=num_images, seed=seed, split="test", seconds=time.time() - t0)
        write_json(path, m)
        print(f"  scored {folder} seed {seed}: " + " ".join(f"{k} {m[k]:.4f}" for k in METRICS), flush=True)
        out[str(seed)] = m
    return out


# ---------------------------------------------------------------------------------------------------
# the steps


def demo_config(seed: int, sets):
    """`flashdmd demo --seed N`'s config (flashdmd/demo.py), then ``sets``."""
    from flashdmd.training.config import DistillConfig
    return DistillConfig.from_sources(ROOT / "configs" / PRESET, [f"run_seed={seed}"] + list(sets))


def base_checkpoint(out: Path, seed: int, a) -> Path:
    cfg = demo_config(seed, a.base_set)
    return out / "bases" / f"seed{seed}" / "checkpoints" / f"step_{cfg.run_max_steps:08d}"


def make_base(out: Path, seed: int, a) -> Path:
    """Stage 1 of the demo at ``seed`` into OUT/bases/seedN (resumed from its newest checkpoint if interrupted)."""
    from flashdmd import FlashDMDError
    from flashdmd.training.checkpoint import verify
    from flashdmd.training.distill import train
    folder, ckpt = out / "bases" / f"seed{seed}", base_checkpoint(out, seed, a)
    if ckpt.is_dir() and not verify(ckpt) and (folder / "run.json").is_file():
        print(f"base {seed}: {ckpt} exists", flush=True)
        return ckpt
    cfg = demo_config(seed, a.base_set)
    ckpts = folder / "checkpoints"
    resume = "latest" if ckpts.is_dir() and any(p.name.startswith("step_") for p in ckpts.iterdir()) else None
    print(f"base {seed}: Stage 1 of {PRESET}, run_seed {seed} {' '.join(a.base_set)}"
          + (" (resumed)" if resume else ""), flush=True)
    t0 = time.time()
    # the demo's own config (rl_enabled true: its set-up draws as the demo's does), stopped after Stage 1
    train(cfg, folder, progress=not a.no_progress, max_iterations=cfg.run_max_steps * cfg.fake_score_ttur,
          resume=resume, overwrite=resume is None)
    if not ckpt.is_dir() or verify(ckpt):
        raise FlashDMDError(f"base {seed}: no intact checkpoint {ckpt} after Stage 1 (run_checkpoint_every_steps must "
                            f"divide run_max_steps {cfg.run_max_steps})")
    print(f"base {seed}: done in {time.time() - t0:.0f} s", flush=True)
    return ckpt


def run_row(out: Path, phase: str, row: str, base: int, lr: str | None, a, lrm: str | None = None) -> dict:
    """One Stage-2 row from a base (benchmarks/rl.py's run_row, keeping the students at the checkpoints), scored;
    its record is added to OUT/stage2_prereg.json."""
    from flashdmd import FlashDMDError
    ckpt = base_checkpoint(out, base, a)
    if not (ckpt / "state.json").is_file():
        raise FlashDMDError(f"base {base} has no checkpoint {ckpt}: run `benchmarks/rl_prereg.py bases --seeds {base}`")
    base_steps = json.loads((ckpt / "state.json").read_text())["generator_steps"]
    name, ratio = ROWS[row]
    targets = {u: global_step(base_steps, ratio, u) for u in a.checkpoints}
    sets = ["eval_keep_students=all", f"eval_every_steps={eval_every(targets.values())}"]
    if lrm is not None:
        sets.append(f"rl_reward_model={lrm}")
    row_out = out / phase / f"base{base}" / ("shuffled" if row == "rl_alone_shuffled" else "")
    ns = SimpleNamespace(out=str(row_out), rl_steps=a.rl_steps, num_images=a.eval_images, preset=PRESET,
                         set=sets + list(a.set), kl_weight=1.0, no_progress=a.no_progress)
    print(f"[{phase}] {row} base {base} rl_lr {lr or DISTILL_OFF_LR}", flush=True)
    result = rl.run_row(name, STAGE2_SEED, ns, ckpt, base_steps, lr)
    folder = rl.row_folder(ns.out, lr, name, STAGE2_SEED)
    # update 0: the base run folder's student (Stage 1's EMA, the student Stage 2 starts from), scored once per base;
    # where that folder went on past Stage 1 (a demo run's), the row's own copy of it (its baseline evaluation's)
    base_dir = out / "bases" / f"seed{base}"
    if _counters(base_dir) != (0, base_steps):
        base_dir = folder / "students" / f"step_{base_steps:08d}"
    checkpoints = {"0": {"folder": str(base_dir), "rl_steps": 0, "generator_steps": base_steps,
                         "global_step": base_steps}}
    for u, g in [(0, base_steps)] + list(targets.items()):
        student = Path(checkpoints["0"]["folder"]) if u == 0 else folder / "students" / f"step_{g:08d}"
        want = (u, base_steps + (u // ratio if ratio else 0))
        if _counters(student) != want:
            raise FlashDMDError(f"{folder}: no student of RL update {u} at {student} (rl_steps / generator_steps "
                                f"{want}; found {_counters(student)}): rerun the row (remove its folder)")
        checkpoints[str(u)] = {"folder": str(student), "rl_steps": u, "generator_steps": want[1], "global_step": g}
    for c in checkpoints.values():
        c["seeds"] = score_student(Path(c["folder"]), a.num_images, a.noise_seeds)
        c["mean"] = mean_metrics(c["seeds"])
    rec = {"phase": phase, "row": row, "base_seed": base, "rl_lr": float(lr) if lr else DISTILL_OFF_LR,
           "rl_steps": a.rl_steps, "rl_distill_ratio": ratio, "rl_py_row": name, "stage2_seed": STAGE2_SEED,
           "lrm": lrm or SHIPPED_LRM, "run_eval_images": a.eval_images, "num_images": a.num_images, "noise_seeds": list(a.noise_seeds),
           "split": "test", "folder": str(folder), "hacking_warnings": len(result.get("warnings", [])),
           "wall_seconds": result.get("wall_seconds"), "deviations": a.deviations, "checkpoints": checkpoints}
    save_record(out, rec)
    return rec


def _counters(run_dir: Path):
    """(rl_steps, generator_steps) of a run folder's student (its run.json), or None."""
    path = run_dir / "run.json"
    info = json.loads(path.read_text()) if path.is_file() else {}
    return (info["rl_steps"], info["generator_steps"]) if "rl_steps" in info else None


def cmd_bases(a) -> int:
    for seed in a.seeds:
        make_base(Path(a.out), seed, a)
    return 0


def _cli(args: list[str]) -> None:
    """`python -m flashdmd.cli ARGS` in a child process (the README's commands as written)."""
    from flashdmd import FlashDMDError
    cmd = [sys.executable, "-m", "flashdmd.cli"] + args
    print(" ".join(cmd[1:]), flush=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    if subprocess.run(cmd, cwd=ROOT, env=env).returncode:
        raise FlashDMDError(f"failed: {' '.join(cmd[1:])}")


def heldout_accuracy(lrm_dir: Path, pair_files: list[Path], val_frac: float = 0.1, seed: int = 0,
                     draws: int = 2) -> dict:
    """An LRM's held-out pairwise accuracy per noise band on the pairs files as they are (the split and the draws of
    `flashdmd reward train` with its defaults: split_indices(n, 0.1, seed 0), evaluation seed + 100)."""
    import torch
    from flashdmd.families import load_family
    from flashdmd.networks.reward import LatentRewardModel
    from flashdmd.rewards.pairs import PairSet, load_pairs
    from flashdmd.rewards.train import PromptBank, band_accuracies, split_indices
    family = load_family("world-sdxl", device="cpu", frozen_dtype=torch.float32)
    model = LatentRewardModel.load(str(lrm_dir), family)
    pairs = PairSet.cat([load_pairs(p, family) for p in pair_files])
    _, val = split_indices(len(pairs), val_frac, seed)
    bank = PromptBank(family, pairs.prompts)
    return {"shared_noise": band_accuracies(model, pairs, bank, val, draws, seed + 100),
            "independent_noise": band_accuracies(model, pairs, bank, val, draws, seed + 100, shared_noise=False),
            "num_heldout": len(val)}


def write_flipped(pairs_dir: Path) -> dict:
    """The two pair files with each preference flipped at random (one draw per pair over both files in order) as
    PAIRS/<name>_shuffled.jsonl with a copy of its latents; returns what was flipped."""
    from flashdmd import io
    from flashdmd.rewards.pairs import companion_path, read_records as read_pairs, write_pairs
    recs = {name: read_pairs(pairs_dir / f"{name}.jsonl") for name, _ in PAIR_FILES}
    flipped, draws = flip_records([r for name, _ in PAIR_FILES for r in recs[name]])
    info, start = {}, 0
    for name, _ in PAIR_FILES:
        n = len(recs[name])
        src, dst = pairs_dir / f"{name}.jsonl", pairs_dir / f"{name}_shuffled.jsonl"
        latents = companion_path(src)
        io.atomic_write(companion_path(dst), lambda f, p=latents: shutil.copyfileobj(p.open("rb"), f),
                        "the flipped pairs' latents", latents.stat().st_size)
        write_pairs(dst, flipped[start:start + n], None)
        info[name] = {"pairs": n, "flipped": sum(draws[start:start + n]), "file": str(dst)}
        start += n
    return {"p": FLIP_P, "seed": FLIP_SEED, "generator": "torch.Generator().manual_seed(0); torch.rand(n) < p over "
            "same16 then steps16v4", "pairs": len(draws), "flipped": sum(draws),
            "flipped_fraction": sum(draws) / len(draws), "files": info}


def cmd_shuffled_lrm(a) -> int:
    out = Path(a.out)
    pairs_dir, lrm_dir = out / "pairs", out / "lrm-sdxl-shuffled"
    pairs_dir.mkdir(parents=True, exist_ok=True)
    for name, opts in PAIR_FILES:   # the README's make-pairs commands, --out here
        if not (pairs_dir / f"{name}.meta.json").is_file():
            _cli(["reward", "make-pairs", "--model", "world-sdxl", "--num", str(a.pairs_each), "--out",
                  str(pairs_dir / f"{name}.jsonl")] + opts + ["--threads", "1", "--no-progress"])
    flips = write_flipped(pairs_dir)
    if not (lrm_dir / "metrics.json").is_file():   # the README's training recipe on the flipped pairs
        _cli(["reward", "train", "--pairs"] + [str(pairs_dir / f"{n}_shuffled.jsonl") for n, _ in PAIR_FILES]
             + ["--family-model", "world-sdxl", "--out", str(lrm_dir)] + a.lrm_train)
    original = [pairs_dir / f"{n}.jsonl" for n, _ in PAIR_FILES]
    metas = {n: json.loads((pairs_dir / f"{n}.meta.json").read_text()) for n, _ in PAIR_FILES}
    trained = json.loads((lrm_dir / "metrics.json").read_text())
    summary = {
        "flips": flips,
        "regenerated": {n: {"a_preferred": m["a_preferred"], "readme_a_preferred": README_A_PREFERRED[n],
                            "mean_score_a": m["mean_score_a"], "mean_score_b": m["mean_score_b"], "pairs": m["pairs"]}
                        for n, m in metas.items()},
        "shuffled_lrm": str(lrm_dir),
        "shuffled_heldout_accuracy_on_original_pairs": heldout_accuracy(lrm_dir, original),
        "shuffled_heldout_accuracy_on_flipped_pairs": trained["heldout_accuracy"],
        "shipped_lrm_heldout_accuracy_on_regenerated_pairs": heldout_accuracy(
            ROOT / "flashdmd" / "world" / "assets" / "lrm-sdxl", original),
        "train_recipe": a.lrm_train, "deviations": a.deviations}
    write_json(out / "shuffled_lrm.json", summary)
    print(json.dumps({k: summary[k] for k in ("shuffled_heldout_accuracy_on_original_pairs",
                                              "shipped_lrm_heldout_accuracy_on_regenerated_pairs")}, indent=2))
    print(f"flipped {flips['flipped']} of {flips['pairs']} ({flips['flipped_fraction']:.3f}); wrote "
          f"{out / 'shuffled_lrm.json'}")
    return 0


def cmd_tune(a) -> int:
    """The tuning runs (--bases / --rows / --lrs: a lane's share of them), then tuning.json once every run the rule
    needs is recorded. The rule runs over the pre-registered bases and step sizes; with --smoke over the given ones."""
    out = Path(a.out)
    for lr in a.lrs:
        for base in a.bases or TUNE_BASES:
            for row in a.rows or TUNED_ROWS:
                run_row(out, "tune", row, base, lr, a)
    bases, lrs = (a.bases or TUNE_BASES, a.lrs) if a.smoke else (TUNE_BASES, LRS)
    try:
        choice = choose_lrs(read_records(out), bases, lrs)
    except ValueError as e:
        print(f"tuning.json not written yet: {e}")
        return 0
    deviations = sorted(set(a.deviations) | ({"bases"} if tuple(bases) != TUNE_BASES else set())
                        | ({"lrs"} if tuple(lrs) != LRS else set()))
    choice.update(rl_steps=a.rl_steps, num_images=a.num_images, noise_seeds=list(a.noise_seeds), bases=list(bases),
                  deviations=deviations)
    write_json(out / "tuning.json", choice)
    for row in TUNED_ROWS:
        print(f"{row}: rl_lr {choice[row]['rl_lr']} ({choice[row]['rule']})")
    return 0


def cmd_report(a) -> int:
    from flashdmd import FlashDMDError
    out = Path(a.out)
    if not (out / "tuning.json").is_file():
        raise FlashDMDError(f"{out / 'tuning.json'} is missing: run `benchmarks/rl_prereg.py tune --out {out}` first "
                            "(the step sizes are chosen on the tuning bases only)")
    tuning = json.loads((out / "tuning.json").read_text())
    if tuning.get("deviations") and not a.deviations:
        raise FlashDMDError(f"{out / 'tuning.json'} was made with {', '.join(tuning['deviations'])} other than the "
                            "pre-registration's: rerun `tune` at the pre-registered sizes")
    lrm = out / "lrm-sdxl-shuffled"
    rows = a.rows or list(ROWS)
    if "rl_alone_shuffled" in rows and not (lrm / "lrm.json").is_file():
        raise FlashDMDError(f"{lrm} is missing: run `benchmarks/rl_prereg.py shuffled-lrm --out {out}` first")
    for base in a.bases or REPORT_BASES:
        for row in rows:
            lr = None if row == "distill_5" else str(tuning[row]["rl_lr"])
            run_row(out, "report", row, base, lr, a, lrm=str(lrm.resolve()) if row == "rl_alone_shuffled" else None)
    return 0


def cmd_verdict(a) -> int:
    from flashdmd import FlashDMDError
    out = Path(a.out)
    recs = [r for r in read_records(out) if r["phase"] == "report"]
    bad = sorted({d for r in recs for d in r.get("deviations", [])}
                 | ({"bases"} if {r["base_seed"] for r in recs} != set(REPORT_BASES) else set()))
    if bad and not a.allow_deviations:
        raise FlashDMDError(f"the report records deviate from the pre-registration ({', '.join(bad)}): rerun without "
                            "them, or pass --allow-deviations")
    v = verdict(recs)
    v["deviations"] = bad
    write_json(out / "verdict.json", v)
    for row, per in v.get("per_base", {}).items():
        ctrl = CONTROL.get(row, "base")
        for b, cks in per.items():
            c = cks[str(v["rl_steps"])]
            print(f"{row:18s} base {b} vs {ctrl:9s}: " + "  ".join(f"{k} {c[k]:+.4f}" for k in METRICS))
    print(v["regularises"]["statement"])
    print(v["learns_preference"]["statement"])
    print(v["paper"])
    return 0


def cmd_summary(a) -> int:
    """Everything OUT holds so far in one file (--to; benchmarks/results/stage2_prereg.json): the records, the tuning
    choice, the shuffled LRM's check and the verdict over the report records landed so far (its "incomplete" names
    what is missing). Paths are made relative to OUT. Run after every landed row; the tables read this file."""
    out = Path(a.out).resolve()
    recs = json.loads(json.dumps(read_records(out)).replace(str(out) + "/", ""))

    def opt(name):
        path = out / name
        return json.loads(path.read_text()) if path.is_file() else None
    rep = [r for r in recs if r["phase"] == "report"]
    v = verdict(rep)
    v["deviations"] = sorted({d for r in rep for d in r.get("deviations", [])})
    # row -> base -> checkpoint -> change against the row's control (_changes), where the control has landed
    by = {(r["row"], r["base_seed"]): r for r in rep}
    changes = {row: {} for row in ROWS}
    for (row, b), r in sorted(by.items(), key=lambda kv: kv[0][1]):
        ctrl = by.get((CONTROL.get(row, row), b))
        if ctrl is not None:
            changes[row][str(b)] = {c: _changes(by, row, b, c) for c in sorted(r["checkpoints"], key=int)
                                    if c != "0" and c in ctrl["checkpoints"]}
    shuffled = opt("shuffled_lrm.json")
    if shuffled:
        shuffled["shuffled_lrm"] = shuffled["shuffled_lrm"].replace(str(out) + "/", "")
    write_json(Path(a.to), {"pre_registered": "BENCHMARKS.md section 4, fixed 2026-12-06", "records": recs,
                            "tuning": opt("tuning.json"), "shuffled_lrm": shuffled, "changes": changes,
                            "verdict": v})
    print(f"{len(recs)} record(s) -> {a.to}")
    return 0


# ---------------------------------------------------------------------------------------------------


SMOKE = {"rl_steps": 2, "checkpoints": [1, 2], "num_images": 20, "noise_seeds": [1], "eval_images": 20,
         "pairs_each": 8, "base_set": ["run_max_steps=1", "run_batch_size=2", "run_checkpoint_every_steps=1",
                                       "eval_num_images=20", "eval_every_steps=0", "run_sample_every_steps=0",
                                       "disc_calibration_images=4"],
         "set": ["run_batch_size=2", "rl_num_candidates=2"],
         "lrm_train": ["--steps", "2", "--batch", "4", "--lr", "1e-3", "--threads", "1", "--log-every", "1",
                       "--no-progress"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    cmds = {"bases": cmd_bases, "shuffled-lrm": cmd_shuffled_lrm, "tune": cmd_tune, "report": cmd_report,
            "verdict": cmd_verdict, "summary": cmd_summary}
    H = argparse.SUPPRESS
    for name in cmds:
        s = sub.add_parser(name)
        s.add_argument("--out", required=True)
        s.add_argument("--threads", type=int, default=1)
        s.add_argument("--no-progress", action="store_true")
        if name == "bases":
            s.add_argument("--seeds", nargs="+", type=int, default=list(TUNE_BASES + REPORT_BASES))
        if name == "summary":
            s.add_argument("--to", required=True, help="the summary file (benchmarks/results/stage2_prereg.json)")
        if name == "verdict":
            s.add_argument("--allow-deviations", action="store_true", help=H)
        # sizes of the pre-registration, to be shrunk only by the tests
        s.add_argument("--smoke", action="store_true", help=H)
        s.add_argument("--rl-steps", type=int, default=None, help=H)
        s.add_argument("--checkpoints", type=int, nargs="+", default=None, help=H)
        s.add_argument("--num-images", type=int, default=None, help=H)
        s.add_argument("--noise-seeds", type=int, nargs="+", default=None, help=H)
        s.add_argument("--eval-images", type=int, default=None, help=H)
        s.add_argument("--pairs-each", type=int, default=None, help=H)
        s.add_argument("--set", action="append", default=None, help=H)
        s.add_argument("--base-set", action="append", default=None, help=H)
        s.add_argument("--lrm-train", nargs="+", default=None, help=H)
        if name in ("tune", "report"):   # a lane's share (two lanes on two cores); the rules see every record
            s.add_argument("--bases", type=int, nargs="+", default=None, help="only these bases")
            s.add_argument("--rows", nargs="+", choices=list(ROWS), default=None, help="only these rows")
        if name == "tune":
            s.add_argument("--lrs", nargs="+", default=None, help="only these of rl_lr " + " / ".join(LRS))
    a = p.parse_args(argv)
    prereg = {"rl_steps": RL_STEPS, "checkpoints": list(CHECKPOINTS), "num_images": NUM_IMAGES,
              "noise_seeds": list(NOISE_SEEDS), "eval_images": EVAL_IMAGES, "pairs_each": PAIRS_EACH,
              "set": [], "base_set": [], "lrm_train": LRM_TRAIN, "lrs": list(LRS)}
    a.deviations = []   # what a record measured differently from the pre-registration
    for k, v in prereg.items():
        given = getattr(a, k, None)
        if given is None:
            given = SMOKE.get(k, v) if a.smoke else v
            setattr(a, k, given)
        if k == "lrs":   # --lrs picks among the pre-registered step sizes (one lane each); others deviate
            if not set(map(float, given)) <= set(map(float, LRS)):
                a.deviations.append(k)
        elif given != v and k != "eval_images":   # the runs' own evaluations do not enter the numbers
            a.deviations.append(k)
    if max(a.checkpoints) != a.rl_steps:
        p.error("the last --checkpoints must be --rl-steps")
    from flashdmd import FlashDMDError
    from flashdmd.world import plugin
    plugin.register()
    import torch
    torch.set_num_threads(a.threads)
    try:
        return cmds[a.cmd](a)
    except FlashDMDError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
