"""Real peak memory of ONE Stage-1 Flash-DMD iteration of a full-size architecture on this CPU (issue 15, item 4).

Builds once (reused when present) under --work: a full-size random-weight pipeline folder of SDXL-base-1.0's
architecture (or SD3-medium's, --family sd3) with benchmarks/fullsize.py, SAM ViT-B's image encoder (the Pixel-GAN
backbone) and 8 random 512 px captioned images with a prompts file. Then it writes one YAML config and runs, in a
fresh subprocess, ``flashdmd distill --dry-run`` on it: every role built (teacher, student, fake score, Pixel-GAN
discriminator), one Stage-1 iteration (a generator update and its critic updates) at batch 1, nothing written.
Settings: method flashdmd, LoRA rank 64 on student and fake score, 512 px, gradient checkpointing, pixel
discriminator on SAM ViT-B, no evaluation, no sampling, no RL; --set key=value adds or overrides fields
(written into the same YAML; values parse as YAML, as `flashdmd distill --set` parses them, so a string such as
``no`` must be quoted: --set 'model_mixed_precision="no"').

Measured, from /proc every --interval s (0.2) by this parent process, which imports no torch (the helpers of
benchmarks/data_memory.py, as benchmarks/run_memory.py uses them):

* ``tree_peak_rss_mib``: peak of the RSS summed over the distill process and its descendants. The DataLoader
  workers (2 by default) are forked once the roles exist, and the pages they share with the main process count
  once per process in RSS, so with workers alive this sum overstates the machine's memory;
* ``tree_peak_pss_mib``: the same sum of PSS (smaps_rollup; shared pages divided among the processes that map
  them): the tree's share of physical memory, workers counted once: with ``main_ru_maxrss_mib`` the figure to
  compare with a plan (weight-file pages included as far as the kernel kept them resident);
* ``tree_peak_rss_anon_mib``: the peak of the summed anonymous RSS (heap: copies, activations, optimiser states),
  and ``tree_rss_file_at_rss_peak_mib``: the file-backed part of RSS at the RSS peak. diffusers / transformers
  load safetensors by mmap, so weights loaded and never copied stay pages of the weight files: counted in RSS
  but reclaimable page cache (MemAvailable counts them as available; under pressure the kernel drops them and
  reads them again from disk), while a copy of them (a deepcopy, a dtype cast) is anonymous memory;
* ``main_peak_rss_anon_mib``: the distill process's own peak anonymous RSS (no workers, no weight-file pages):
  the figure that repeats (SD3: 17 107 and 17 043 MiB in two runs), where the RSS / PSS peaks move by GiB with
  how many weight-file pages the kernel happened to keep (SDXL: 23 248 then 18 863 MiB) -- it evicts them under
  pressure and reads them again from disk;
* ``main_ru_maxrss_mib``: the distill process's exact peak RSS (wait4; its largest reaped child's when larger);
* ``wall_seconds``; the machine's lowest MemAvailable during the run; ``weight_files_mib``: the size of each
  part's safetensors files (what the file-backed pages are pages of);
* a baseline: the same figures for a subprocess that only imports torch, diffusers, transformers and flashdmd's
  training modules (the runtime floor).

A run that would take the machine below --min-available-gib (1.5 GiB) of MemAvailable is killed by this script
(SIGKILL to each process of its tree): the figures are then lower bounds, and the JSON says so and how far the run
got (the dry run's own log lines). The kernel's OOM killer is left out of it.

--plan: when ``flashdmd plan`` exists, also runs ``flashdmd plan --config <the same YAML> --json OUT`` (plus
``--device cpu`` when the planner takes --device) and stores its ``peak_bytes_per_device`` beside the measured
peaks with their ratios; otherwise says so and skips.

--code-rev REV runs the flashdmd package of commit REV (``git archive`` into --work, first on PYTHONPATH) instead
of the working tree's: a "before" figure while the working tree changes under other hands.

    .venv/bin/python benchmarks/plan_check.py                          # SDXL -> results/plan_check_sdxl.json
    .venv/bin/python benchmarks/plan_check.py --family sd3
    .venv/bin/python benchmarks/plan_check.py --set model_frozen_dtype=bfloat16 --plan --out /tmp/x.json
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from common import add_threads_arg  # noqa: E402
from data_memory import _kib, _tree  # noqa: E402  (the /proc sampling of the data-stream benchmark)

MIB = 1024
# -P: no working directory (the repository root, where the subprocesses run) in front of PYTHONPATH, so that
# --code-rev's package is the one imported
PY = [sys.executable, "-P"]
BASELINE = ("import torch, diffusers, transformers\n"
            "from diffusers import AutoencoderKL, UNet2DConditionModel, SD3Transformer2DModel\n"
            "from transformers import CLIPTextModel, CLIPTextModelWithProjection, SamVisionModel\n"
            "import flashdmd, flashdmd.cli, flashdmd.training.distill\n"
            "print('flashdmd imported from', flashdmd.__file__, flush=True)\n"
            "import time; time.sleep(2)\n")


def mem_available_kib() -> int:
    return _kib("/proc/meminfo", "MemAvailable:")


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout


def run_watched(cmd: list[str], log_path: Path, env: dict, a: argparse.Namespace, pss: bool = True) -> dict:
    """Run ``cmd`` (stdout+stderr into ``log_path``), sampling its tree every ``a.interval`` s and MemAvailable
    every 50 ms; SIGKILL the tree when MemAvailable falls under ``a.min_available_gib``."""
    floor = int(a.min_available_gib * 1024 * 1024)
    with open(log_path, "w") as log:
        t0 = time.time()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        peak = {"rss": 0, "pss": 0, "main_rss": 0, "anon": 0, "file_at_rss_peak": 0, "main_anon": 0}
        low_avail, next_sample, trace, killed, status, usage = mem_available_kib(), 0.0, [], None, None, None
        last_trace = -1.0
        while status is None:
            now = time.time()
            avail = mem_available_kib()
            low_avail = min(low_avail, avail)
            if now >= next_sample or avail < floor:
                pids = _tree(proc.pid)
                rss = sum(_kib(f"/proc/{p}/status", "VmRSS:") for p in pids)
                anon = sum(_kib(f"/proc/{p}/status", "RssAnon:") for p in pids)
                peak["rss"] = max(peak["rss"], rss)
                peak["anon"] = max(peak["anon"], anon)
                if rss >= peak["rss"]:
                    peak["file_at_rss_peak"] = sum(_kib(f"/proc/{p}/status", "RssFile:") for p in pids)
                peak["main_rss"] = max(peak["main_rss"], _kib(f"/proc/{proc.pid}/status", "VmRSS:"))
                main_anon = _kib(f"/proc/{proc.pid}/status", "RssAnon:")
                peak["main_anon"] = max(peak["main_anon"], main_anon)
                if pss:
                    peak["pss"] = max(peak["pss"], sum(_kib(f"/proc/{p}/smaps_rollup", "Pss:") for p in pids))
                next_sample = now + a.interval
                if now - t0 - last_trace >= 1.0:
                    last_trace = now - t0
                    trace.append([round(now - t0, 1), round(rss / MIB), round(main_anon / MIB), round(avail / MIB),
                                  len(pids)])
                if avail < floor and killed is None:
                    killed = {"at_seconds": round(now - t0, 1), "mem_available_mib": round(avail / MIB),
                              "tree_rss_mib": round(rss / MIB)}
                    print(f"MemAvailable {avail / MIB:.0f} MiB < {a.min_available_gib} GiB: killing the run "
                          f"({len(pids)} processes)", flush=True)
                    for p in reversed(pids):  # children first, then the distill process
                        try:
                            os.kill(p, signal.SIGKILL)
                        except ProcessLookupError:
                            pass
            time.sleep(0.05)
            pid, st, ru = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                status, usage = st, ru
        wall = time.time() - t0
    code = os.waitstatus_to_exitcode(status)
    return {"exit_code": code, "killed_by_watchdog": killed, "wall_seconds": round(wall, 1),
            "tree_peak_rss_mib": round(peak["rss"] / MIB, 1),
            "tree_peak_pss_mib": round(peak["pss"] / MIB, 1) if pss else None,
            "tree_peak_rss_anon_mib": round(peak["anon"] / MIB, 1),
            "tree_rss_file_at_rss_peak_mib": round(peak["file_at_rss_peak"] / MIB, 1),
            "main_peak_rss_sampled_mib": round(peak["main_rss"] / MIB, 1),
            "main_peak_rss_anon_mib": round(peak["main_anon"] / MIB, 1),
            "main_ru_maxrss_mib": round(usage.ru_maxrss / MIB, 1),
            "lowest_mem_available_mib": round(low_avail / MIB), "trace_s_treerss_mainanon_memavail_nprocs": trace}


def weight_files(paths: dict) -> dict:
    """MiB of safetensors files per part of the pipeline folder, and of the SAM folder."""
    sizes = {d.name: sum(f.stat().st_size for f in d.glob("*.safetensors")) for d in sorted(paths["model"].iterdir())
             if d.is_dir()}
    sizes["sam_vision"] = sum(f.stat().st_size for f in paths["sam"].glob("*.safetensors"))
    return {k: round(v / 2**20, 1) for k, v in sizes.items() if v}


def ensure_built(a: argparse.Namespace, env: dict) -> dict:
    """The pipeline, SAM and data folders under --work (built once by benchmarks/fullsize.py subprocesses, each
    watched like the run so a build cannot starve the machine either)."""
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    name = a.family + ("-t5" if a.t5 else "") + ("" if a.weights_dtype == "float32" else f"-{a.weights_dtype}")
    paths = {"model": work / name, "sam": work / "sam-vit-base", "data": work / "data"}
    jobs = [("model", [a.family, str(paths["model"]), "--dtype", a.weights_dtype] + (["--t5"] if a.t5 else []),
             paths["model"] / "model_index.json"),
            ("sam", ["sam", str(paths["sam"])], paths["sam"] / "config.json"),
            ("data", ["data", str(paths["data"])], paths["data"] / "prompts.txt")]
    builds = {}
    for key, args, marker in jobs:
        if marker.exists():
            continue
        cmd = [*PY, str(HERE / "fullsize.py"), *args, "--threads", str(a.build_threads)]
        print("$", " ".join(cmd), flush=True)
        r = run_watched(cmd, work / f"build_{key}.log", env, a, pss=False)
        print((work / f"build_{key}.log").read_text(), end="", flush=True)
        if r["exit_code"] != 0:
            raise SystemExit(f"building {key} failed ({r}); see {work}/build_{key}.log")
        builds[key] = {k: r[k] for k in ("wall_seconds", "main_ru_maxrss_mib", "tree_peak_rss_mib")}
    return {"paths": paths, "builds": builds}


def config(a: argparse.Namespace, paths: dict) -> dict:
    import yaml
    # batch_size 1: what the dry run runs whatever the file says, written so that a plan of this file plans it
    cfg = {"model_teacher": str(paths["model"]), "method": "flashdmd", "run_batch_size": 1,
           "model_lora_rank": a.lora_rank,
           "model_gradient_checkpointing": True, "data_resolution": a.resolution, "disc_kind": "pixel",
           "disc_backbone": "sam", "disc_backbone_path": str(paths["sam"]), "data_real": str(paths["data"] / "images"),
           "data_prompts": str(paths["data"] / "prompts.txt"), "eval_every_steps": 0, "run_sample_every_steps": 0,
           "rl_enabled": False}
    for item in a.set:
        if "=" not in item:
            raise SystemExit(f"--set {item!r}: expected key=value")
        k, v = item.split("=", 1)
        cfg[k.strip()] = yaml.safe_load(v)  # parsed as `flashdmd distill --set` parses it
    return cfg


def code_env(a: argparse.Namespace) -> tuple[dict, dict]:
    """The subprocesses' environment and a description of the flashdmd code they run."""
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    dirty = [line[3:] for line in git("status", "--porcelain", "--", "flashdmd").splitlines() if line.strip()]
    if a.code_rev is None:
        return env, {"code": "working tree", "commit": git("rev-parse", "HEAD").strip(),
                     "uncommitted_flashdmd_files": dirty}
    sha = git("rev-parse", "--verify", "--quiet", a.code_rev + "^{commit}").strip()
    if not sha:
        raise SystemExit(f"--code-rev {a.code_rev}: no such commit")
    target = Path(a.work) / f"code-{sha[:12]}"
    if not (target / "flashdmd" / "__init__.py").exists():
        target.mkdir(parents=True, exist_ok=True)
        arch = subprocess.run(["git", "archive", sha, "flashdmd"], cwd=REPO, capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(target)], input=arch, check=True)
    env["PYTHONPATH"] = str(target) + os.pathsep + env.get("PYTHONPATH", "")
    return env, {"code": f"git archive {a.code_rev} ({sha}) on PYTHONPATH", "commit": sha,
                 "working_tree_commit": git("rev-parse", "HEAD").strip(), "uncommitted_flashdmd_files_not_used": dirty}


