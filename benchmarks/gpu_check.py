"""The first-GPU check (issue 28, item 2; the offload / quantisation rows: issue 31): one command, about 8 minutes
on one 80 GB GPU, nothing downloaded.

    python benchmarks/gpu_check.py --json gpu_check.json                    # on the GPU machine
    python benchmarks/gpu_check.py --json gpu_check.json --parts peak_sdxl,fsdp2_resume
    python benchmarks/gpu_check.py --smoke --json /tmp/smoke.json           # the same code on CPU, tiny models

What it measures (each part in its own try/except; the JSON is rewritten after every part, so a run stopped by a
time limit still leaves the finished parts; one summary line per part at the end):

``build``
    Full-size random-weight folders from published configs (benchmarks/fullsize.py): SDXL-base-1.0 (UNet 2.57 B,
    CLIP-L, OpenCLIP-bigG, VAE), SD3-medium with T5-v1.1-XXL (MMDiT 2.03 B + 4.76 B T5: the text cache is there
    to drop it), SAM ViT-B (the Pixel-GAN backbone) and 8 random 512 px captioned images -- built ON THE GPU
    (``fullsize --device cuda``: every default initialisation runs there) and saved in bfloat16: 22.5 GB instead
    of fullsize's CPU float32 default (45 GB, many minutes). Plus the tiny SDXL / SAM folders of
    tests/tiny_models.py for ``fsdp2_resume``. Folders already in ``--work`` are reused.
``peak_sdxl``, ``peak_sd3``
    CUDA peak (torch.cuda.max_memory_allocated and max_memory_reserved, reset before; plus the device memory
    outside torch's pool from cudaMemGetInfo) of the first and second Stage-1 cycle (one generator iteration and
    its TTUR critic iterations) of a Flash-DMD LoRA run at 1024 px, batch 1: configs/sdxl_flashdmd.yaml and
    configs/sd3_flashdmd.yaml (the latter with ``model_text_cache: true``) with ``model_lora_rank 64,
    batch_size 1, model_frozen_dtype bfloat16`` (what ``auto`` picks on CUDA; set explicitly so that the CPU
    smoke takes the same bf16 path), ``model_mixed_precision bf16`` (the presets'), SAM ViT-B, the random
    images as data_real and their captions as data_prompts. Beside each: ``flashdmd plan``'s figure for the same
    config (``plan.plan(cfg, Settings(device="cuda"))``, computed in a background CPU process while the GPU
    works) and two ratios: plan tensors (peak minus its assumed 1 GiB runtime) / max_memory_allocated, and
    plan peak / (max_memory_reserved + memory outside torch's pool). Either off by more than 15 % is flagged.
``offload_sd3``, ``quant_sd3``
    What offloading and quantising the frozen base cost a Stage-1 iteration, one field changed at a time in one
    process: rows ``model_offload`` none / frozen / base (``offload_sd3``) and ``model_frozen_quant`` int8 / fp8
    (``quant_sd3``; fp8 only on a GPU of compute capability 8.9+, else the row says "not run" and why), each a
    fresh set-up of peak_sd3's config (``--set model_offload=... --set model_frozen_quant=...``, gradient
    checkpointing on in every row, as base needs) on the same SD3-medium weights without T5 (a folder of links
    to the built one: the text cache encodes every prompt at set-up and frees the encoders, so an iteration
    computes the same with T5's zeros in its place, and a set-up reads 6 GB instead of 15). Per row: one warm-up
    cycle, then seconds per iteration = the median of 3 timed cycles / TTUR; the CUDA peaks over those cycles
    (set-up apart) beside the plan of the row's config (as the peaks above, 15 % flag), the bytes of the
    teacher / VAE / discriminator on each device after set-up (where offloading left them), and every row's
    ratios to the none/none row (offload_sd3's first): seconds per iteration, peak allocated / reserved, the
    plan's peak. What the plan says of offloading (any entry of its result on offload / transfer / bandwidth)
    is kept beside it, with the measured ``extra_seconds_per_iteration`` against none/none. offload_sd3's last row,
    ``zero_t5_counted``, is none/none with ``model_zero_t5 counted``: the 256 zero T5 tokens as one token with a
    logit bias (an attention mask, so no flash kernel) against none/none's padded tokens (``auto`` pads on a GPU) --
    what decides ``auto``'s choice on a GPU (BENCHMARKS.md section 6).
``step_flashdmd``, ``step_dmd2``
    Seconds per generator update at full size in bf16 (SDXL, the two presets with the same LoRA-64 / batch-1 /
    1024 px overrides; a TTUR-n update includes its n - 1 critic-only iterations, as benchmarks/step_cost.py
    counts): one warm-up cycle excluded, torch.cuda.synchronize around each timed update, median of several.
    LoRA, not the presets' full fine-tune: a full SDXL fine-tune (two fp32 UNets + AdamW) does not fit one 80 GB
    card (BENCHMARKS.md, the VRAM table); the compute is the same network passes, less the base weights'
    gradients.
``step_heads``
    The same timing for the world presets' text-conditioned pooled Pixel-GAN head (BENCHMARKS.md section 3a) at
    full size on SAM ViT-B: the SDXL Flash-DMD preset with it (``flashdmd_text_head``) and DMD2 with it instead of
    its latent GAN (``dmd2_text_head``, the attribution's ``dmd2_head``), each alone on the card, with its ratio to
    ``step_dmd2``'s seconds.
``images_per_second``
    The 4-step student (the LoRA student of ``step_flashdmd``'s run) and the 50-step CFG teacher (w = 5, the
    SDXL pipeline's default) through flashdmd.inference.sample_images at 1024 px, batch 2, text encoding and VAE
    decoding included, after a warm-up; networks in their weights' dtype (bf16 base, fp32 adapters), as the
    run's sample grids and `flashdmd eval` sample.
``fsdp2_resume``
    ``accelerate launch --config_file configs/accelerate/fsdp2_8gpu.yaml --num_processes 1 -m flashdmd.cli
    distill ...``: two generator updates and a checkpoint, then ``--resume latest`` to a third; pass = both exit
    0, the second says it resumed at step 2 and its run.json counts 3 updates. What accelerate made of the launch
    (distributed type, FSDP version, processes) comes from a probe launched the same way that builds the
    Accelerator as distill's setup does. The model is the tiny SDXL of tests/tiny_models.py as a full fine-tune
    (the case FSDP2 exists for) with the tiny SAM Pixel-GAN: this part checks the accelerate FSDP2 path --
    wrapping, sharded optimiser states, gathered checkpoints, resume -- not scale (the peaks above do that), and a
    full-size run would spend about 2 minutes of the budget loading weights twice.
``compile``
    torch.compile (``model_compile``): ``step_flashdmd``'s run with ``--set model_compile=student`` -- the student's
    and the fake score's UNet blocks compiled by inductor -- timed as ``step_flashdmd`` is (the first cycle, which
    compiles, reported apart as ``warmup_cycle_seconds``), in a process of its own on the same card; beside it the
    speed-up over ``step_flashdmd`` (eager seconds per generator update / compiled), the compilation's cost (the
    first cycle less an eager update), dynamo's compiled frames, graphs and graph breaks. ``--smoke`` runs it with the
    aot_eager backend (graph capture and AOT autograd without inductor's C++ compilation, minutes on a small CPU).

Time budget on one H100 80 GB (16 cores): estimates, not measurements -- this has not run on a GPU yet. Each
part's budget is a hard limit (its process is killed and the part recorded as a timeout); the whole run stops
starting parts after ``--budget-s`` (450 s: one call of the device tool with its machine's start stays under
10 of a session's 15 minutes). At the estimates the last parts (quant_sd3, fsdp2_resume, compile) then do not
start: they are recorded as not started, and a second, short call runs them alone (``--parts
quant_sd3,fsdp2_resume,compile``).

    part               estimate  budget  reasoning
    build                 45 s    150 s  3.5 B (SDXL) + 7.7 B (SD3 + T5) + 0.09 B (SAM) parameters initialised on
                                         the GPU in well under a second each; the time is writing 22.5 GB of bf16
                                         safetensors (a device-to-host copy per tensor, then the page cache:
                                         ~1 GB/s assumed) and ~10 s of imports / CUDA start; the limit allows a
                                         disk 3x slower (SDXL is written before SD3, so its parts survive a
                                         build that times out during SD3)
    peak_sdxl             45 s     90 s  ~10 s imports, ~20 s setup (6.9 GB read from the page cache into the GPU,
                                         LoRA on student and fake score, SAM), 2 cycles of ~3 s plus first-call
                                         kernel selection
    step_flashdmd         20 s     45 s  8 updates of ~2 s: ~12 UNet passes at 1024 px (backward simulation,
                                         student, teacher CFG, fake score, finishing, low-noise student, their
                                         backward with recomputation) + VAE decode and SAM at 1024 px with grad
    images_per_second     25 s     60 s  student: 8 images x 4 steps (~0.1 s per UNet pass at batch 2) + VAE
                                         decodes; teacher: 2 images x 50 steps x 2 (CFG) passes, ~8 s
    step_dmd2             55 s    100 s  ~15 s setup, warm-up cycle of 5 iterations, 4 updates of 5 iterations
                                         (TTUR 5: each a student pass, a fake-score update, a VAE encode of a
                                         real image; the generator's with teacher and fake-score passes)
    step_heads            90 s    150 s  two set-ups (~15 s each) and step_flashdmd's / step_dmd2's timed updates
    peak_sd3              50 s    100 s  ~10 s imports, ~25 s setup (15 GB incl. T5-XXL read, every prompt encoded,
                                         the text encoders released), 2 cycles (TTUR 2: 4 iterations)
    offload_sd3           75 s    110 s  4 rows, each ~10 s setup (6 GB without T5 from the page cache, LoRA,
                                         text cache) + a warm-up and 3 timed cycles: none, frozen and
                                         zero_t5_counted ~1.5 s a cycle; base streams ~4 GB of blocks per
                                         transformer pass (~12 passes a generator iteration, ~0.15 s each at
                                         25-50 GB/s): ~4 s a cycle. Each row
                                         gets an even share of the time left; its timed cycles stop there
    quant_sd3             50 s     75 s  int8 and fp8 rows, ~10 s setup (quantising 2 B parameters on the GPU:
                                         ~1 s) + 4 cycles of ~1.7 s each; an int8 base streamed (model_offload base:
                                         torchao's tensors through diffusers' pinned copies), ~16 s
    fsdp2_resume          45 s     90 s  a probe launch (~5 s), then two `accelerate launch` distills of a tiny
                                         model, each ~15 s of imports and start-up plus a second of training
    compile               90 s    150 s  ~20 s setup (as peak_sdxl's), a first cycle that compiles the UNet's
                                         transformer and resnet blocks (forward, backward, no-grad; each shape of
                                         the UNet's three levels: ~40-60 s of inductor on 16 cores), 8 updates
    plans (background)   110 s      --   flashdmd plan of both peak configs (~30 s each) and of the 5 rows' (~10 s
                                         each) on 4 CPU threads beside the GPU work
    total               ~590 s    450 s  + ~10 s for the wheel install (see BENCHMARKS.md); the parts that
                                         would start after 450 s wait for a second call

``--smoke`` runs every part through the same code on the CPU with tiny models (tests/tiny_models.py: SDXL, SD3
with T5, SAM; 32 px images), in about 35 s on 2 idle cores before the offload / quantisation rows (they add ~12 s
of parts and ~8 s of plans on 2 busy cores); its CPU parts and the plans share one process (on a GPU each group is
a process of its own, so that every peak starts from an empty card). Where the CPU cannot measure what the GPU run
does the JSON says so: a CUDA peak is null with a reason and the process's peak RSS beside it (the plan is still
computed, for the CPU, and its ratio to the RSS given for information only; the rows, which share a process, get
no RSS); the fp8 row is "not run" (no CUDA device), and the offload rows time the same computation as none (the
weights are in CPU memory already); accelerate does not enable FSDP on a CPU, so the launch runs one plain process and
``fsdp2_enabled`` is false. tests/test_gpu_check.py runs it.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO / "tests"))

GiB = 2 ** 30
TOLERANCE = 0.15  # the bound on the plan's error
SCHEMA = 1

# parts in the order they run; each group is one process sharing its set-up (the SDXL Flash-DMD run serves the
# SDXL peak, its step time and the images per second)
PARTS = ("build", "peak_sdxl", "step_flashdmd", "images_per_second", "step_dmd2", "step_heads", "peak_sd3",
         "offload_sd3", "quant_sd3", "fsdp2_resume", "compile")
GROUPS = {"build": ("build",), "sdxl": ("peak_sdxl", "step_flashdmd", "images_per_second", "step_dmd2", "step_heads"),
          "sd3": ("peak_sd3", "offload_sd3", "quant_sd3"), "fsdp2": ("fsdp2_resume",), "compile": ("compile",)}
# --smoke: the CPU parts share one process, which also makes the plans after them (on a GPU the groups are apart so
# that each peak starts from an empty card, and the plans run in a CPU process beside them); what differs is only
# the number of interpreter starts, each ~4 s of imports on a small CPU
SMOKE_GROUPS = {"cpu": ("build", "peak_sdxl", "step_flashdmd", "images_per_second", "step_dmd2", "step_heads",
                        "peak_sd3", "offload_sd3", "quant_sd3", "compile"), "fsdp2": ("fsdp2_resume",)}
# step_heads: the world presets' text-conditioned pooled Pixel-GAN head (BENCHMARKS.md section 3a) at full size, on
# the Flash-DMD preset and on DMD2 (the attribution's dmd2_head), timed as step_flashdmd / step_dmd2 are
TEXT_HEAD = ["disc_kind=pixel", "disc_backbone=sam", "disc_head=pooled", "disc_head_channels=256",
             "disc_condition=text", "disc_loss=hinge", "disc_gen_weight=0.05", "disc_weight=1.0"]
HEAD_ROWS = {"flashdmd_text_head": "sdxl_flashdmd_texthead", "dmd2_text_head": "sdxl_dmd2_texthead"}
PEAK_PARTS = {"peak_sdxl": "sdxl_flashdmd", "peak_sd3": "sd3_flashdmd"}  # part -> the config it measures
# the offloading / quantisation rows: part -> (row, model_offload, model_frozen_quant); one factor changed at a time
# against the none/none row (offload_sd3's first), every row its own set-up of the same SD3 config
# and model_zero_t5 (auto: padded on a GPU, counted on the CPU; the zero_t5_counted row counts on the GPU too)
ROWS = {"offload_sd3": (("none", "none", "none", "auto"), ("frozen", "frozen", "none", "auto"),
                        ("base", "base", "none", "auto"), ("zero_t5_counted", "none", "none", "counted")),
        "quant_sd3": (("int8", "none", "int8", "auto"), ("fp8", "none", "fp8", "auto"),
                      ("base_int8", "base", "int8", "auto"))}
REFERENCE_ROW = ("offload_sd3", "none")
OK = ("passed", "not offered")

MODES = {
    "gpu": {"budget_s": 450, "part_budget_s": {"build": 150, "peak_sdxl": 90, "step_flashdmd": 45,
                                                "images_per_second": 60, "step_dmd2": 100, "step_heads": 150,
                                                "peak_sd3": 100,
                                                "offload_sd3": 110, "quant_sd3": 75, "fsdp2_resume": 90,
                                                "compile": 150},
            "estimate_s": {"build": 45, "peak_sdxl": 45, "step_flashdmd": 20, "images_per_second": 25,
                           "step_dmd2": 55, "step_heads": 90, "peak_sd3": 50, "offload_sd3": 75, "quant_sd3": 50, "fsdp2_resume": 45,
                           "compile": 90},
            "updates": {"sdxl_flashdmd": 8, "sdxl_dmd2": 4, "sdxl_flashdmd_compile": 8,
                        "sdxl_flashdmd_texthead": 8, "sdxl_dmd2_texthead": 4}, "row_cycles": 3,
            "student_images": 8, "teacher_images": 2, "sample_batch": 2, "data_workers": 2, "plan_threads": 4,
            "threads": None, "child_start_s": 15, "compile_backend": "inductor"},
    "smoke": {"budget_s": 240, "part_budget_s": {"build": 60, "peak_sdxl": 60, "step_flashdmd": 40,
                                                  "images_per_second": 40, "step_dmd2": 60, "step_heads": 60,
                                                  "peak_sd3": 60,
                                                  "offload_sd3": 60, "quant_sd3": 60, "fsdp2_resume": 90,
                                                  "compile": 60},
              "estimate_s": {"build": 6, "peak_sdxl": 8, "step_flashdmd": 2, "images_per_second": 2,
                             "step_dmd2": 3, "step_heads": 5, "peak_sd3": 7, "offload_sd3": 5, "quant_sd3": 3, "fsdp2_resume": 25,
                             "compile": 6},
              "updates": {"sdxl_flashdmd": 2, "sdxl_dmd2": 1, "sdxl_flashdmd_compile": 2,
                          "sdxl_flashdmd_texthead": 1, "sdxl_dmd2_texthead": 1}, "row_cycles": 1,
              "student_images": 4, "teacher_images": 2, "sample_batch": 2, "data_workers": 0, "plan_threads": 1,
              "threads": 1, "child_start_s": 10, "compile_backend": "aot_eager"},
}
TEACHER_STEPS = 50
TEACHER_CFG = 5.0  # diffusers' SDXL pipeline default (flashdmd.inference.TEACHER_DEFAULT_CFG)


# ---------------------------------------------------------------------------------------------------
# small helpers (the parent imports no torch: it must hold no CUDA context while the children measure)


def _write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _gib(n) -> str:
    return "n/a" if n is None else f"{n / GiB:.2f}"


def _one_line(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}".strip()
    return text.splitlines()[0][:500] if text else type(e).__name__


def _child_env(state: dict, threads: int | None = None, cuda: bool = True) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1", PYTHONUNBUFFERED="1",
               TRANSFORMERS_NO_ADVISORY_WARNINGS="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    threads = threads or state["settings"]["threads"]
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    if not cuda:
        env["CUDA_VISIBLE_DEVICES"] = ""  # the planner works on the meta device: no CUDA context beside the runs
    return env


def _run_logged(cmd: list[str], log: Path, env: dict, timeout: float, poll=None) -> tuple[int | None, float]:
    """Run ``cmd`` in its own process group, output into ``log``, calling ``poll()`` every 2 s while it runs; on
    timeout, or when ``poll()`` returns True, kill that group (the command's DataLoader workers too). Returns
    (exit code, or None when killed; seconds)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with open(log, "a") as fh:
        fh.write("$ " + " ".join(cmd) + "\n")
        fh.flush()
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True)
        code = None
        while True:
            try:
                code = proc.wait(timeout=min(2.0, max(t0 + timeout - time.time(), 0.01)))
                break
            except subprocess.TimeoutExpired:
                if time.time() >= t0 + timeout or (poll is not None and poll()):
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                    break
    return code, time.time() - t0


