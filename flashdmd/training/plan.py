"""``flashdmd plan``: the peak memory per device of one Stage-1 iteration and one Stage-2 RL update of a configured
run, without loading a weight.

How it counts (docs/ARCHITECTURE.md, "Memory"; the parts live in :mod:`flashdmd.training.memory`):

* **The run** is the run's own set-up on torch's ``meta`` device (memory/meta.py): the teacher's family loaded from
  the model folder's config files alone, the roles built by :func:`flashdmd.training.roles.build_roles` itself -- in
  the dtypes the run gives them, with its LoRA adapters, its sharing (under LoRA the student and the fake score share
  the teacher's base), its gradient checkpointing and its discriminator (text-conditioned head included) -- and, for
  Stage 2, the reference and reward model :func:`flashdmd.training.stage2.setup_stage2` builds.
* **Weights, gradients, optimiser state** are counted exactly (memory/accounting.py): distinct tensor storages are
  attributed to the first role that holds them (teacher, student, fake score, text encoders, VAE, discriminator,
  Stage-2 reference, reward model). Gradients: one per trainable tensor of the roles a phase updates (plus the
  ones its backward reaches: DMD2's generator loss reaches the fake score's weights). AdamW: two states per
  trainable tensor, in its dtype.
* **Activations** are traced (memory/trace.py, memory/phases.py): the run's own phase losses
  (:func:`flashdmd.training.steps.rollout`, ``critic_loss``, ``discriminator_loss``,
  :func:`flashdmd.training.stage2.rl_loss`) and their backward run on meta tensors at the configured batch and
  resolution under a dispatch mode that counts the live bytes of every tensor the step creates, through the backward
  (gradient checkpointing recomputation included) -- a full-size SDXL generator step traces in seconds. Attention is
  counted as the fused kernels that CUDA and CPU use hold it (query, key, value, output and the log-sum-exp saved
  for the backward), not as the N x N matrix that the meta device's math fallback would materialise.
* **Phases** follow the loop: generator (backward simulation, the teacher's CFG forward, the fake score, the
  low-noise branch through the VAE decoder and the Pixel-GAN), fake score (DMD2: with its latent classifier on
  encoded real images), discriminator; Stage 2: backward simulation, candidates, reward model, reference, the DPO
  backward. Each phase's peak is the persistent memory (weights and optimiser states) plus the phase's traced peak
  or its optimiser step's temporaries; the run's peak is the largest.
* **Parallelism**: one process; DDP over N (adds accelerate's default gradient buckets, one copy of every
  trainable tensor); FSDP2 over N (the student and the fake score, with every tensor they hold, sharded N ways
  along with their gradients and optimiser states; the gathered root unit and two wrapped blocks in flight;
  the teacher, VAE and text encoders replicated as configs/accelerate/fsdp2_8gpu.yaml does).
* **Offloading** (``model_offload`` frozen / base; memory/residency.py): while each phase is traced, the offloaded
  parts whose tensors its ops read and its calls of the streamed base's blocks (recomputations included) are
  recorded; a phase then holds only those parts (and, for base, the base's non-block rest and its 2 or 3 largest
  blocks), the prompts' encoding is a phase of its own, the text cache's encoding pass holds the text encoders alone,
  and the bytes copied host -> device per Stage-1 iteration and per RL update are given with their time at an assumed
  bandwidth (``--h2d-gbps``). FSDP2 is not planned with offloading (the run does not take both).
* **Runtime**: on CUDA a fixed 1 GiB for the CUDA context and library workspaces; on the CPU the resident size of
  this process before it builds anything (the interpreter with torch, diffusers and transformers imported).

benchmarks/plan_check.py checks the estimate against a real run's peak resident memory; tests/test_plan.py checks
the split against the tensors a real tiny run allocates.
"""
from __future__ import annotations

import dataclasses
import json
import re
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn

from flashdmd import FlashDMDError, io
from flashdmd.training.config import DistillConfig
from flashdmd.training.memory.accounting import (CARDS_GB, CUDA_RUNTIME_BYTES, FIT_HEADROOM, GiB,  # noqa: F401
                                                 ROLE_ORDER, adamw_state_bytes, headline, per_device,
                                                 stored_weight_bytes, table, trainable_bytes, weights_by_role)
from flashdmd.training.memory.meta import MetaJudge, dtypes, meta_family, meta_roles, meta_run, role_modules  # noqa: F401
from flashdmd.training.memory.phases import trace_stage1, trace_stage2
from flashdmd.training.memory.residency import H2D_GBPS, Residency, transfer_line, transfers
from flashdmd.training.memory.suggest import describe, suggest
from flashdmd.training.roles import check_quant, sharded_quant
from flashdmd.training.memory.trace import LiveBytes, fused_attention, trace_phase  # noqa: F401
from flashdmd.training.stage2 import setup_stage2


@dataclasses.dataclass
class Settings:
    processes: int = 1
    device: str = "cuda"
    device_memory: int | None = None
    strategy: str = "auto"
    h2d_gbps: float = H2D_GBPS  # model_offload's transfers: an assumed host-to-device bandwidth (residency.py)


