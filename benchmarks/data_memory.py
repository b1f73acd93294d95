"""Peak memory of streaming real images does not grow with the dataset (issue 14, item 2).

Writes N synthetic JPEGs (smooth noise, 512-768 px on each side, so every image is resized and cropped) with a
metadata.jsonl of captions into a folder per N (hard links into one shared pool, generated once and reused),
then, in a fresh subprocess per N, streams the same number of batches through
``flashdmd.data.RealImageStream`` with DataLoader workers and records the peak memory of that subprocess and its
workers, sampled from /proc every 50 ms by this (parent) process and summed over the process tree: RSS (what the
issue asks about; pages shared between the forked workers count once per process), anonymous PSS (the tree's own
heap, each shared page counted once: the exact figure) and total PSS (adds library pages, divided among every
process on the machine that maps them, so it moves with unrelated jobs), plus the child's own ``ru_maxrss``.
The issue asks the peaks of N = 1 000 and N = 20 000 to lie within 10 %.

    python benchmarks/data_memory.py                      # generate (once) + measure, writes results/data_memory.json
    python benchmarks/data_memory.py --generate-only      # just the images
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def _synthetic_jpeg(i: int, path: Path) -> None:
    """Image i: a smooth random field (8x8 control grid, bicubic) plus fine grain, 512-768 px per side."""
    from PIL import Image
    rng = np.random.default_rng(i)
    w, h = (int(v) for v in rng.integers(512, 769, 2))
    coarse = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
    grain = rng.integers(-12, 13, (h, w, 3), dtype=np.int16)
    arr = np.clip(np.asarray(coarse, dtype=np.int16) + grain, 0, 255).astype(np.uint8)
    Image.fromarray(arr).save(path, quality=90)


def generate(root: Path, sizes: list[int]) -> None:
    """root/pool/NNNNNN.jpg for the largest N (reused when present), then root/nN/ of hard links + metadata.jsonl."""
    pool = root / "pool"
    pool.mkdir(parents=True, exist_ok=True)
    t0, made = time.time(), 0
    for i in range(max(sizes)):
        f = pool / f"{i:06d}.jpg"
        if not f.exists():
            _synthetic_jpeg(i, f.with_suffix(".tmp.jpg"))
            os.replace(f.with_suffix(".tmp.jpg"), f)
            made += 1
            if made % 1000 == 0:
                print(f"generated {made} images ({i + 1}/{max(sizes)}, {time.time() - t0:.0f} s)", flush=True)
    for n in sizes:
        folder = root / f"n{n}"
        folder.mkdir(exist_ok=True)
        for i in range(n):
            link = folder / f"{i:06d}.jpg"
            if not link.exists():
                os.link(pool / link.name, link)
        with open(folder / "metadata.jsonl", "w") as fh:
            fh.writelines(json.dumps({"file_name": f"{i:06d}.jpg", "text": f"synthetic image {i}"}) + "\n"
                          for i in range(n))
    print(f"images ready under {root} ({made} new, {time.time() - t0:.0f} s)", flush=True)


def child(folder: str, batches: int, batch: int, resolution: int, workers: int, untrimmed: bool) -> None:
    """Stream ``batches`` batches; print one JSON line (own ru_maxrss and the workers' largest, in MiB)."""
    import torch
    torch.set_num_threads(1)
    from flashdmd.data import RealImageStream, open_image_source
    if untrimmed:  # workers that keep freed memory in their heap: shows what trim_heap prevents
        import flashdmd.data.stream as stream_module
        stream_module.trim_heap = lambda: None
    t0 = time.time()
    with RealImageStream(open_image_source(folder), resolution, batch, crop="random",
                         num_workers=workers) as stream:
        for _ in range(batches):
            x, _captions = stream.next_batch()
            assert x.shape == (batch, 3, resolution, resolution)
        stats = stream.stats()
    print(json.dumps({"seconds": time.time() - t0, "images_per_s": batches * batch / (time.time() - t0),
                      "self_maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "workers_maxrss_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
                      **stats}), flush=True)


def _tree(pid: int) -> list[int]:
    """pid and all its descendants (from the ppid field of /proc/*/stat)."""
    parent = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = Path(f"/proc/{d}/stat").read_text()
            except OSError:
                continue
            parent[int(d)] = int(stat.rsplit(")", 1)[1].split()[1])
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += [c for c, pp in parent.items() if pp == p]
    return out


def _kib(path: str, field: str) -> int:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(field):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def measure(folder: Path, a: argparse.Namespace) -> dict:
    """Run the child on ``folder`` and sample its process tree's RSS / PSS until it exits."""
    cmd = [sys.executable, __file__, "--child", str(folder), "--batches", str(a.batches), "--batch", str(a.batch),
           "--resolution", str(a.resolution), "--workers", str(a.workers)] + ["--untrimmed"] * a.untrimmed
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
    peak = {"rss": 0, "anon_pss": 0, "pss": 0}
    while proc.poll() is None:
        pids = _tree(proc.pid)
        now = {"rss": sum(_kib(f"/proc/{p}/status", "VmRSS:") for p in pids),
               "anon_pss": sum(_kib(f"/proc/{p}/smaps_rollup", "Pss_Anon:") for p in pids),
               "pss": sum(_kib(f"/proc/{p}/smaps_rollup", "Pss:") for p in pids)}
        peak = {k: max(v, now[k]) for k, v in peak.items()}
        time.sleep(0.05)
    out = proc.stdout.read()
    if proc.returncode:
        raise SystemExit(f"child failed on {folder} (exit {proc.returncode})")
    return {f"tree_peak_{k}_mib": v / 1024 for k, v in peak.items()} | {
            **json.loads(out.strip().splitlines()[-1])}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", default="/tmp/flashdmd-data-bench", help="image pool (not in git)")
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 20000])
    p.add_argument("--batches", type=int, default=200)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", default=str(HERE / "results" / "data_memory.json"))
    p.add_argument("--generate-only", action="store_true")
    p.add_argument("--untrimmed", action="store_true", help="workers skip malloc_trim after each batch")
    p.add_argument("--child", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        return child(a.child, a.batches, a.batch, a.resolution, a.workers, a.untrimmed)
    generate(Path(a.dir), a.sizes)
    if a.generate_only:
        return
    rows = {}
    for n in a.sizes:
        rows[str(n)] = measure(Path(a.dir) / f"n{n}", a)
        print(f"N={n}: {json.dumps(rows[str(n)])}", flush=True)
    lo, hi = str(min(a.sizes)), str(max(a.sizes))
    keys = ("tree_peak_rss_mib", "tree_peak_anon_pss_mib", "self_maxrss_mib", "workers_maxrss_mib",
            "tree_peak_pss_mib")
    ratio = {k: rows[hi][k] / rows[lo][k] for k in keys}
    settings = ("sizes", "batches", "batch", "resolution", "workers", "untrimmed")
    result = {"settings": {k: getattr(a, k) for k in settings},
              "rows": rows, f"ratio_{hi}_over_{lo}": ratio,
              # total PSS is left out of the verdict: its library share depends on other jobs on the machine
              "within_10_percent": all(abs(ratio[k] - 1) <= 0.10 for k in keys[:4])}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["ratio_" + hi + "_over_" + lo]), "within 10 %:", result["within_10_percent"])


if __name__ == "__main__":
    main()
