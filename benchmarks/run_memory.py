"""Peak memory of a whole `flashdmd distill` run does not grow with the dataset (issue 14, item 2).

benchmarks/data_memory.py measures the real-image stream alone; this one measures a real training run at 512 px.
The tiny test teachers (tests/tiny_models.py) have a VAE of factor 2, so 512 px would mean 256x256 latents;
this script builds (once, reused when present) a tiny random SDXL-architecture pipeline whose VAE has factor 8
(four levels of 8/16/16/16 channels) and whose UNet has sample_size 64, so that the teacher's own resolution is
64 x 8 = 512 px (`flashdmd info` prints it), with the two tiny CLIP text encoders of tests/tiny_models.py.

Then, for each N (default 1 000 and 20 000, the folders of benchmarks/data_memory.py: synthetic 512-768 px JPEGs
with metadata.jsonl captions), it runs `flashdmd --threads 1 distill` in a fresh subprocess on those images
(captions as training prompts, 2 DataLoader workers, random crops, one checkpoint) and samples the RSS of the
whole process tree (the distill process and its DataLoader workers) from /proc every 50 ms with the helpers of
benchmarks/data_memory.py (RSS counts the pages the forked workers share with the main process once per process);
the child's ru_maxrss comes from wait4 (Linux: the larger of its own peak and its reaped workers'; the main process
is the larger here), beside the main process's sampled peak. The images read come from the run's
metrics.json (data/images_read of the last logged step). The issue asks the peaks of N = 1 000 and N = 20 000 to
lie within 10 %.

    python benchmarks/run_memory.py                   # build the teacher (once) + both runs -> results/run_memory.json
    python benchmarks/run_memory.py --build-only      # just the teacher
    python benchmarks/run_memory.py --sizes 1000 --max-steps 5 --out /tmp/probe.json   # a quick probe
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO / "tests"))

from data_memory import _kib, _tree  # noqa: E402  (the /proc sampling of the data-stream benchmark)

FLASHDMD = str(Path(sys.executable).with_name("flashdmd"))


def build_teacher(folder: Path, seed: int = 0) -> Path:
    """A tiny random StableDiffusionXLPipeline whose default resolution is 512 px, saved into ``folder``
    (skipped when ``folder/model_index.json`` exists)."""
    if (folder / "model_index.json").exists():
        return folder
    import torch
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel

    import tiny_models as tm

    torch.manual_seed(seed)
    vae = AutoencoderKL(block_out_channels=[8, 16, 16, 16], in_channels=3, out_channels=3, norm_num_groups=4,
                        down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                        latent_channels=4, sample_size=512, scaling_factor=0.13025)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(16, 32), layers_per_block=1, sample_size=64, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 2), use_linear_projection=True, norm_num_groups=8,
        addition_embed_type="text_time", addition_time_embed_dim=8, transformer_layers_per_block=(1, 1),
        projection_class_embeddings_input_dim=6 * 8 + tm.TEXT_PROJ, cross_attention_dim=2 * tm.TEXT_HIDDEN)
    tmp = folder.parent / (folder.name + ".vocab")
    tok = tm.clip_tokenizer(tmp)
    te1, te2 = tm.clip_encoders(len(tok), tok.bos_token_id, tok.eos_token_id, seed=seed + 10)
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tok, tokenizer_2=tok,
                                     unet=unet, scheduler=tm.sdxl_scheduler())
    part = folder.parent / (folder.name + ".partial")
    tm.save_pipeline(pipe, part)
    os.replace(part, folder)
    print(f"teacher saved to {folder} (UNet {sum(p.numel() for p in unet.parameters()) / 1e6:.2f} M, "
          f"VAE {sum(p.numel() for p in vae.parameters()) / 1e6:.2f} M parameters)", flush=True)
    return folder


def config(a: argparse.Namespace, teacher: Path, data: Path) -> dict:
    return {"method": a.method, "model_teacher": str(teacher), "disc_kind": "latent",
            "data_real": str(data), "data_prompts": "captions", "data_crop": "random", "data_workers": a.workers,
            "student_timesteps": [999, 499], "run_batch_size": a.batch, "fake_score_ttur": a.ttur,
            "run_max_steps": a.max_steps, "run_log_every_steps": a.log_every, "eval_every_steps": 0,
            "run_sample_every_steps": 0, "run_checkpoint_every_steps": a.checkpoint_every or a.max_steps,
            "run_checkpoint_keep_last": 1}


def measure(n: int, a: argparse.Namespace, teacher: Path) -> dict:
    """Run `flashdmd distill` on the N-image folder; sample its process tree's RSS until it exits."""
    import yaml
    run = Path(a.runs) / f"run_{n}"
    cfg_path = Path(a.runs) / f"config_{n}.yaml"
    cfg_path.parent.mkdir(parents=True, exist_ok=True)
    cfg_path.write_text(yaml.safe_dump(config(a, teacher, Path(a.data) / f"n{n}"), sort_keys=False))
    cmd = [FLASHDMD, "--threads", str(a.threads), "distill", "--config", str(cfg_path), "--out", str(run),
           "--overwrite", "--no-progress"]
    print("$", " ".join(cmd), flush=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads))
    log = open(Path(a.runs) / f"log_{n}.txt", "w")
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    peak, per_pid, samples, trace = 0, {}, 0, []
    status, usage = None, None
    while status is None:
        pids = _tree(proc.pid)
        rss = {p: _kib(f"/proc/{p}/status", "VmRSS:") for p in pids}
        peak = max(peak, sum(rss.values()))
        for p, v in rss.items():
            per_pid[p] = max(per_pid.get(p, 0), v)
        samples += 1
        if samples % 20 == 0:  # one point a second or so: how the tree's RSS moves through the run
            trace.append([round(time.time() - t0, 1), round(sum(rss.values()) / 1024, 1),
                          round(rss.get(proc.pid, 0) / 1024, 1)])
        time.sleep(a.interval)
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        status = status if pid else None
    wall = time.time() - t0
    log.close()
    code = proc.returncode = os.waitstatus_to_exitcode(status)
    if code:
        raise SystemExit(f"distill failed on N={n} (exit {code}); see {log.name}")
    history = json.loads((run / "metrics.json").read_text())["history"]
    reads = [h["data/images_read"] for h in history if "data/images_read" in h]
    workers = {p: v for p, v in per_pid.items() if p != proc.pid}
    return {"tree_peak_rss_mib": peak / 1024, "main_ru_maxrss_mib": usage.ru_maxrss / 1024,
            "main_peak_rss_sampled_mib": per_pid.get(proc.pid, 0) / 1024,
            "largest_worker_peak_rss_mib": max(workers.values(), default=0) / 1024, "worker_processes": len(workers),
            "images_read": reads[-1] if reads else None, "images_read_history": reads,
            "wall_seconds": wall, "samples": samples, "trace_s_tree_main_mib": trace, "command": " ".join(cmd)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", default="/tmp/flashdmd-run-bench", help="teacher, configs and run folders (not in git)")
    p.add_argument("--data", default="/tmp/flashdmd-data-bench", help="nN image folders of benchmarks/data_memory.py")
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 20000])
    p.add_argument("--method", default="flashdmd", choices=["flashdmd", "dmd2"])
    p.add_argument("--max-steps", type=int, default=120)
    p.add_argument("--ttur", type=int, default=2, help="2 critic iterations (each reading a batch) per "
                   "generator step: twice the images per second of TTUR 1 on CPU")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--checkpoint-every", type=int, default=100, help="one checkpoint (with the data position) mid-run")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--interval", type=float, default=0.05, help="seconds between /proc samples")
    p.add_argument("--out", default=str(HERE / "results" / "run_memory.json"))
    p.add_argument("--build-only", action="store_true")
    a = p.parse_args()
    a.runs = a.dir
    teacher = build_teacher(Path(a.dir) / "teacher")
    if a.build_only:
        return
    for n in a.sizes:
        if not (Path(a.data) / f"n{n}" / "metadata.jsonl").exists():
            raise SystemExit(f"{a.data}/n{n} is missing: python benchmarks/data_memory.py --generate-only")
    rows = {}
    for n in a.sizes:
        rows[str(n)] = measure(n, a, teacher)
        r = rows[str(n)]
        print(f"N={n}: tree {r['tree_peak_rss_mib']:.0f} MiB, main ru_maxrss {r['main_ru_maxrss_mib']:.0f} MiB, "
              f"largest worker {r['largest_worker_peak_rss_mib']:.0f} MiB, {r['images_read']} images read, "
              f"{r['wall_seconds']:.0f} s", flush=True)
    result = {"settings": {k: getattr(a, k) for k in ("sizes", "method", "max_steps", "ttur", "batch", "workers",
                                                       "threads", "interval")},
              "config": config(a, teacher, Path(a.data) / "nN"), "rows": rows}
    if len(a.sizes) > 1:
        lo, hi = str(min(a.sizes)), str(max(a.sizes))
        keys = ("tree_peak_rss_mib", "main_ru_maxrss_mib", "largest_worker_peak_rss_mib")
        ratio = {k: rows[hi][k] / rows[lo][k] for k in keys}
        result[f"ratio_{hi}_over_{lo}"] = ratio
        result["within_10_percent"] = all(abs(v - 1) <= 0.10 for v in ratio.values())
        print(json.dumps(ratio), "within 10 %:", result["within_10_percent"])
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