def parse_bytes(text: str) -> int:
    """'24GB' / '24 GiB' / '80G' / '24000MB' -> bytes (GB and G mean GiB here, as card sizes are quoted)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(i?B)?\s*", str(text), re.IGNORECASE)
    if not m:
        raise FlashDMDError(f"--device-memory {text!r}: give a size like 24GB, 80GiB or 24000MB")
    scale = {"": 1, "K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}[m.group(2).upper()]
    return int(float(m.group(1)) * scale)


def _rss_bytes() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def plan(cfg, settings: Settings | None = None, log=None) -> dict:
    """The memory plan of ``cfg`` (see the module docstring); a JSON-ready dict."""
    s = settings or Settings()
    log = log or (lambda line: None)
    if s.device not in ("cuda", "cpu"):
        raise FlashDMDError(f"--device {s.device!r}: cuda or cpu")
    if s.processes < 1:
        raise FlashDMDError("--processes must be >= 1")
    if s.strategy == "fsdp2" and cfg.model_offload != "none":
        raise FlashDMDError(f"--strategy fsdp2: model_offload {cfg.model_offload} does not run under FSDP2; plan "
                            "single or ddp, or set model_offload none")
    runtime = CUDA_RUNTIME_BYTES if s.device == "cuda" else _rss_bytes()
    t0 = time.time()
    run = meta_run(cfg, s.device)
    family, b, res = run.setup.family, cfg.run_batch_size, run.setup.resolution
    roles = role_modules(run)
    offload = Residency(cfg.model_offload, roles, family) if cfg.model_offload != "none" else None
    tracker = LiveBytes("meta")
    with fused_attention(), tracker, torch.no_grad(), offload.phase() if offload else nullcontext() as encode_use:
        cond = family.encode_prompts(["a prompt"] * b, res, res)
        uncond = family.null_conditioning(b, res, res)
    encode_peak = tracker.peak
    setup = None
    if cfg.model_text_cache:  # the encoders are gone; the cached embeddings are a batch's worth
        setup = _setup_stage(roles, encode_peak, offload)
        roles["text_encoders"] = nn.ModuleList()
        encode_peak, encode_use = 0, None
        if offload:
            offload.update(roles)
    stage1 = trace_stage1(run, roles, cond, uncond, encode_peak, s.device, offload, encode_use)
    stage1["setup"] = setup
    log(f"stage 1 traced in {time.time() - t0:.1f} s")
    stage2 = None
    if cfg.rl_enabled:
        judge = MetaJudge(cfg) if cfg.rl_judge is not None else None
        setup_stage2(run, judge=judge)
        if judge is not None:
            log(f"stage 2: {judge.untraced} are not traced (only its weights are counted)")
        roles2 = dict(roles, **{k: v for k, v in role_modules(run, judge).items() if k in ("reference", "reward")})
        stage2 = trace_stage2(run, roles2, stage1, cond, encode_peak, s.device, offload, encode_use)
        log(f"stage 2 traced in {time.time() - t0:.1f} s")
    result = _result(cfg, s, run, roles, stage1, stage2, runtime, t0)
    if offload:
        result["transfers"] = transfers(offload, stage1, stage2, cfg.fake_score_ttur, s.h2d_gbps)
    return result


def _setup_stage(roles: dict, encode_peak: int, offload) -> dict:
    """The text cache's encoding pass (setup.cache_text, before the roles exist): the family's teacher, text encoders
    and VAE all on the device -- or under model_offload the text encoders alone (the run encodes before the denoiser
    moves to the device) -- and the encoding's traced peak."""
    if offload:
        return {"weights": weights_by_role({"text_encoders": roles["text_encoders"]}, ("text_encoders",)),
                "traced_peak": encode_peak, "note": "the text cache's encoding pass (model_offload: the text encoders "
                                                    "alone, before the denoiser is on the device)"}
    return {"weights": weights_by_role({r: roles[r] for r in ("teacher", "text_encoders", "vae")}),
            "traced_peak": encode_peak}