def _tail(path: Path, n: int = 15) -> list[str]:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return []
    return [ln for ln in lines if ln.strip() and "it/s]" not in ln and "s/it]" not in ln][-n:]


# ---------------------------------------------------------------------------------------------------
# the run's settings: folders and configs (decided by the parent, read by every child)


def settings(a: argparse.Namespace) -> dict:
    mode = "smoke" if a.smoke else "gpu"
    m = MODES[mode]
    work = Path(a.work or ("/tmp/flashdmd-gpu-check" + ("-smoke" if a.smoke else ""))).resolve()
    f = {"sdxl": work / "sdxl", "sd3": work / "sd3-t5", "sd3_no_t5": work / "sd3-no-t5", "sam": work / "sam-vit-base",
         "data": work / "data", "tiny_sdxl": work / "tiny-sdxl", "tiny_sam": work / "tiny-sam"}
    if a.smoke:  # every model tiny: the full-size names point at tiny folders
        f.update(sdxl=work / "tiny-sdxl", sd3=work / "tiny-sd3-t5", sd3_no_t5=work / "tiny-sd3-no-t5",
                 sam=work / "tiny-sam")
    images, prompts = f["data"] / "images", f["data"] / "prompts.txt"
    common = ["model_lora_rank=64", "run_batch_size=1", "model_frozen_dtype=bfloat16", "model_mixed_precision=bf16",
              f"data_real={images}", f"data_prompts={prompts}", f"data_workers={m['data_workers']}",
              "eval_every_steps=0", "eval_prompts=null", "eval_clip_model=null", "run_sample_every_steps=0",
              "run_checkpoint_every_steps=0", "run_log_every_steps=1000000", "rl_enabled=false",
              # random weights may give a non-finite update now and then; a timing run must not stop for it
              "run_max_nonfinite_in_row=1000000"]
    sam = f"disc_backbone_path={f['sam']}"
    configs = {
        "sdxl_flashdmd": {"preset": str(REPO / "configs/sdxl_flashdmd.yaml"),
                          "sets": [f"model_teacher={f['sdxl']}", sam] + common},
        "sdxl_dmd2": {"preset": str(REPO / "configs/sdxl_dmd2.yaml"), "sets": [f"model_teacher={f['sdxl']}"] + common},
        "sd3_flashdmd": {"preset": str(REPO / "configs/sd3_flashdmd.yaml"),
                         "sets": [f"model_teacher={f['sd3']}", sam] + common + ["model_text_cache=true"]},
        # the FSDP2 launch: the SDXL preset as it is (full fine-tune) on the tiny folders, 2 updates + a checkpoint
        "fsdp2": {"preset": str(REPO / "configs/sdxl_flashdmd.yaml"),
                  "sets": [f"model_teacher={f['tiny_sdxl']}", f"disc_backbone_path={f['tiny_sam']}", "run_batch_size=1",
                           f"data_real={images}", f"data_prompts={prompts}", "data_workers=0",
                           "eval_every_steps=0", "eval_prompts=null", "eval_clip_model=null",
                           "run_sample_every_steps=0", "run_log_every_steps=1", "run_checkpoint_every_steps=2",
                           "run_max_steps=2", "run_max_nonfinite_in_row=1000000"]},
    }
    configs["sdxl_flashdmd_compile"] = {"preset": configs["sdxl_flashdmd"]["preset"],
                                        "sets": configs["sdxl_flashdmd"]["sets"] + ["model_compile=student"]}
    configs["sdxl_flashdmd_texthead"] = {"preset": configs["sdxl_flashdmd"]["preset"],
                                         "sets": configs["sdxl_flashdmd"]["sets"] + TEXT_HEAD}
    configs["sdxl_dmd2_texthead"] = {"preset": configs["sdxl_dmd2"]["preset"],
                                     "sets": configs["sdxl_dmd2"]["sets"] + [sam] + TEXT_HEAD}
    # the rows: peak_sd3's config on the same weights without T5 (the text cache encodes every prompt at set-up and
    # frees the encoders, so an iteration is the same computation: zeros of T5's shape in its place), gradient
    # checkpointing on in every row (model_offload base needs it; the preset has it), one field changed per row
    for rows in ROWS.values():
        for _, offload, quant, zero_t5 in rows:
            configs[row_config(offload, quant, zero_t5)] = {
                "preset": configs["sd3_flashdmd"]["preset"],
                "sets": [f"model_teacher={f['sd3_no_t5']}", sam] + common + [
                    "model_text_cache=true", "model_gradient_checkpointing=true", f"model_offload={offload}",
                    f"model_frozen_quant={quant}", f"model_zero_t5={zero_t5}"]}
    return {"mode": mode, "work": str(work), "folders": {k: str(v) for k, v in f.items()},
            "data_images": str(images), "prompts": str(prompts), "configs": configs,
            "budgets": dict(m["part_budget_s"]), "settings": {k: m[k] for k in (
                "updates", "row_cycles", "student_images", "teacher_images", "sample_batch", "data_workers",
                "plan_threads", "threads", "child_start_s", "compile_backend")}}


