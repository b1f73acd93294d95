"""The demo's spread over training seeds, and issue 16's demo targets checked on each run (README, BENCHMARKS.md
section 5).

Runs `flashdmd demo --seed S` for each seed, one at a time (the demo's 15-minute budget is for the whole
machine), from CHECKOUT -- a fresh clone whose `make setup` has made CHECKOUT/.venv -- so the figures are a new
user's. Then reads each run's metrics.json and checks, per seed:

  beats_teacher_4     the 4-step student's FD is below the teacher's own 4-step sampling
  within_1.1x_of_50   the student's FD is at most 1.1x the teacher's 50-step FD
  stage2_oracle_up    Stage 2 raised the held-out oracle (last evaluation against the end of Stage 1)
  stage2_fd_within_5% Stage 2's FD is at most 1.05x Stage 1's
  no_guard_warning    the reward-hacking guard did not fire
  within_15_min       the demo's own wall time (training, evaluation, report) is at most 15 minutes

    git clone -q /work/main /tmp/demo_clone && make -C /tmp/demo_clone setup
    .venv/bin/python benchmarks/demo_seeds.py --checkout /tmp/demo_clone --seeds 0 1 2 \\
        --out benchmarks/results/demo_seeds.json

--no-run only reads CHECKOUT/runs/demo_seed<S>/metrics.json.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import git_commit  # noqa: E402


def run_seed(checkout: Path, seed: int, threads: str, sets: list[str]) -> None:
    out = checkout / "runs" / f"demo_seed{seed}"
    cmd = [str(checkout / ".venv" / "bin" / "flashdmd"), "--threads", threads, "demo", "--seed", str(seed),
           "--out", str(out)] + [x for kv in sets for x in ("--set", kv)]
    print(" ".join(cmd), flush=True)
    t0 = time.time()
    with open(checkout / "runs" / f"demo_seed{seed}.log", "w") as log:
        subprocess.run(cmd, cwd=checkout, stdout=log, stderr=subprocess.STDOUT, check=True,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    print(f"seed {seed}: {time.time() - t0:.0f} s", flush=True)


def check(metrics: dict) -> dict:
    rows = {r["steps"] if r["model"].startswith("teacher") else "student": r for r in metrics["comparison"]}
    student, t4, t50 = rows["student"], rows[4], rows[50]
    stage1 = [e for e in metrics["evals"] if e.get("stage") == 1][-1]
    stage2 = [e for e in metrics["evals"] if e.get("stage") == 2]
    last = stage2[-1] if stage2 else stage1
    return {"student_fd": student["fd"], "teacher_4_fd": t4["fd"], "teacher_50_fd": t50["fd"],
            "ratio_to_teacher_50": student["fd"] / t50["fd"], "stage1_fd": stage1["fd"],
            "stage1_oracle": stage1.get("oracle"), "stage2_oracle": last.get("oracle"),
            "student_alignment": student["alignment"], "warnings": metrics.get("warnings", []),
            "demo_minutes": metrics["demo_wall_seconds"] / 60,
            "speedup_vs_teacher_50": t50["seconds_per_image"] / student["seconds_per_image"],
            "targets": {"beats_teacher_4": student["fd"] < t4["fd"],
                        "within_1.1x_of_50": student["fd"] <= 1.1 * t50["fd"],
                        "stage2_oracle_up": bool(stage2) and last["oracle"] > stage1["oracle"],
                        "stage2_fd_within_5%": last["fd"] <= 1.05 * stage1["fd"],
                        "no_guard_warning": not metrics.get("warnings"),
                        "within_15_min": metrics["demo_wall_seconds"] <= 15 * 60}}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkout", required=True, help="a fresh clone after `make setup`")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--threads", default="auto", help="flashdmd --threads (default auto, as `make demo`)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="passed to `flashdmd demo --set` (a candidate setting; the README's figures use none)")
    p.add_argument("--no-run", action="store_true")
    p.add_argument("--out", required=True)
    a = p.parse_args()
    checkout = Path(a.checkout).resolve()
    (checkout / "runs").mkdir(exist_ok=True)
    commit = git_commit(checkout, short=False)
    per_seed = {}
    for seed in a.seeds:
        path = checkout / "runs" / f"demo_seed{seed}" / "metrics.json"
        if not a.no_run and not path.is_file():
            run_seed(checkout, seed, a.threads, a.set)
        per_seed[seed] = check(json.loads(path.read_text()))
    fds = [r["student_fd"] for r in per_seed.values()]
    summary = {"commit": commit, "sets": a.set, "seeds": per_seed,
               "student_fd_mean": statistics.mean(fds), "student_fd_sd": statistics.stdev(fds) if len(fds) > 1 else 0.0,
               "student_fd_range": [min(fds), max(fds)],
               "all_targets_met": all(all(r["targets"].values()) for r in per_seed.values())}
    Path(a.out).write_text(json.dumps(summary, indent=2))
    for seed, r in per_seed.items():
        failed = [k for k, ok in r["targets"].items() if not ok]
        print(f"seed {seed}: student FD {r['student_fd']:.2f} (teacher 4: {r['teacher_4_fd']:.2f}, 50: "
              f"{r['teacher_50_fd']:.2f}; {r['ratio_to_teacher_50']:.2f}x), Stage 1 {r['stage1_fd']:.2f}, oracle "
              f"{r['stage1_oracle']:.3f} -> {r['stage2_oracle']:.3f}, {r['demo_minutes']:.1f} min; "
              f"{'all targets met' if not failed else 'missed: ' + ', '.join(failed)}", flush=True)
    print(f"student FD {summary['student_fd_mean']:.2f} +- {summary['student_fd_sd']:.2f} over seeds {a.seeds}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
