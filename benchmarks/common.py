"""Command-line options shared by the benchmark scripts that run `flashdmd distill` rows."""
import argparse


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


def parse(p: argparse.ArgumentParser) -> argparse.Namespace:
    """Parse, register the embedded world (benchmarks are a face, like the CLI), then pin torch to --threads
    (on a shared 2-core machine 1 thread per job is fastest)."""
    a = p.parse_args()
    from flashdmd.world import plugin
    plugin.register()
    import torch
    torch.set_num_threads(a.threads)
    return a