def row_config(offload: str, quant: str, zero_t5: str = "auto") -> str:
    """The name of the row's config in the state (and of its plan's file)."""
    return f"sd3_offload_{offload}_quant_{quant}" + ("" if zero_t5 == "auto" else f"_zero_t5_{zero_t5}")


def compile_offered() -> bool:
    """Whether the project offers torch.compile of the student: a ``model_compile`` field of DistillConfig."""
    import dataclasses

    from flashdmd.training.config import DistillConfig
    return "model_compile" in {f.name for f in dataclasses.fields(DistillConfig)}


# ---------------------------------------------------------------------------------------------------
# children: one process per group


class Child:
    """What a child process shares between its parts: the state, the set-up runs (distill contexts) by config."""

    def __init__(self, state: dict):
        import torch
        self.torch = torch
        self.state = state
        self.cuda = torch.cuda.is_available() and state["mode"] == "gpu"
        self.parts_dir = Path(state["work"]) / "parts"
        self.ctxs: dict[str, tuple] = {}
        if state["settings"]["threads"]:
            torch.set_num_threads(state["settings"]["threads"])

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()

    def environment(self, group: str) -> None:
        import importlib.metadata as md
        torch = self.torch
        versions = {}
        for pkg in ("torch", "diffusers", "transformers", "accelerate", "peft", "safetensors"):
            try:
                versions[pkg] = md.version(pkg)
            except md.PackageNotFoundError:
                versions[pkg] = None
        env = {"python": platform.python_version(), "packages": versions, "cpus": os.cpu_count(),
               "cuda_available": torch.cuda.is_available(), "torch_cuda": torch.version.cuda}
        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            env.update(device_name=p.name, device_memory_bytes=p.total_memory,
                       multiprocessors=p.multi_processor_count)
        _write_json(self.parts_dir / f"_env_{group}.json", env)

    # -- parts --------------------------------------------------------------------------------------
    def run_part(self, name: str, fn) -> None:
        t0 = time.time()
        (self.parts_dir / f"{name}.started").write_text(str(t0))
        deadline = t0 + self.state["budgets"][name]
        print(f"== {name} (budget {self.state['budgets'][name]} s)", flush=True)
        try:
            res = fn(deadline)
            res.setdefault("status", "passed")
        except Exception as e:  # every part stands alone: record and go on
            traceback.print_exc()
            res = {"status": "failed", "error": _one_line(e), "traceback": traceback.format_exc().splitlines()[-12:]}
        res["seconds"] = round(time.time() - t0, 1)
        _write_json(self.parts_dir / f"{name}.json", res)
        print(f"== {name}: {res['status']} in {res['seconds']} s", flush=True)

    def context(self, name: str):
        """(distill context, writer, set-up seconds, fresh) of config ``name``, set up on first use."""
        if name in self.ctxs:
            ctx, writer, setup_s, _ = self.ctxs[name]
            return ctx, writer, setup_s, False
        from flashdmd.training import distill
        from flashdmd.training.config import DistillConfig
        c = self.state["configs"][name]
        cfg = DistillConfig.from_sources(c["preset"], c["sets"])
        t0 = time.time()
        ctx = distill.setup(cfg, log=lambda line: print("  setup:", line, flush=True))
        self.sync()
        entry = (ctx, distill._NullWriter(), round(time.time() - t0, 1), True)
        self.ctxs[name] = entry
        return entry

    def release(self, name: str) -> None:
        entry = self.ctxs.pop(name, None)
        if entry is None:
            return
        ctx = entry[0]
        if ctx.real is not None:
            ctx.real.close()
        del ctx, entry
        gc.collect()
        if self.cuda:
            self.torch.cuda.empty_cache()

    def cycle(self, ctx, writer) -> float:
        """One Stage-1 cycle -- the generator iteration and its TTUR - 1 critic-only iterations -- in seconds."""
        from flashdmd.training import distill
        if ctx.iteration % ctx.cfg.fake_score_ttur:
            raise RuntimeError(f"cycle must start at a generator iteration (iteration {ctx.iteration})")
        self.sync()
        t0 = time.perf_counter()
        for _ in range(ctx.cfg.fake_score_ttur):
            distill.distill_iteration(ctx, writer)
        self.sync()
        return time.perf_counter() - t0

    def measured_cycle(self, ctx, writer) -> dict:
        torch = self.torch
        if not self.cuda:
            import resource
            s = self.cycle(ctx, writer)
            return {"seconds": round(s, 3), "peak_allocated_bytes": None, "peak_reserved_bytes": None,
                    "reason": "no CUDA device (CPU run): no CUDA peak; ru_maxrss_bytes is this process's peak "
                              "resident memory so far (interpreter, libraries and every role included)",
                    "ru_maxrss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
        torch.cuda.synchronize()
        setup_peak = torch.cuda.max_memory_allocated()  # since the last reset: set-up, or the previous cycle
        # blocks set-up freed (a released text encoder) are not the iteration's: hand them back before measuring
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        s = self.cycle(ctx, writer)
        free, total = torch.cuda.mem_get_info()
        reserved = torch.cuda.memory_reserved()
        return {"seconds": round(s, 3), "allocated_before_bytes": before, "peak_allocated_before_bytes": setup_peak,
                "peak_allocated_bytes": torch.cuda.max_memory_allocated(),
                "peak_reserved_bytes": torch.cuda.max_memory_reserved(),
                # CUDA context, cuBLAS / cuDNN handles and anything else on the device outside torch's pool
                "outside_torch_bytes": max(total - free - reserved, 0), "device_total_bytes": total}

    def peak(self, config: str, deadline: float) -> dict:
        ctx, writer, setup_s, fresh = self.context(config)
        c = self.state["configs"][config]
        res = {"config": c, "setup_seconds": setup_s, "cuda": self.cuda, "fresh_run": fresh,
               "ttur": ctx.cfg.fake_score_ttur, "resolution": ctx.resolution,
               "frozen_dtype": str(ctx.family.frozen_dtype).removeprefix("torch."),
               "mixed_precision": str(ctx.accelerator.mixed_precision), "cycles": []}
        for _ in range(2):  # the first cycle allocates AdamW's states lazily; the second is the steady state
            res["cycles"].append(self.measured_cycle(ctx, writer))
            part = next(k for k, v in PEAK_PARTS.items() if v == config)
            _write_json(self.parts_dir / f"{part}.partial.json", res)
            if time.time() > deadline:
                break
        cyc = res["cycles"]
        if self.cuda:
            res["measured"] = {"peak_allocated_bytes": max(x["peak_allocated_bytes"] for x in cyc),
                               "peak_reserved_bytes": max(x["peak_reserved_bytes"] for x in cyc),
                               "outside_torch_bytes": max(x["outside_torch_bytes"] for x in cyc)}
            res["measured"]["device_peak_bytes"] = (res["measured"]["peak_reserved_bytes"]
                                                    + res["measured"]["outside_torch_bytes"])
        else:
            res["measured"] = {"peak_allocated_bytes": None, "peak_reserved_bytes": None,
                               "reason": cyc[0]["reason"], "ru_maxrss_bytes": max(x["ru_maxrss_bytes"] for x in cyc)}
        res["nonfinite_updates_in_row"] = dict(ctx.nonfinite)
        return res

    def timed_cycles(self, ctx, writer, n: int, deadline: float, first: tuple | None = None) -> tuple[list, bool]:
        """Up to ``n`` timed cycles, none started once 1.5x the longest so far would pass ``deadline``; ``first``: (an
        estimate, a deadline) that gates the first one too (a row: its warm-up against the part's hard limit), else
        the first always runs. Returns (the cycles' seconds, whether the budget stopped them early)."""
        times = []
        for _ in range(n):
            last, limit = (max(times), deadline) if times else (first or (0.0, math.inf))
            if time.time() + 1.5 * last > limit:
                return times, True
            times.append(round(self.cycle(ctx, writer), 4))
        return times, False

    def step_time(self, config: str, deadline: float) -> dict:
        ctx, writer, setup_s, fresh = self.context(config)
        res = {"config": self.state["configs"][config], "setup_seconds": setup_s, "ttur": ctx.cfg.fake_score_ttur,
               "resolution": ctx.resolution, "batch_size": ctx.cfg.run_batch_size,
               "frozen_dtype": str(ctx.family.frozen_dtype).removeprefix("torch."),
               "mixed_precision": str(ctx.accelerator.mixed_precision)}
        if ctx.iteration == 0:  # warm-up: the first cycle (lazy AdamW states, kernel selection, compilation)
            res["warmup_cycle_seconds"] = round(self.cycle(ctx, writer), 3)
        else:
            res["warmup"] = f"{ctx.iteration // ctx.cfg.fake_score_ttur} cycle(s) already run by an earlier part"
        times, stopped = self.timed_cycles(ctx, writer, self.state["settings"]["updates"][config], deadline)
        if stopped:
            res["stopped_early"] = "part budget"
        if not times:
            raise RuntimeError("no update fitted in the part's budget")
        res["updates_seconds"] = times
        res["seconds_per_generator_update"] = statistics.median(times)
        res["nonfinite_updates_in_row"] = dict(ctx.nonfinite)
        return res

    def head_step_times(self, deadline: float) -> dict:
        """step_time of each HEAD_ROWS config, alone on the card one after the other, each an even share of the
        time left; the ratio of each to step_flashdmd's / step_dmd2's seconds where those parts ran."""
        res = {"rows": {}}
        for i, (row, config) in enumerate(HEAD_ROWS.items()):
            share = (deadline - time.time()) / (len(HEAD_ROWS) - i)
            try:
                res["rows"][row] = self.step_time(config, time.time() + share)
            except Exception as e:  # the next row still runs
                traceback.print_exc()
                res["rows"][row] = {"status": "failed", "error": _one_line(e)}
            self.release(config)
            _write_json(self.parts_dir / "step_heads.partial.json", res)
        shipped = {p: _read_json(self.parts_dir / f"{p}.json") for p in ("step_flashdmd", "step_dmd2")}
        dmd2 = (shipped["step_dmd2"] or {}).get("seconds_per_generator_update")
        for row, r in res["rows"].items():
            if "seconds_per_generator_update" in r and dmd2:
                r["relative_to_step_dmd2"] = r["seconds_per_generator_update"] / dmd2
        failed = [f"{k}: {v['error']}" for k, v in res["rows"].items() if v.get("status") == "failed"]
        if failed:
            res["status"], res["error"] = "failed", "; ".join(failed)
        return res

    def compiled_step_time(self, deadline: float) -> dict:
        """step_time of the compiled config, with the backend and what dynamo compiled (frames, graphs, breaks)."""
        from torch._dynamo.utils import counters

        from flashdmd.networks import compiling
        compiling.BACKEND = self.state["settings"]["compile_backend"]
        counters.clear()
        res = self.step_time("sdxl_flashdmd_compile", deadline)
        res.update(backend=compiling.BACKEND, compile_note="warmup_cycle_seconds includes the compilation",
                   dynamo={"frames_compiled": counters["frames"]["ok"], "frames_total": counters["frames"]["total"],
                           "unique_graphs": counters["stats"]["unique_graphs"],
                           "graph_breaks": sum(counters["graph_break"].values()),
                           "graph_break_reasons": sorted({k.splitlines()[0] for k in counters["graph_break"]})[:8]})
        self.release("sdxl_flashdmd_compile")
        return res

    def images_per_second(self, deadline: float) -> dict:
        from flashdmd.inference import Model, sample_images
        ctx, _, setup_s, _ = self.context("sdxl_flashdmd")
        fam, st = ctx.family, self.state["settings"]
        student_net = ctx.accelerator.unwrap_model(ctx.student)
        was = student_net.training
        student_net.eval()
        student = Model(fam, student_net, "student", list(ctx.timesteps), 1.0, True, ctx.resolution)
        teacher = Model(fam, ctx.teacher, "teacher", None, TEACHER_CFG, False, ctx.resolution)
        lines = [ln.strip() for ln in Path(self.state["prompts"]).read_text().splitlines() if ln.strip()]
        prompts = [lines[i % len(lines)] for i in range(max(st["student_images"], st["teacher_images"]))]
        batch = st["sample_batch"]
        res = {"resolution": ctx.resolution, "batch_size": batch, "teacher_guidance_scale": TEACHER_CFG,
               "setup_seconds": setup_s}

        def timed(model, n, steps):
            self.sync()
            t0 = time.perf_counter()
            sample_images(model, prompts[:n], seed=0, steps=steps, batch_size=batch)
            self.sync()
            return time.perf_counter() - t0

        res["warmup_seconds"] = round(timed(student, 1, None) + timed(teacher, 1, 2), 3)
        s = timed(student, st["student_images"], None)
        res["student"] = {"steps": len(ctx.timesteps), "images": st["student_images"], "seconds": round(s, 3),
                          "images_per_second": st["student_images"] / s}
        _write_json(self.parts_dir / "images_per_second.partial.json", res)
        n = st["teacher_images"]
        # one teacher step costs about 2 (CFG) / 1 of a student step: skip what cannot finish in the budget
        if time.time() + 2.5 * s / st["student_images"] / len(ctx.timesteps) * TEACHER_STEPS * n > deadline:
            n = 1
        t = timed(teacher, n, TEACHER_STEPS)
        res["teacher"] = {"steps": TEACHER_STEPS, "cfg": True, "images": n, "seconds": round(t, 3),
                          "images_per_second": n / t}
        res["speedup"] = res["student"]["images_per_second"] / res["teacher"]["images_per_second"]
        student_net.train(was)
        return res

    # -- the offloading / quantisation rows --------------------------------------------------------------
    def fp8_unavailable(self) -> str | None:
        """Why fp8 cannot run here (None: it can): a CUDA GPU of compute capability 8.9+ is needed."""
        from flashdmd.networks.quant import FP8_CAPABILITY
        torch = self.torch
        need = f"fp8 needs a CUDA GPU of compute capability {FP8_CAPABILITY[0]}.{FP8_CAPABILITY[1]}+"
        if not self.cuda:
            return f"no CUDA device ({'CPU smoke' if self.state['mode'] == 'smoke' else 'CPU'} run); {need}"
        cap = torch.cuda.get_device_capability()
        if cap < FP8_CAPABILITY:
            return f"{torch.cuda.get_device_name()} has compute capability {cap[0]}.{cap[1]}; {need}"
        return None

    @staticmethod
    def device_bytes(ctx) -> dict:
        """Bytes of the frozen parts' tensors by device type right after set-up: where offloading left them (the
        teacher is the shared base under LoRA; a quantised weight counted by its data and scales)."""
        from flashdmd.networks.quant import inner_tensors
        nets = {"teacher": ctx.teacher, "vae": ctx.family.vae,
                "disc": ctx.accelerator.unwrap_model(ctx.disc) if ctx.disc is not None else None}
        out = {}
        for role, net in nets.items():
            if net is None:
                continue
            seen, by = set(), {}
            for t in list(net.parameters()) + list(net.buffers()):
                for x in inner_tensors(t):
                    key = (x.device.type, x.data_ptr(), x.numel())
                    if key not in seen:
                        seen.add(key)
                        by[x.device.type] = by.get(x.device.type, 0) + x.numel() * x.element_size()
            out[role] = by
        return out

    def row(self, offload: str, quant: str, zero_t5: str, deadline: float, hard_deadline: float) -> dict:
        """One row: a fresh set-up of the row's config, a warm-up cycle, then timed cycles (until ``deadline``);
        the CUDA peak over all of them (the first cycle allocates AdamW's states, the later ones are the steady
        state), the set-up's apart."""
        torch, config = self.torch, row_config(offload, quant, zero_t5)
        res = {"model_offload": offload, "model_frozen_quant": quant, "model_zero_t5": zero_t5, "config_name": config,
               "pid": os.getpid()}
        if quant == "fp8" and self.fp8_unavailable():
            return {**res, "status": "not run", "reason": self.fp8_unavailable()}
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()
            res["allocated_at_start_bytes"] = torch.cuda.memory_allocated()  # left by earlier rows: should be ~0
            torch.cuda.reset_peak_memory_stats()
        try:
            ctx, writer, res["setup_seconds"], _ = self.context(config)
            res.update(ttur=ctx.cfg.fake_score_ttur, resolution=ctx.resolution, batch_size=ctx.cfg.run_batch_size,
                       frozen_dtype=str(ctx.family.frozen_dtype).removeprefix("torch."),
                       mixed_precision=str(ctx.accelerator.mixed_precision),
                       device_bytes_after_setup=self.device_bytes(ctx))
            if self.cuda:
                res["setup_peak_allocated_bytes"] = torch.cuda.max_memory_allocated()
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
                res["allocated_after_setup_bytes"] = torch.cuda.memory_allocated()
            warm = res["warmup_cycle_seconds"] = round(self.cycle(ctx, writer), 4)
            times, stopped = self.timed_cycles(ctx, writer, self.state["settings"]["row_cycles"], deadline,
                                               first=(warm, hard_deadline))
            if stopped:
                res["stopped_early"] = "row budget" if times else "part budget"
            if not times:
                raise RuntimeError("no timed cycle fitted in the part's budget after the warm-up")
            res["cycles_seconds"] = times
            res["seconds_per_cycle"] = statistics.median(times)
            res["seconds_per_iteration"] = res["seconds_per_cycle"] / ctx.cfg.fake_score_ttur
            res["measured"] = self.row_peak()
            res["nonfinite_updates_in_row"] = dict(ctx.nonfinite)
        finally:
            self.release(config)
        res["status"] = "passed"
        return res

    def row_peak(self) -> dict:
        torch = self.torch
        if not self.cuda:
            return {"peak_allocated_bytes": None, "peak_reserved_bytes": None,
                    "reason": "no CUDA device (CPU run): no CUDA peak, and the rows share one process, whose peak "
                              "resident memory would not be a row's"}
        torch.cuda.synchronize()
        free, total = torch.cuda.mem_get_info()
        reserved = torch.cuda.max_memory_reserved()
        m = {"peak_allocated_bytes": torch.cuda.max_memory_allocated(), "peak_reserved_bytes": reserved,
             "outside_torch_bytes": max(total - free - torch.cuda.memory_reserved(), 0), "device_total_bytes": total}
        m["device_peak_bytes"] = reserved + m["outside_torch_bytes"]
        return m

    def rows(self, part: str, deadline: float) -> dict:
        """The part's rows, one after the other in this process; each gets an even share of the time left (a row's
        set-up is not interrupted; its timed cycles stop at its share). A row that fails does not stop the next."""
        rows = ROWS[part]
        res = {"family": "sd3", "teacher": self.state["folders"]["sd3_no_t5"], "rows": {},
               "per_iteration": "seconds_per_cycle / TTUR: a cycle is one generator iteration and its TTUR - 1 "
                                "critic-only iterations (the median of the timed cycles after one warm-up cycle)"}
        for i, (name, offload, quant, zero_t5) in enumerate(rows):
            share = (deadline - time.time()) / (len(rows) - i)
            if share <= 0:
                res["rows"][name] = {"model_offload": offload, "model_frozen_quant": quant, "model_zero_t5": zero_t5,
                                     "status": "not run",
                                     "reason": "the part's budget was spent"}
                continue
            print(f"-- {part} row {name}: model_offload {offload}, model_frozen_quant {quant}, model_zero_t5 "
                  f"{zero_t5}", flush=True)
            try:
                res["rows"][name] = self.row(offload, quant, zero_t5, time.time() + share, deadline)
            except Exception as e:  # the next row still runs
                traceback.print_exc()
                res["rows"][name] = {"model_offload": offload, "model_frozen_quant": quant, "model_zero_t5": zero_t5,
                                     "status": "failed",
                                     "error": _one_line(e), "traceback": traceback.format_exc().splitlines()[-8:]}
            _write_json(self.parts_dir / f"{part}.partial.json", res)
        # a row that failed, or that the budget left out, fails the part (fp8 on a card without float8 does not)
        bad = [f"{n} {r['status']} ({r.get('error') or r.get('reason')})" for n, r in res["rows"].items()
               if r["status"] == "failed" or "budget" in r.get("reason", "")]
        if bad:
            res["status"], res["error"] = "failed", "rows: " + "; ".join(bad)
        return res


def child_main(group: str, parts: list[str], state_path: Path) -> int:
    state = json.loads(state_path.read_text())
    if group == "plan":
        return plan_main(parts, state)
    ch = Child(state)
    ch.environment(group)
    if group == "cpu":  # --smoke: this process makes the plans too, after the parts they are compared with
        parts = parts + ["plans"]
    for name in parts:
        if name == "build":
            ch.run_part(name, lambda d: build(state, ch.cuda, state["selected"]))
        elif name == "peak_sdxl":
            ch.run_part(name, lambda d: ch.peak("sdxl_flashdmd", d))
        elif name == "step_flashdmd":
            ch.run_part(name, lambda d: ch.step_time("sdxl_flashdmd", d))
        elif name == "images_per_second":
            ch.run_part(name, ch.images_per_second)
        elif name == "step_dmd2":
            ch.release("sdxl_flashdmd")  # one run on the card at a time
            ch.run_part(name, lambda d: ch.step_time("sdxl_dmd2", d))
        elif name == "step_heads":
            ch.release("sdxl_flashdmd")
            ch.release("sdxl_dmd2")
            ch.run_part(name, ch.head_step_times)
        elif name == "peak_sd3":
            ch.run_part(name, lambda d: ch.peak("sd3_flashdmd", d))
        elif name in ROWS:
            ch.release("sd3_flashdmd")  # every row sets up its own run, alone on the card
            ch.run_part(name, lambda d, name=name: ch.rows(name, d))
        elif name == "compile":
            ch.release("sdxl_flashdmd")  # one run on the card at a time (--smoke: the CPU group ran it)
            ch.run_part(name, ch.compiled_step_time)
        elif name == "plans":
            plan_main([x for x in (*PEAK_PARTS, *ROWS) if x in state["selected"]], state)
    return 0


# ---------------------------------------------------------------------------------------------------
# build


def build(state: dict, cuda: bool, needed_parts: list[str]) -> dict:
    """The folders the selected parts need (those already there are reused)."""
    import torch

    import fullsize
    import tiny_models as tm
    f = {k: Path(v) for k, v in state["folders"].items()}
    needs = set(needed_parts)
    want = set()
    if needs & {"peak_sdxl", "step_flashdmd", "images_per_second", "step_dmd2", "compile"}:
        want |= {"sdxl", "data"}
    if needs & {"peak_sdxl", "step_flashdmd", "images_per_second", "peak_sd3", "compile"}:
        want |= {"sam", "data"}
    if "peak_sd3" in needs:
        want |= {"sd3", "data"}
    if needs & set(ROWS):
        want |= {"sd3", "sd3_no_t5", "sam", "data"}
    if "fsdp2_resume" in needs:
        want |= {"tiny_sdxl", "tiny_sam", "data"}
    smoke = state["mode"] == "smoke"
    device = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if not smoke else torch.float32
    work = Path(state["work"])
    scratch = work / "_tokenizer_scratch"

    def tiny(folder: Path, make) -> None:
        part = folder.with_name(folder.name + ".partial")
        if part.exists():
            import shutil
            shutil.rmtree(part)
        make(part)
        os.replace(part, folder)

    builders = {
        "tiny_sdxl": (lambda: f["tiny_sdxl"] / "model_index.json",
                      lambda: tiny(f["tiny_sdxl"], lambda p: tm.save_pipeline(tm.sdxl_pipeline(scratch), p))),
        "tiny_sam": (lambda: f["tiny_sam"] / "config.json",
                     lambda: tiny(f["tiny_sam"], lambda p: tm.sam_vision_folder(p))),
        "data": (lambda: f["data"] / "prompts.txt",
                 lambda: fullsize.write_data(f["data"], n=8, size=32 if smoke else 512)),
    }
    if smoke:  # sdxl / sam are the tiny folders; SD3 tiny with its T5, as the full-size SD3 has one
        builders["sd3"] = (lambda: f["sd3"] / "model_index.json",
                           lambda: tiny(f["sd3"], lambda p: tm.save_pipeline(tm.sd3_pipeline(scratch, with_t5=True),
                                                                            p)))
        want = {"tiny_sdxl" if w == "sdxl" else "tiny_sam" if w == "sam" else w for w in want}
    else:
        builders["sdxl"] = (lambda: f["sdxl"] / "model_index.json",
                            lambda: fullsize.write_sdxl(f["sdxl"], dtype=dtype, device=device))
        builders["sd3"] = (lambda: f["sd3"] / "model_index.json",
                           lambda: fullsize.write_sd3_medium(f["sd3"], dtype=dtype, t5=True, device=device))
        builders["sam"] = (lambda: f["sam"] / "config.json",
                           lambda: fullsize.write_sam_vit_base(f["sam"], dtype=dtype, device=device))
    # the rows' folder: the SD3 folder's weights (links) without T5, in seconds (see settings())
    builders["sd3_no_t5"] = (lambda: f["sd3_no_t5"] / "model_index.json",
                             lambda: tiny(f["sd3_no_t5"], lambda p: without_t5(f["sd3"], p)))
    res = {"device": device, "dtype": str(dtype).removeprefix("torch."), "folders": {}}
    order = ["tiny_sdxl", "tiny_sam", "data", "sam", "sdxl", "sd3", "sd3_no_t5"]
    for key in [k for k in order if k in want]:
        marker, make = builders[key]
        folder = f[key]
        if marker().exists():
            res["folders"][key] = {"path": str(folder), "reused": True}
            continue
        t0 = time.time()
        try:
            make()
            if cuda:
                torch.cuda.synchronize()
        except Exception as e:  # the other folders still get built: the parts that need only those can run
            traceback.print_exc()
            res["folders"][key] = {"path": str(folder), "error": _one_line(e), "seconds": round(time.time() - t0, 1)}
            res["status"], res["error"] = "failed", f"{key}: {_one_line(e)}"
            continue
        size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())
        res["folders"][key] = {"path": str(folder), "seconds": round(time.time() - t0, 1), "bytes": size}
        counts = _read_json(folder / "parameter_counts.json")
        if counts:
            res["folders"][key]["parameters"] = counts
        print(f"  built {key}: {size / 1e9:.2f} GB in {time.time() - t0:.1f} s", flush=True)
    return res