def _result(cfg, s: Settings, run, roles: dict, stage1: dict, stage2: dict | None, runtime: int, t0: float) -> dict:
    """The plan's JSON: every strategy's per-device bytes, the chosen one's headline numbers and the setting."""
    trainable = {"student": roles["student"], "fake_score": roles["fake_score"], "disc": roles["disc"]}
    strategies = {"single": per_device(stage1, stage2, roles, trainable, "single", 1, runtime)}
    if s.processes > 1:
        strategies["ddp"] = per_device(stage1, stage2, roles, trainable, "ddp", s.processes, runtime)
        check_quant(cfg, "meta", sharded=s.strategy == "fsdp2")  # FSDP2 with a quantised base: one line
        if not sharded_quant(cfg) and cfg.model_offload == "none":  # not a strategy this run can take
            strategies["fsdp2"] = per_device(stage1, stage2, roles, trainable, "fsdp2", s.processes, runtime)
    chosen = s.strategy if s.strategy != "auto" else ("single" if s.processes == 1 else "ddp")
    if chosen not in strategies:
        raise FlashDMDError(f"--strategy {chosen}: with --processes {s.processes} choose from {sorted(strategies)}")
    peak = strategies[chosen]["peak_bytes_per_device"]
    family = run.setup.family
    return {
        "peak_bytes_per_device": peak,
        "peak_gib_per_device": round(peak / GiB, 2),
        "strategy": chosen,
        "processes": s.processes,
        "device": s.device,
        "fits": None if s.device_memory is None else peak <= FIT_HEADROOM * s.device_memory,
        "device_memory_bytes": s.device_memory,
        "fits_cards_gb": {str(c): peak <= FIT_HEADROOM * c * GiB for c in CARDS_GB},
        "fit_headroom": FIT_HEADROOM,
        "split": strategies[chosen]["split"],
        "peak_phase": strategies[chosen]["peak_phase"],
        "strategies": strategies,
        "setting": {"teacher": str(family.path), "family": family.name, "method": cfg.method,
                    "resolution": run.setup.resolution, "batch_size": cfg.run_batch_size,
                    "lora_rank": cfg.model_lora_rank, "shared_base": cfg.model_lora_rank > 0 and cfg.model_shared_base,
                    "trainable_dtype": str(family.dtype).replace("torch.", ""),
                    "frozen_dtype": str(family.frozen_dtype).replace("torch.", ""),
                    "gradient_checkpointing": cfg.model_gradient_checkpointing,
                    "text_cache": bool(cfg.model_text_cache), "disc_kind": cfg.disc_kind, "stage2": cfg.rl_enabled,
                    "offload": cfg.model_offload},
        "parameters": {r: sum(p.numel() for p in m.parameters()) for r, m in roles.items() if m is not None},
        "seconds": round(time.time() - t0, 1),
        "detail": {"stage1": stage1, "stage2": stage2},  # strategy-independent counts per phase (single process)
    }


# ---------------------------------------------------------------------------------------------------
# command line


def add_arguments(p) -> None:
    p.add_argument("--config", default=None, help="YAML preset (as for distill)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    p.add_argument("--processes", type=int, default=1, help="processes (GPUs) the run uses (default 1)")
    p.add_argument("--strategy", default="auto", choices=("auto", "single", "ddp", "fsdp2"),
                   help="which plan the headline and peak_bytes_per_device give: auto = single for 1 process, "
                        "ddp for more; every strategy is in the JSON")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                   help="where the run will train: cuda (model_frozen_dtype auto -> bfloat16, 1 GiB runtime) or cpu "
                        "(auto -> model_dtype; this process's own resident size as the runtime floor)")
    p.add_argument("--device-memory", default=None, metavar="SIZE", help="memory per device, e.g. 24GB, 80GiB: say "
                   "whether the run fits (its peak under 95 %% of it: fragmentation and workspaces are not planned)")
    p.add_argument("--h2d-gbps", type=float, default=H2D_GBPS, metavar="GB/S", help="with model_offload: the "
                   "host-to-device bandwidth the transfer time per iteration is given at (default %(default)g: an "
                   "assumption, PCIe 4.0 x16 from pinned memory; a bound, since prefetch overlaps it with compute)")
    p.add_argument("--json", default=None, metavar="OUT", help="write the full plan here")
    p.add_argument("--suggest", action="store_true", help="with --device-memory: if the run does not fit, the "
                   "cheapest settings that do, as --set overrides (a cumulative ladder: text cache, gradient "
                   "checkpointing, int8 text encoders, offloaded frozen parts, int8 Pixel-GAN backbone, int8 frozen "
                   "base, the base streamed block by block, smaller batch, and last a smaller LoRA rank), or by how "
                   "much the best of them still misses")


def run(args) -> None:
    cfg = DistillConfig.from_sources(args.config, args.set)
    memory = parse_bytes(args.device_memory) if args.device_memory else None
    if args.h2d_gbps <= 0:
        raise FlashDMDError(f"--h2d-gbps {args.h2d_gbps:g}: give a bandwidth above 0 (GB/s)")
    settings = Settings(processes=args.processes, device=args.device, device_memory=memory, strategy=args.strategy,
                        h2d_gbps=args.h2d_gbps)
    if args.suggest:
        record = suggest(cfg, settings, plan)
        record.pop("plan")  # the suggested settings' plan; the JSON keeps the run as configured, with the record
        result = dict(record.pop("configured"), suggestion=record)
    else:
        result = plan(cfg, settings)
    print(headline(result))
    if transfer_line(result):
        print(transfer_line(result))
    print(table(result))
    if args.suggest:
        print(describe(result["suggestion"]))
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        io.atomic_write_text(out, json.dumps(result, indent=2) + "\n")
    if args.suggest and not result["suggestion"]["fits"]:
        raise FlashDMDError(f"nothing flashdmd has fits {args.device_memory} per device: the best settings miss by "
                            f"{result['suggestion']['miss_bytes'] / GiB:.1f} GiB (see the suggestion above)")
    if result["fits"] is False and not args.suggest:
        raise FlashDMDError(f"the run does not fit {args.device_memory} per device (plan: "
                            f"{result['peak_bytes_per_device'] / GiB:.1f} GiB); see the split above")
