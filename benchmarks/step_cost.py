"""Seconds per generator update of each convergence row, measured in one process (BENCHMARKS.md section 3).

The convergence runs' wall times were taken with different numbers of other jobs on the machine, so they do not
compare across rows. This script times the rows' Stage-1 iterations back to back in one process, interleaved in
rounds so that machine noise hits every row alike, and reports seconds per generator update (a TTUR-n row's
update includes its n - 1 critic-only iterations) -- the factor that turns "images through the generator" into
compute.

    .venv/bin/python benchmarks/step_cost.py --family sdxl --out benchmarks/results/step_cost_sdxl.json
"""
import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import add_threads_arg, parse  # noqa: E402
from convergence import ROWS  # noqa: E402


def time_rows(specs: dict, batch: int, updates: int, rounds: int) -> dict:
    """name -> (TTUR, seconds per generator update of each round) for ``specs`` (name -> (preset, overrides)): every
    row set up in this process, one warm-up cycle each, then ``rounds`` rounds of ``updates`` generator updates per row,
    interleaved so that machine noise hits every row alike (a TTUR-n update includes its n - 1 critic iterations)."""
    from flashdmd.training import distill
    from flashdmd.training.config import DistillConfig
    from flashdmd.training.run import RunWriter

    runs = {}
    tmp = Path(tempfile.mkdtemp(prefix="step_cost_"))
    for name, (preset, overrides) in specs.items():
        sets = [f"{k}={v}" for k, v in overrides.items()] + [
            f"run_batch_size={batch}", "eval_every_steps=0", "run_sample_every_steps=0",
            "run_checkpoint_every_steps=0", "run_log_every_steps=1000000", "rl_enabled=false"]
        cfg = DistillConfig.from_sources(str(preset), sets)
        ctx = distill.setup(cfg)
        writer = RunWriter(tmp / name, cfg, ctx)
        for _ in range(cfg.fake_score_ttur):  # warm-up: one full cycle
            distill.distill_iteration(ctx, writer)
        runs[name] = (ctx, writer, cfg.fake_score_ttur, [])
    for _ in range(rounds):
        for name, (ctx, writer, ttur, times) in runs.items():
            t0 = time.perf_counter()
            for _ in range(updates * ttur):
                distill.distill_iteration(ctx, writer)
            times.append((time.perf_counter() - t0) / updates)
    return {name: (ttur, times) for name, (_, _, ttur, times) in runs.items()}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", choices=["sdxl", "sd3"], default="sdxl")
    p.add_argument("--rows", nargs="+", default=["dmd2", "flash_ttur1", "flash_ttur2"], choices=list(ROWS))
    p.add_argument("--updates", type=int, default=4, help="generator updates per row per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch", type=int, default=32)
    add_threads_arg(p)
    p.add_argument("--out", required=True)
    a = parse(p)
    specs = {name: (ROOT / "configs" / f"world_{a.family}_{ROWS[name][0]}.yaml", ROWS[name][1]) for name in a.rows}
    runs = time_rows(specs, a.batch, a.updates, a.rounds)
    result = {"family": a.family, "batch_size": a.batch, "threads": a.threads, "rows": {}}
    for name, (ttur, times) in runs.items():
        s = sorted(times)[len(times) // 2]
        result["rows"][name] = {"ttur": ttur, "seconds_per_generator_update": s, "rounds": times}
        print(f"{name:14s} TTUR {ttur}: {s:.2f} s per generator update (median of {len(times)} rounds)", flush=True)
    if "dmd2" in result["rows"]:
        d = result["rows"]["dmd2"]["seconds_per_generator_update"]
        for row in result["rows"].values():
            row["relative_to_dmd2"] = row["seconds_per_generator_update"] / d
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