def without_t5(src: Path, dst: Path) -> None:
    """``dst``: the SD3 folder ``src`` without text_encoder_3 / tokenizer_3 -- its other parts as symbolic links,
    model_index.json with those two set to [null, null] (the layout of an SD3 folder shipped without T5)."""
    dst.mkdir(parents=True)
    for entry in src.iterdir():
        if entry.name not in ("text_encoder_3", "tokenizer_3", "model_index.json", "parameter_counts.json"):
            (dst / entry.name).symlink_to(entry.resolve())
    index = json.loads((src / "model_index.json").read_text())
    index.update(text_encoder_3=[None, None], tokenizer_3=[None, None])
    (dst / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    counts = _read_json(src / "parameter_counts.json")
    if counts:
        counts.pop("text_encoder_3", None)
        _write_json(dst / "parameter_counts.json", counts)


# ---------------------------------------------------------------------------------------------------
# plans (a background CPU process)


def plan_main(parts: list[str], state: dict) -> int:
    import torch

    from flashdmd.training import plan
    from flashdmd.training.config import DistillConfig
    torch.set_num_threads(state["settings"]["plan_threads"])
    device = "cpu" if state["mode"] == "smoke" else "cuda"
    out = Path(state["work"]) / "parts"
    # (the plan's file name, the config): a peak part's plan is plan_<part>, a row's plan_<its config>
    jobs = [(part, PEAK_PARTS[part]) for part in parts if part in PEAK_PARTS]
    jobs += [(row_config(o, q, z), row_config(o, q, z)) for part in parts if part in ROWS for _, o, q, z in ROWS[part]
             if not (q == "fp8" and state["mode"] == "smoke")]  # the CPU smoke never runs the fp8 row
    for key, config in jobs:
        c = state["configs"][config]
        t0 = time.time()
        try:
            cfg = DistillConfig.from_sources(c["preset"], c["sets"])
            r = plan.plan(cfg, plan.Settings(device=device, processes=1))
            res = {"status": "passed", "device": device, "peak_bytes_per_device": r["peak_bytes_per_device"],
                   "peak_phase": r["peak_phase"], "runtime_bytes": r["split"]["runtime"]["other"],
                   "headline": plan.headline(r), "split": r["split"], "setting": r["setting"],
                   "offload": plan_offload_fields(r)}
        except Exception as e:
            traceback.print_exc()
            res = {"status": "failed", "error": _one_line(e)}
        res["seconds"] = round(time.time() - t0, 1)
        _write_json(out / f"plan_{key}.json", res)
        print(f"plan {key}: {res['status']} in {res['seconds']} s", flush=True)
    return 0


def plan_offload_fields(r: dict) -> dict:
    """What the plan says of offloading (its transfers per iteration, their modelled time, the bandwidth it
    assumes): every entry of the plan, or of one of its dict entries, whose name speaks of offloading or transfer."""
    words = ("offload", "transfer", "bandwidth", "host_to_device", "h2d")
    found = {}
    for k, v in r.items():
        if any(w in k for w in words):
            found[k] = v
        elif isinstance(v, dict) and k != "detail":
            found.update({f"{k}.{k2}": v2 for k2, v2 in v.items() if any(w in str(k2) for w in words)})
    return found


def compare(measured: dict, planned: dict | None, cuda: bool) -> dict:
    """The plan beside the measurement, and whether it is within TOLERANCE."""
    if planned is None:
        return {"status": "plan not finished"}
    if planned.get("status") != "passed":
        return {"status": "plan failed", "error": planned.get("error")}
    p = planned["peak_bytes_per_device"]
    out = {"plan_peak_bytes": p, "plan_runtime_bytes": planned["runtime_bytes"], "plan_peak_phase":
           planned["peak_phase"], "plan_headline": planned["headline"], "plan_seconds": planned["seconds"]}
    if not cuda:
        rss = measured.get("ru_maxrss_bytes")
        out.update(plan_over_rss=None if not rss else p / rss, within_tolerance=None,
                   note="CPU smoke: the plan (for the CPU) beside the process's peak RSS, for information; the "
                        "15 % check applies to the CUDA peaks only")
        return out
    tensors = (p - planned["runtime_bytes"]) / measured["peak_allocated_bytes"]
    device = p / measured["device_peak_bytes"]
    out.update(plan_tensors_over_max_allocated=tensors, plan_over_reserved_plus_outside=device,
               within_tolerance=abs(tensors - 1) <= TOLERANCE and abs(device - 1) <= TOLERANCE)
    if not out["within_tolerance"]:
        out["flag"] = (f"plan off by more than {TOLERANCE:.0%}: tensors {tensors:.2f}x of max_memory_allocated, "
                       f"peak {device:.2f}x of reserved + outside torch")
    return out


# ---------------------------------------------------------------------------------------------------
# fsdp2_resume (run from the parent: it is subprocesses already)


def fsdp2_resume(state: dict, deadline: float, log: Path) -> dict:
    c = state["configs"]["fsdp2"]
    work = Path(state["work"])
    run_dir = work / "fsdp2_run"
    acc_cfg = REPO / "configs/accelerate/fsdp2_8gpu.yaml"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(acc_cfg),
              "--num_processes", "1"]
    threads = state["settings"]["threads"]
    cli = ["-m", "flashdmd.cli"] + (["--threads", str(threads)] if threads else []) + ["distill"]
    env = _child_env(state)
    res = {"accelerate_config": str(acc_cfg), "num_processes": 1, "config": c,
           "model": "tests/tiny_models.py SDXL (full fine-tune) + tiny SAM: the accelerate FSDP2 path, not scale"}
    probe_out = work / "parts" / "_accelerate_probe.json"
    probe_out.unlink(missing_ok=True)
    code, s = _run_logged(launch + [str(Path(__file__).resolve()), "--probe-accelerate", str(probe_out)], log, env,
                          max(deadline - time.time(), 1))
    probe = _read_json(probe_out) or {"error": f"probe exited {code}", "log_tail": _tail(log)}
    res["accelerate"] = probe
    res["probe_seconds"] = round(s, 1)
    res["fsdp2_enabled"] = probe.get("distributed_type") == "FSDP" and bool(probe.get("is_fsdp2"))
    run1 = launch + cli + ["--config", c["preset"], "--out", str(run_dir), "--no-progress", "--no-plan", "--overwrite"]
    for item in c["sets"]:
        run1 += ["--set", item]
    log1 = log.with_name(log.stem + "_run.log")
    log1.unlink(missing_ok=True)
    code1, s1 = _run_logged(run1, log1, env, max(deadline - time.time(), 1))
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*")) if (run_dir / "checkpoints").is_dir() \
        else []
    res["run"] = {"command": " ".join(run1), "exit_code": code1, "seconds": round(s1, 1), "checkpoints": ckpts,
                  "log_tail": _tail(log1, 6)}
    run2 = [x for x in run1 if x != "--overwrite"] + ["--resume", "latest", "--set", "run_max_steps=3"]
    log2 = log.with_name(log.stem + "_resume.log")
    log2.unlink(missing_ok=True)
    code2, s2 = _run_logged(run2, log2, env, max(deadline - time.time(), 1))
    text = log2.read_text(errors="replace") if log2.exists() else ""
    info = _read_json(run_dir / "run.json") or {}
    resumed = next((ln for ln in text.splitlines() if ln.startswith("resumed from")), None)
    res["resume"] = {"command": " ".join(run2), "exit_code": code2, "seconds": round(s2, 1), "resumed_line": resumed,
                     "generator_steps": info.get("generator_steps"), "log_tail": _tail(log2, 6)}
    checks = {"run exited 0": code1 == 0, "checkpoint at step 2": "step_00000002" in ckpts,
              "resume exited 0": code2 == 0, "resumed at step 2": bool(resumed and "at step 2" in resumed),
              "run.json counts 3 updates": info.get("generator_steps") == 3}
    if state["mode"] == "gpu":
        checks["accelerate enabled FSDP2"] = res["fsdp2_enabled"]
    else:
        res["fsdp2_note"] = ("accelerate enables FSDP on GPUs only: on the CPU the launch runs one plain process "
                             "(tests/test_distributed.py shards with fully_shard directly instead)")
    res["checks"] = checks
    res["status"] = "passed" if all(checks.values()) else "failed"
    if res["status"] == "failed":
        res["error"] = "failed checks: " + ", ".join(k for k, v in checks.items() if not v)
    return res


