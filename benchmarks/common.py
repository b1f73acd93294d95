"""Command-line options shared by the benchmark scripts that run `flashdmd distill` rows.

Importing it puts this checkout first on sys.path, so a benchmark run from a clone at a fixed commit imports that
clone's flashdmd even when its environment holds an editable install of another checkout (a shared .venv): the
commit a result file names is then the code that ran (:func:`check_own_flashdmd` says so before a run starts)."""
import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def check_own_flashdmd() -> None:
    """Exit before any work when the flashdmd this process imports is not this checkout's (imported before this
    module put the checkout first): a result stamped with this checkout's commit would not name the code that ran."""
    import flashdmd
    where = Path(flashdmd.__file__).resolve().parent
    if where != ROOT / "flashdmd":
        raise SystemExit(f"flashdmd comes from {where}, not from {ROOT / 'flashdmd'}: results would name the wrong "
                         f"commit; run with PYTHONPATH={ROOT}")


def add_threads_arg(p: argparse.ArgumentParser) -> None:
    """--threads (default 1), applied by :func:`parse`."""
    p.add_argument("--threads", type=int, default=1)


def add_run_args(p: argparse.ArgumentParser) -> None:
    """--num-images, --threads, --set, --no-progress and --out, the same for every row-running benchmark."""
    p.add_argument("--num-images", type=int, default=300)
    add_threads_arg(p)
    p.add_argument("--set", action="append", default=[], help="extra key=value for every row")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--out", required=True)


def git_commit(root, short: bool = True) -> str:
    """The commit of the checkout at ``root`` (short, or the full hash) for a result file; "unknown" outside a git
    checkout."""
    import subprocess
    try:
        return subprocess.check_output(["git", "-C", str(root), "rev-parse", *(["--short"] if short else []), "HEAD"],
                                       text=True, stderr=subprocess.DEVNULL).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def pyplot():
    """matplotlib.pyplot on the Agg backend (files only, no display), for the scripts that draw figures."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def parse(p: argparse.ArgumentParser) -> argparse.Namespace:
    """Parse, register the embedded world (benchmarks are a face, like the CLI), then pin torch to --threads
    (on a shared 2-core machine 1 thread per job is fastest)."""
    a = p.parse_args()
    from flashdmd.world import plugin
    plugin.register()
    import torch
    torch.set_num_threads(a.threads)
    return a


def run_distill_row(label: str, preset, overrides: dict, folder, a, steps: int, seed: int) -> dict:
    """One convergence-style `flashdmd distill` run: the preset plus ``overrides``, ``steps`` generator updates
    evaluated every a.eval_every (N = a.num_images), no samples, Stage 1 only, a checkpoint at the end, then
    a.set; a folder that already holds metrics.json is read instead (benchmarks resume row by row), and one that
    holds checkpoints but no metrics.json (an interrupted row: pass --set run_checkpoint_every_steps=K to leave some)
    continues from its newest intact checkpoint, its curve so far kept."""
    import json
    import time
    from pathlib import Path

    from flashdmd.training.config import DistillConfig
    from flashdmd.training.distill import train
    folder = Path(folder)
    if (folder / "metrics.json").is_file():
        print(f"{label}: already done, reading {folder / 'metrics.json'}", flush=True)
        return json.loads((folder / "metrics.json").read_text())
    sets = [f"{k}={v}" for k, v in overrides.items()] + [
        f"run_max_steps={steps}", f"eval_every_steps={a.eval_every}", f"eval_num_images={a.num_images}",
        f"run_batch_size={a.batch}", f"run_seed={seed}", "run_sample_every_steps=0",
        f"run_checkpoint_every_steps={steps}",
        "rl_enabled=false"] + list(a.set)
    cfg = DistillConfig.from_sources(str(preset), sets)
    print(f"{label}: {Path(preset).name} {' '.join(sets)}", flush=True)
    ckpts = folder / "checkpoints"
    resume = "latest" if ckpts.is_dir() and any(p.name.startswith("step_") for p in ckpts.iterdir()) else None
    t0 = time.time()
    result = train(cfg, folder, progress=not a.no_progress, overwrite=resume is None, resume=resume)
    print(f"{label}: done in {time.time() - t0:.0f} s", flush=True)
    return result
