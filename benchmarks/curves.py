"""Evaluation curves of run folders, finished or still running, read from their tensorboard scalars.

A run writes metrics.json only when it ends; its tensorboard events hold every evaluation and logged scalar as
it goes. This collects, for every run folder under the given roots (any folder holding tb/), the FD / alignment
evaluations by generator step and the Pixel-GAN's D(real) - D(fake) per logged interval, so that runs still in
progress can be reported as what they are.

    .venv/bin/python benchmarks/curves.py benchmarks/runs/sweep_sdxl benchmarks/runs/dmd2_sdxl \\
        --out benchmarks/results/curves.json

--plot draws every run's FD curve, with --reference curves from earlier results files (convergence.py's summary,
whose rows give images seen, converted to generator steps at --batch; or a curves JSON such as this one writes)
as dashed lines.
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import pyplot  # noqa: E402


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


def reference_curves(spec: str, batch: int) -> dict[str, list[tuple[int, float]]]:
    """FD curves from a results file named ``PATH`` or ``PATH:ROW`` (one row): convergence.py's summary (rows
    with "curve" of images seen), a curves JSON (runs with "evals" by step) or one run's curve (top-level "evals")."""
    path, _, only = spec.partition(":")
    data = json.loads(Path(path).read_text())
    if "evals" in data:   # one run's curve ({"run": ..., "evals": [...]}), named by its "run" note
        data = {data.get("run", Path(path).stem): data}
    out = {}
    for name, r in data.items():
        if not isinstance(r, dict) or (only and name != only):
            continue
        if "evals" in r:
            out[name] = [(e["step"], e["fd"]) for e in r["evals"]]
        elif "curve" in r:
            out[r.get("label", name)] = [(round(e["images"] / batch), e["fd"]) for e in r["curve"]]
    return out


def plot(runs: dict, refs: dict, path: Path, title: str) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9, 5))
    for i, (name, r) in enumerate(runs.items()):
        ev = r["evals"]
        ax.plot([e["step"] for e in ev], [e["fd"] for e in ev], color=f"C{i % 10}", marker=".", label=name)
    for j, (name, c) in enumerate(refs.items()):
        ax.plot([s for s, _ in c], [f for _, f in c], color="black" if "DMD2" in name else f"C{(len(runs) + j) % 10}",
                ls="--", alpha=0.6, label=name)
    ax.set(xlabel="generator steps", ylabel="FD (lower is better)", title=title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("roots", nargs="+")
    p.add_argument("--out", required=True)
    p.add_argument("--plot", help="write a figure of every run's FD curve here")
    p.add_argument("--reference", nargs="*", default=[], metavar="PATH[:ROW]",
                   help="earlier curves drawn dashed (convergence summaries or curves JSONs)")
    p.add_argument("--batch", type=int, default=32, help="images per generator step, for convergence summaries")
    p.add_argument("--title", default="FD by generator step")
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
    if a.plot:
        refs = {k: v for spec in a.reference for k, v in reference_curves(spec, a.batch).items()}
        plot(runs, refs, Path(a.plot), a.title)
    return 0


if __name__ == "__main__":
    sys.exit(main())