def probe_accelerate(out: str) -> int:
    """Run under ``accelerate launch``: build the Accelerator as flashdmd's setup does and write what it is."""
    import torch
    from accelerate import Accelerator
    acc = Accelerator(mixed_precision="bf16" if torch.cuda.is_available() else "no",
                      cpu=not torch.cuda.is_available())
    _write_json(Path(out), {"distributed_type": str(acc.distributed_type).split(".")[-1],
                            "is_fsdp2": bool(getattr(acc, "is_fsdp2", False)), "num_processes": acc.num_processes,
                            "mixed_precision": str(acc.mixed_precision), "device": str(acc.device),
                            "fsdp_version_env": os.environ.get("FSDP_VERSION"),
                            "use_fsdp_env": os.environ.get("ACCELERATE_USE_FSDP")})
    return 0


# ---------------------------------------------------------------------------------------------------
# the parent


class Report:
    def __init__(self, path: Path, state: dict, argv: list[str], selected: list[str]):
        self.path, self.state = path, state
        self.t0 = time.time()
        self.data = {"schema": SCHEMA, "what": "flashdmd GPU check (benchmarks/gpu_check.py)", "mode": state["mode"],
                     "command": " ".join([Path(sys.executable).name] + argv), "started": time.strftime(
                         "%Y-%m-%d %H:%M:%S %Z"), "finished": False, "selected_parts": selected,
                     "budget_s": None, "part_budget_s": state["budgets"],
                     "estimate_s": MODES[state["mode"]]["estimate_s"], "machine": {}, "configs": state["configs"],
                     "parts": {p: {"status": "pending"} for p in selected}, "summary": []}

    def set(self, part: str, res: dict) -> None:
        self.data["parts"][part] = res
        self.save()

    def save(self) -> None:
        parts_dir = Path(self.state["work"]) / "parts"
        for env in sorted(parts_dir.glob("_env_*.json")):
            if not self.data["machine"]:
                self.data["machine"] = _read_json(env) or {}
        cuda = self.state["mode"] == "gpu"
        for part in PEAK_PARTS:
            r = self.data["parts"].get(part)
            if r and r.get("status") == "passed":
                r["plan"] = compare(r["measured"], _read_json(parts_dir / f"plan_{part}.json"), cuda)
        annotate_rows(self.data["parts"], parts_dir, cuda)
        annotate_compile(self.data["parts"])
        self.data["total_seconds"] = round(time.time() - self.t0, 1)
        self.data["summary"] = [summary_line(p, r) for p, r in self.data["parts"].items()]
        _write_json(self.path, self.data)


