"""Evaluation curves of run folders, finished or still running, read from their tensorboard scalars.

A run writes metrics.json only when it ends; its tensorboard events hold every evaluation and logged scalar as
it goes. This collects, for every run folder under the given roots (any folder holding tb/), the FD / alignment
evaluations by generator step and the Pixel-GAN's D(real) - D(fake) per logged interval, so that runs still in
progress can be reported as what they are.

    .venv/bin/python benchmarks/curves.py benchmarks/runs/sweep_sdxl benchmarks/runs/convergence_sdxl_v16 \\
        --out benchmarks/results/curves.json
"""
import argparse
import json
import sys
from pathlib import Path


def scalars(tb: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    ea = EventAccumulator(str(tb), size_guidance={"scalars": 0})
    ea.Reload()
    return {tag: [(e.step, e.value) for e in ea.Scalars(tag)] for tag in ea.Tags()["scalars"]}


def curve(run: Path) -> dict:
    s = scalars(run / "tb")

    def find(suffix):
        return next((v for k, v in s.items() if k.endswith(suffix)), [])
    fd, align = dict(find("eval/fd")), dict(find("eval/alignment"))
    real, fake = dict(find("disc/D_real")), dict(find("disc/D_fake"))
    last = max((st for v in s.values() for st, _ in v), default=0)
    return {"has_metrics_json": (run / "metrics.json").is_file(), "last_logged_step": last,
            "evals": [{"step": st, "fd": round(fd[st], 3), "alignment": round(align.get(st, float("nan")), 3)}
                      for st in sorted(fd)],
            "disc_gap": [[st, round(real[st] - fake[st], 3)] for st in sorted(real) if st in fake]}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("roots", nargs="+")
    p.add_argument("--out", required=True)
    a = p.parse_args()
    runs = {}
    for root in a.roots:
        root = Path(root)
        for tb in sorted(root.glob("**/tb")):
            runs[str(tb.parent.relative_to(root.parent))] = curve(tb.parent)
    Path(a.out).write_text(json.dumps(runs, indent=1))
    for name, r in runs.items():
        ev = [e for e in r["evals"] if e["step"] > 0]
        tail = ", ".join(f"{e['step']}: {e['fd']:.2f}" for e in ev[-4:])
        print(f"{name}: {'metrics.json' if r['has_metrics_json'] else 'no metrics.json yet'}, best {min((e['fd'] for e in ev), default=float('nan')):.2f}; "
              f"last {tail}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