def plan(a: argparse.Namespace, cfg_path: Path, env: dict) -> dict:
    cli = [*PY, "-m", "flashdmd.cli"]
    probe = subprocess.run(cli + ["plan", "--help"], capture_output=True, text=True, env=env, cwd=REPO)
    if probe.returncode != 0:
        print("flashdmd plan does not exist yet: --plan skipped", flush=True)
        return {"available": False, "note": "flashdmd plan is not a subcommand of this code; skipped"}
    out = Path(a.work) / f"plan_{a.family}.json"
    # the measurement is a CPU run: plan for the CPU where the planner takes a device
    cmd = cli + ["plan", "--config", str(cfg_path), "--json", str(out)] + (
        ["--device", "cpu"] if "--device" in probe.stdout else [])
    print("$", " ".join(cmd), flush=True)
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    if r.returncode != 0:
        return {"available": True, "command": " ".join(cmd), "exit_code": r.returncode,
                "stderr_tail": r.stderr[-2000:]}
    planned = json.loads(out.read_text())
    peak = planned.get("peak_bytes_per_device")
    return {"available": True, "command": " ".join(cmd), "peak_bytes_per_device": peak,
            "peak_mib_per_device": None if peak is None else round(peak / 2**20, 1), "plan": planned}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", choices=["sdxl", "sd3"], default="sdxl")
    p.add_argument("--work", default="/tmp/flashdmd-fullsize", help="built folders, config, logs (not in git)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra config field (repeatable)")
    p.add_argument("--plan", action="store_true", help="also run `flashdmd plan` when it exists")
    p.add_argument("--lora-rank", type=int, default=64)
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--weights-dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="dtype of the saved random weights (the run loads them in model_dtype)")
    p.add_argument("--t5", action="store_true", help="sd3: include T5-v1.1-XXL in the pipeline")
    p.add_argument("--code-rev", default=None, help="run this commit's flashdmd package (default: working tree)")
    add_threads_arg(p)
    p.add_argument("--build-threads", type=int, default=2, help="torch threads while initialising the weights")
    p.add_argument("--interval", type=float, default=0.2, help="seconds between /proc samples of the tree")
    p.add_argument("--min-available-gib", type=float, default=1.5,
                   help="kill the run when the machine's MemAvailable falls below this")
    p.add_argument("--build-only", action="store_true")
    p.add_argument("--out", default=None, help="default benchmarks/results/plan_check_<family>.json")
    a = p.parse_args()
    import yaml

    env, code = code_env(a)
    built = ensure_built(a, env)
    if a.build_only:
        return
    paths = built["paths"]
    counts = json.loads((paths["model"] / "parameter_counts.json").read_text())
    counts |= json.loads((paths["sam"] / "parameter_counts.json").read_text())
    cfg = config(a, paths)
    work = Path(a.work)
    cfg_path = work / f"config_{a.family}.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))

    print("baseline: a process importing torch, diffusers, transformers and flashdmd", flush=True)
    base = run_watched([*PY, "-c", BASELINE], work / "baseline.log", env, a)
    imported_from = next((line.split(" from ", 1)[1] for line in (work / "baseline.log").read_text().splitlines()
                          if line.startswith("flashdmd imported from")), None)
    print("flashdmd imported from", imported_from, flush=True)

    cmd = [*PY, "-m", "flashdmd.cli", "--threads", str(a.threads), "distill", "--dry-run",
           "--config", str(cfg_path), "--out", str(work / "dry_run_out"), "--no-progress"]
    print("$", " ".join(cmd), flush=True)
    log_path = work / f"dry_run_{a.family}.log"
    load_before = round(os.getloadavg()[0], 2)  # other jobs on the machine stretch the wall time, not the memory
    run = run_watched(cmd, log_path, env, a)
    lines = log_path.read_text(errors="replace").splitlines()
    marks = {"teacher loaded": "teacher: ", "roles built": "roles: ", "stage 1 iteration done": "stage 1: ",
             "dry run passed": "dry run passed"}
    reached = [k for k, m in marks.items() if any(line.startswith(m) for line in lines)]
    completed = run["exit_code"] == 0 and "dry run passed" in reached
    if completed:
        outcome = "completed"
    elif run["killed_by_watchdog"]:
        outcome = (f"killed by this script: MemAvailable fell under {a.min_available_gib} GiB "
                   f"(would not fit in this machine's memory); peaks are lower bounds")
    elif run["exit_code"] == -signal.SIGKILL:
        outcome = "SIGKILL from outside this script (the kernel's OOM killer?); peaks are lower bounds"
    else:
        outcome = f"failed with exit code {run['exit_code']}"
    print(f"{outcome}: tree RSS {run['tree_peak_rss_mib']:.0f} MiB, tree PSS {run['tree_peak_pss_mib']:.0f} MiB, "
          f"main ru_maxrss {run['main_ru_maxrss_mib']:.0f} MiB, {run['wall_seconds']:.0f} s; reached: {reached}",
          flush=True)

    result = {
        "what": "peak memory of one Stage-1 Flash-DMD iteration (flashdmd distill --dry-run, batch 1) of a "
                f"full-size random-weight {a.family} pipeline on CPU",
        "family": a.family, "completed": completed, "outcome": outcome, "stages_reached": reached,
        "measured": {k: v for k, v in run.items() if k != "trace_s_treerss_mainanon_memavail_nprocs"},
        "baseline_imports_only": {k: base[k] for k in ("tree_peak_rss_mib", "tree_peak_pss_mib",
                                                        "tree_peak_rss_anon_mib", "main_ru_maxrss_mib",
                                                        "wall_seconds", "exit_code")},
        "flashdmd_imported_from": imported_from,
        "parameters": counts, "weight_files_mib": weight_files(paths), "config": cfg, "command": " ".join(cmd),
        "settings": {"lora_rank": a.lora_rank, "resolution": a.resolution, "weights_dtype": a.weights_dtype,
                     "t5": a.t5, "threads": a.threads, "interval_s": a.interval,
                     "min_available_gib": a.min_available_gib, "set": a.set},
        "machine": {"cpu_model": cpu_model(), "cpus": os.cpu_count(),
                    "mem_total_mib": round(_kib("/proc/meminfo", "MemTotal:") / MIB),
                    "swap_total_mib": round(_kib("/proc/meminfo", "SwapTotal:") / MIB),
                    "load_average_1min_before_after_run": [load_before, round(os.getloadavg()[0], 2)]},
        **code, "builds_this_time": built["builds"],
        "dry_run_log_tail": [line for line in lines if line.strip() and "it/s]" not in line
                             and "s/it]" not in line][-15:],
        "trace_s_treerss_mainanon_memavail_nprocs": run["trace_s_treerss_mainanon_memavail_nprocs"]}
    if a.plan:
        result["plan"] = pl = plan(a, cfg_path, env)
        if pl.get("peak_bytes_per_device"):
            peak = pl["peak_bytes_per_device"]
            figures = {k: run[k] for k in ("tree_peak_pss_mib", "main_ru_maxrss_mib", "main_peak_rss_anon_mib",
                                           "tree_peak_rss_mib")}
            # every weight file resident beside the peak heap: what the run holds if the kernel evicts nothing
            figures["main_peak_rss_anon_plus_weight_files_mib"] = run["main_peak_rss_anon_mib"] + sum(
                result["weight_files_mib"].values())
            result["plan"]["ratio_measured_over_planned"] = {k: round(v * 2**20 / peak, 3)
                                                             for k, v in figures.items()}
            print("planned", pl["peak_mib_per_device"], "MiB; measured / planned:",
                  result["plan"]["ratio_measured_over_planned"], flush=True)
    out = Path(a.out or HERE / "results" / f"plan_check_{a.family}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print("->", out, flush=True)


if __name__ == "__main__":
    main()