def annotate_compile(parts: dict) -> None:
    """The compile part beside step_flashdmd (the same config, eager, its own process on the same card): the speed-up
    (eager seconds per generator update / compiled) and the compilation's cost (the compiled run's first cycle less an
    eager update)."""
    r, eager = parts.get("compile") or {}, parts.get("step_flashdmd") or {}
    if r.get("status") != "passed":
        return
    if eager.get("status") != "passed":
        r["vs_eager"] = {"status": "no step_flashdmd figure to compare with"}
        return
    a, b = eager["seconds_per_generator_update"], r["seconds_per_generator_update"]
    r["vs_eager"] = {"speedup": a / b, "eager_seconds_per_generator_update": a}
    if "warmup_cycle_seconds" in r:  # the compiling cycle's excess over an eager update (+ AdamW's lazy states)
        r["vs_eager"]["compile_seconds"] = r["warmup_cycle_seconds"] - a


def annotate_rows(parts: dict, parts_dir: Path, cuda: bool) -> None:
    """Each measured row of the ROWS parts: the plan of its config beside its peak (:func:`compare`), and its ratios
    to the none/none row (offload_sd3's first): seconds per iteration, CUDA peaks, the plan's peak."""
    for part in ROWS:
        for r in (parts.get(part) or {}).get("rows", {}).values():
            if r.get("status") == "passed":
                planned = _read_json(parts_dir / f"plan_{r['config_name']}.json")
                r["plan"] = compare(r["measured"], planned, cuda)
                if planned and planned.get("offload"):
                    r["plan"]["plan_offload"] = planned["offload"]
    ref = (parts.get(REFERENCE_ROW[0]) or {}).get("rows", {}).get(REFERENCE_ROW[1])
    for part in ROWS:
        for r in (parts.get(part) or {}).get("rows", {}).values():
            if r.get("status") != "passed":
                continue
            if not ref or ref.get("status") != "passed":
                r["vs_none"] = {"status": "no none/none row to compare with (offload_sd3's first row)"}
                continue
            vs = {"seconds_per_iteration": r["seconds_per_iteration"] / ref["seconds_per_iteration"],
                  "extra_seconds_per_iteration": r["seconds_per_iteration"] - ref["seconds_per_iteration"],
                  "same_process": r.get("pid") == ref.get("pid")}
            for k in ("peak_allocated_bytes", "peak_reserved_bytes", "device_peak_bytes"):
                a, b = r["measured"].get(k), ref["measured"].get(k)
                vs[k.removesuffix("_bytes")] = a / b if a and b else None
            a, b = r["plan"].get("plan_peak_bytes"), ref.get("plan", {}).get("plan_peak_bytes")
            vs["plan_peak"] = a / b if a and b else None
            if a and b:  # the plan's tensors (its peak less its runtime term): the ratio to set beside peak_allocated
                vs["plan_tensors"] = (a - r["plan"]["plan_runtime_bytes"]) / (b - ref["plan"]["plan_runtime_bytes"])
            r["vs_none"] = vs


def _row_bit(name: str, r: dict) -> str:
    """One row in a summary line: seconds per iteration and the CUDA peak, each with its ratio to none/none, and
    the plan."""
    if r.get("status") != "passed":
        return f"{name} {r.get('status')}" + (f": {r.get('reason') or r.get('error')}"
                                              if r.get("reason") or r.get("error") else "")
    vs, m, pl = r.get("vs_none", {}), r["measured"], r.get("plan", {})
    x = (lambda k: f" ({vs[k]:.2f}x)" if name != "none" and isinstance(vs.get(k), float) else "")
    bit = f"{name} {r['seconds_per_iteration']:.3f} s/it{x('seconds_per_iteration')}"
    if m.get("peak_allocated_bytes") is not None:
        bit += f", peak {_gib(m['peak_allocated_bytes'])} GiB{x('peak_allocated')}"
        on_gpu = r.get("device_bytes_after_setup", {}).get("teacher", {}).get("cuda")
        bit += f", teacher resident {_gib(on_gpu or 0)} GiB"  # on the GPU after set-up: where offloading left it
    if "plan_peak_bytes" in pl:
        bit += f", plan {_gib(pl['plan_peak_bytes'])} GiB"
        if pl.get("within_tolerance") is not None:
            bit += (f" (tensors {pl['plan_tensors_over_max_allocated']:.2f}x, device "
                    f"{pl['plan_over_reserved_plus_outside']:.2f}x" + (")" if pl["within_tolerance"] else ": FLAG)"))
    elif pl.get("status"):
        bit += f", plan: {pl['status']}"
    return bit


def summary_line(part: str, r: dict) -> str:
    st = r.get("status")
    head = f"{part}: {st}" + (f" in {r['seconds']:.0f} s" if isinstance(r.get("seconds"), (int, float)) else "")
    if part in ROWS and r.get("rows"):  # rows measured before a failure or a timeout are shown too
        try:
            first = next((x for x in r["rows"].values() if x.get("status") == "passed"), {})
            where = (f" (TTUR {first['ttur']}, {first['resolution']} px, batch {first['batch_size']}"
                     + ("" if first["measured"].get("peak_allocated_bytes") is not None else "; CPU: no CUDA peak")
                     + ")") if first else ""
            return head + f" -- {part.split('_')[0]} rows{where}: " + "; ".join(
                _row_bit(n, x) for n, x in r["rows"].items()) + (  # a timeout's or crash's error (rows' are above)
                f" -- {r['error']}" if r.get("error") and not r["error"].startswith("rows: ") else "")
        except (KeyError, TypeError) as e:
            return head + f" (summary incomplete: {_one_line(e)})"
    if st not in ("passed",):
        return head + "".join(f" -- {r[k]}" for k in ("error", "reason") if r.get(k))
    try:
        if part == "build":
            bits = [f"{k} reused" if v.get("reused") else f"{k} FAILED" if v.get("error") else
                    f"{k} {v['bytes'] / 1e9:.1f} GB in {v['seconds']:.0f} s" for k, v in r["folders"].items()]
            return head + f" -- on {r['device']} in {r['dtype']}: " + ", ".join(bits)
        if part in PEAK_PARTS:
            m, pl = r["measured"], r.get("plan", {})
            if m.get("peak_allocated_bytes") is None:
                meas = f"no CUDA peak (CPU); peak RSS {_gib(m.get('ru_maxrss_bytes'))} GiB"
            else:
                meas = (f"CUDA peak {_gib(m['peak_allocated_bytes'])} GiB allocated, {_gib(m['peak_reserved_bytes'])} "
                        f"reserved + {_gib(m['outside_torch_bytes'])} outside torch")
            if "plan_peak_bytes" not in pl:
                return head + f" -- {meas}; plan: {pl.get('status')}"
            if pl.get("within_tolerance") is None:
                return head + (f" -- {meas}; plan (cpu) {_gib(pl['plan_peak_bytes'])} GiB, "
                               f"{pl['plan_over_rss']:.2f}x RSS")
            verdict = "within 15 %" if pl["within_tolerance"] else "FLAG: " + pl["flag"]
            return head + (f" -- {meas}; plan {_gib(pl['plan_peak_bytes'])} GiB (tensors "
                           f"{pl['plan_tensors_over_max_allocated']:.2f}x, device "
                           f"{pl['plan_over_reserved_plus_outside']:.2f}x): {verdict}")
        if part == "step_heads":
            return head + " -- text-conditioned pooled head: " + "; ".join(
                f"{n} {x['seconds_per_generator_update']:.2f} s per generator update (TTUR {x['ttur']}"
                + (f", {x['relative_to_step_dmd2']:.2f}x step_dmd2" if "relative_to_step_dmd2" in x else "") + ")"
                for n, x in r["rows"].items())
        if part in ("step_flashdmd", "step_dmd2", "compile"):
            vs = r.get("vs_eager", {})
            extra = "" if part != "compile" else (
                f"; {r['backend']}, {vs['speedup']:.2f}x step_flashdmd's eager, compiling "
                f"~{vs.get('compile_seconds', 0):.0f} s, {r['dynamo']['unique_graphs']} graphs, "
                f"{r['dynamo']['graph_breaks']} graph breaks"
                if "speedup" in vs else f"; {r['backend']}, {vs.get('status', '')}")
            return head + (f" -- {r['seconds_per_generator_update']:.3f} s per generator update (median of "
                           f"{len(r['updates_seconds'])}, TTUR {r['ttur']}, {r['resolution']} px, batch "
                           f"{r['batch_size']}){extra}")
        if part == "images_per_second":
            return head + (f" -- student {r['student']['steps']} steps {r['student']['images_per_second']:.3f} img/s, "
                           f"teacher {r['teacher']['steps']} steps CFG {r['teacher']['images_per_second']:.3f} img/s "
                           f"({r['speedup']:.1f}x), {r['resolution']} px, batch {r['batch_size']}")
        if part == "fsdp2_resume":
            a = r.get("accelerate", {})
            return head + (f" -- accelerate: {a.get('distributed_type')} (FSDP2 {r['fsdp2_enabled']}), "
                           f"{a.get('num_processes')} process; 2 updates + checkpoint {r['run']['seconds']:.0f} s, "
                           f"resume to 3 {r['resume']['seconds']:.0f} s")
    except (KeyError, TypeError) as e:
        return head + f" (summary incomplete: {_one_line(e)})"
    return head


def parse_parts(text: str | None) -> list[str]:
    if not text:
        return list(PARTS)
    names = [p.strip() for p in text.replace(" ", ",").split(",") if p.strip()]
    bad = [p for p in names if p not in PARTS]
    if bad:
        raise SystemExit(f"--parts: unknown {bad}; choose from {', '.join(PARTS)}")
    return [p for p in PARTS if p in names or p == "build"]  # build always: it reuses folders already there


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", default=None, help="write the results here (rewritten after every part)")
    p.add_argument("--smoke", action="store_true", help="the same code on the CPU with tiny models")
    p.add_argument("--parts", default=None, help=f"comma-separated subset of: {', '.join(PARTS)} (build always "
                   "runs, reusing folders already in --work)")
    p.add_argument("--work", default=None, help="folders, logs, run folders (default /tmp/flashdmd-gpu-check[-smoke])")
    p.add_argument("--part-budget", action="append", default=[], metavar="PART=SECONDS",
                   help="change one part's budget (its hard limit; repeatable)")
    p.add_argument("--budget-s", type=float, default=None, help="no part starts after this many seconds (default: "
                   "450 on the GPU, 240 for --smoke)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-parts", default="", help=argparse.SUPPRESS)
    p.add_argument("--state", default=None, help=argparse.SUPPRESS)
    p.add_argument("--probe-accelerate", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.probe_accelerate:
        return probe_accelerate(a.probe_accelerate)
    if a.child:
        return child_main(a.child, [x for x in a.child_parts.split(",") if x], Path(a.state))

    selected = parse_parts(a.parts)
    if not a.smoke:  # a child's check: this process stays without torch and without a CUDA context
        probe = subprocess.run([sys.executable, "-c", "import torch, sys; sys.exit(0 if torch.cuda.is_available() "
                                "else 3)"], capture_output=True, text=True)
        if probe.returncode != 0:
            print("error: no CUDA device here (or torch cannot be imported: "
                  f"{(probe.stderr.strip().splitlines() or ['no CUDA'])[-1]}); on a CPU run --smoke", flush=True)
            return 2
    state = settings(a)
    state["selected"] = selected
    for item in a.part_budget:
        name, _, secs = item.partition("=")
        if name not in PARTS or not secs.replace(".", "", 1).isdigit():
            raise SystemExit(f"--part-budget {item!r}: expected PART=SECONDS with PART one of {', '.join(PARTS)}")
        state["budgets"][name] = float(secs)
    mode = state["mode"]
    budget = a.budget_s or MODES[mode]["budget_s"]
    work = Path(state["work"])
    parts_dir, logs = work / "parts", work / "logs"
    for stale in list(parts_dir.glob("*")) if parts_dir.is_dir() else []:
        stale.unlink()
    parts_dir.mkdir(parents=True, exist_ok=True)
    logs.mkdir(parents=True, exist_ok=True)
    state_path = work / "state.json"
    _write_json(state_path, state)
    out = Path(a.json or work / "gpu_check.json")
    rep = Report(out, state, sys.argv, selected)
    rep.data["budget_s"] = budget
    rep.save()
    t_start = time.time()
    print(f"gpu_check ({mode}): parts {', '.join(selected)}; budget {budget:.0f} s; work {work}; JSON {out}",
          flush=True)
    me = str(Path(__file__).resolve())
    plan_proc = None

    def start_plans() -> None:
        nonlocal plan_proc
        wanted = [x for x in (*PEAK_PARTS, *ROWS) if x in selected]
        if not wanted:
            return
        fh = open(logs / "plan.log", "w")
        plan_proc = subprocess.Popen([sys.executable, me, "--child", "plan", "--child-parts", ",".join(wanted),
                                      "--state", str(state_path)], stdout=fh, stderr=subprocess.STDOUT,
                                     env=_child_env(state, threads=state["settings"]["plan_threads"], cuda=False),
                                     cwd=REPO, start_new_session=True)

    for group, members in (SMOKE_GROUPS if mode == "smoke" else GROUPS).items():
        todo = [x for x in members if x in selected]
        if not todo:
            continue
        if group == "compile":
            t0 = time.time()
            if not compile_offered():
                rep.set("compile", {"status": "not offered", "seconds": round(time.time() - t0, 1),
                                    "reason": "flashdmd has no torch.compile option (no model_compile field in "
                                              "DistillConfig, no torch.compile call in flashdmd/)"})
                print(summary_line("compile", rep.data["parts"]["compile"]), flush=True)
                continue
        if group == "fsdp2":
            left = budget - (time.time() - t_start)
            if left <= 0:
                rep.set("fsdp2_resume", {"status": "skipped",
                                         "reason": f"the run's budget of {budget:.0f} s was spent"})
                continue
            t0 = time.time()
            rep.set("fsdp2_resume", {"status": "running"})
            try:
                res = fsdp2_resume(state, t0 + min(state["budgets"]["fsdp2_resume"], left), logs / "fsdp2.log")
            except Exception as e:
                res = {"status": "failed", "error": _one_line(e), "traceback": traceback.format_exc().splitlines()[-8:]}
            res["seconds"] = round(time.time() - t0, 1)
            rep.set("fsdp2_resume", res)
            print(summary_line("fsdp2_resume", res), flush=True)
            continue
        while todo:
            left = budget - (time.time() - t_start)
            if left <= 0:
                for x in todo:
                    rep.set(x, {"status": "skipped", "reason": f"the run's budget of {budget:.0f} s was spent"})
                break
            grace = state["settings"]["child_start_s"]  # the child's own start: imports, CUDA
            limit = min(sum(state["budgets"][x] for x in todo), left) + grace
            for x in todo:
                rep.data["parts"][x] = {"status": "running"}
            rep.save()
            cmd = [sys.executable, me, "--child", group, "--child-parts", ",".join(todo), "--state", str(state_path)]
            overrun = {}

            def watch(todo=todo, overrun=overrun) -> bool:
                """While the child runs: its finished parts into the JSON at once; True (kill it) when the part
                it is in has overrun its own budget."""
                done = []
                for x in todo:
                    if rep.data["parts"][x].get("status") == "running" and (parts_dir / f"{x}.json").exists():
                        rep.data["parts"][x] = _read_json(parts_dir / f"{x}.json") or rep.data["parts"][x]
                        done.append(x)
                rep.save()  # first: it sets the plans and the rows' ratios beside the measurements
                for x in done:
                    print(summary_line(x, rep.data["parts"][x]), flush=True)
                for x in todo:
                    started = parts_dir / f"{x}.started"
                    if started.exists() and not (parts_dir / f"{x}.json").exists():
                        if time.time() - float(started.read_text() or 0) > state["budgets"][x] + 5:
                            overrun[x] = True
                            return True
                return False
            code, secs = _run_logged(cmd, logs / f"{group}.log", _child_env(state), limit, poll=watch)
            if group == "build" and plan_proc is None:
                start_plans()
            rest, printed = [], [x for x in todo if rep.data["parts"][x].get("status") != "running"]
            for x in todo:
                res = _read_json(parts_dir / f"{x}.json")
                started = parts_dir / f"{x}.started"
                if res is not None:
                    rep.set(x, res)
                elif started.exists():
                    partial = _read_json(parts_dir / f"{x}.partial.json") or {}
                    why = (f"timed out (part budget {state['budgets'][x]:.0f} s)" if code is None
                           else f"its process exited with code {code} during this part")
                    rep.set(x, {**partial, "status": "timeout" if code is None else "failed", "error": why,
                                "seconds": round(time.time() - float(started.read_text() or 0), 1),
                                "log_tail": _tail(logs / f"{group}.log")})
                else:
                    rest.append(x)
            for x in todo:
                if x not in rest and x not in printed:
                    print(summary_line(x, rep.data["parts"][x]), flush=True)
            if rest and len(rest) == len(todo):  # the child never got to a part: retrying would do the same
                for x in rest:
                    rep.set(x, {"status": "failed", "error": f"not reached: the {group} process "
                                + ("timed out" if code is None else f"exited with code {code}") + " before it",
                                "log_tail": _tail(logs / f"{group}.log")})
                    print(summary_line(x, rep.data["parts"][x]), flush=True)
                rest = []
            todo = rest  # parts after a timed-out or crashed one: a fresh process

    if plan_proc is not None:  # the plans ran beside the GPU work; wait for them within the budget
        left = max(budget - (time.time() - t_start), 5)
        try:
            plan_proc.wait(timeout=left)
        except subprocess.TimeoutExpired:
            os.killpg(plan_proc.pid, signal.SIGKILL)
            plan_proc.wait()
    rep.data["finished"] = True
    rep.save()
    print("-" * 100)
    for line in rep.data["summary"]:
        print(line)
    n_ok = sum(r.get("status") in OK for r in rep.data["parts"].values())
    flags = [p for p in PEAK_PARTS if rep.data["parts"].get(p, {}).get("plan", {}).get("within_tolerance") is False]
    flags += [f"{p} {n}" for p in ROWS for n, x in rep.data["parts"].get(p, {}).get("rows", {}).items()
              if x.get("plan", {}).get("within_tolerance") is False]
    print(f"gpu_check ({mode}): {n_ok}/{len(rep.data['parts'])} parts passed or not offered"
          + (f"; plan off by > 15 % in {', '.join(flags)}" if flags else "")
          + f"; {rep.data['total_seconds']:.0f} s; JSON -> {out}", flush=True)
    return 0 if n_ok == len(rep.data["parts"]) else 1


if __name__ == "__main__":
    sys.exit(main())
