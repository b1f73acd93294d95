"""The byte accounting: weights, gradients and AdamW states per role, counted exactly from the modules; a stage's
phases combined with them into the peak per device of one process, DDP or FSDP2 (:func:`per_device`)."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from flashdmd.networks.quant import inner_tensors

GiB = 2 ** 30
CUDA_RUNTIME_BYTES = 1 * GiB
CARDS_GB = (24, 48, 80, 141)
# a plan "fits" a card when its peak stays under this share of it: the caching allocator's fragmentation and
# kernels' workspaces are not in the plan (a margin, not a measurement; no GPU has checked it yet)
FIT_HEADROOM = 0.95
# configs/accelerate/fsdp2_8gpu.yaml's wrap classes: SDXL's, SD3's, FLUX.1's and FLUX.2's double- and single-stream
# blocks, Qwen-Image's, Z-Image's (its refiners' and main layers')
FSDP_BLOCKS = ("BasicTransformerBlock", "JointTransformerBlock", "FluxTransformerBlock", "FluxSingleTransformerBlock",
               "Flux2TransformerBlock", "Flux2SingleTransformerBlock", "QwenImageTransformerBlock",
               "ZImageTransformerBlock")
ROLE_ORDER = ("teacher", "student", "fake_score", "text_encoders", "vae", "disc", "reference", "reward")


def nbytes(t: torch.Tensor) -> int:
    """Bytes of ``t``'s storage; a quantised weight's: those of its data and scales (flashdmd.networks.quant)."""
    return sum(x.untyped_storage().nbytes() for x in inner_tensors(t))


def weights_by_role(roles: dict, order: tuple = ROLE_ORDER) -> dict[str, int]:
    """Distinct parameter and buffer storages, each attributed to the first role (``order``) holding it."""
    seen, out = set(), {}
    for role in order:
        module = roles.get(role)
        total = 0
        tensors = list(module.parameters()) + list(module.buffers()) if module is not None else []
        for t in (x for t in tensors for x in inner_tensors(t)):
            key = t.untyped_storage()._cdata
            if key not in seen:
                seen.add(key)
                total += nbytes(t)
        out[role] = total
    return out


def trainable_bytes(module: nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() * p.element_size() for p in module.parameters() if p.requires_grad)


def _largest_trainable(module: nn.Module | None) -> int:
    sizes = [p.numel() * p.element_size() for p in module.parameters() if p.requires_grad] if module is not None else []
    return max(sizes, default=0)


def adamw_state_bytes(module: nn.Module | None, device: str) -> int:
    """AdamW's state: exp_avg and exp_avg_sq like each trainable tensor; its ``step`` is a float32 scalar tensor
    on the CPU (not in device memory: neither capturable nor fused)."""
    if module is None:
        return 0
    params = [p for p in module.parameters() if p.requires_grad]
    return 2 * trainable_bytes(module) + (4 * len(params) if device == "cpu" else 0)


def optimizer_step_bytes(module: nn.Module | None, device: str) -> int:
    """Temporaries of one AdamW step: the multi-tensor (foreach) path on CUDA makes about one trainable-sized
    temporary; the per-tensor path on the CPU one tensor's."""
    return trainable_bytes(module) if device == "cuda" else _largest_trainable(module)


def stored_weight_bytes(folder: Path) -> int:
    """Bytes of every tensor in a folder's safetensors files, from their headers (nothing loaded)."""
    total = 0
    for f in sorted(folder.rglob("*.safetensors")):
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
        total += sum(v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__")
    return total


def stage(weights, optimizer, phases, encode_peak) -> dict:
    """One stage's strategy-independent counts: weights by role, AdamW states by optimiser, each phase's traced
    peak / gradients / optimiser-step temporaries, the text encoders' forward (:func:`per_device` combines them)."""
    return {"weights": weights, "optimizer": optimizer, "phases": phases, "encode_peak": encode_peak}


def _fsdp_transient(module: nn.Module | None) -> int:
    """Bytes gathered at once under FSDP2 per-block wrapping: the root unit (what no wrapped block holds) plus two
    wrapped blocks (the one computing and the one prefetched)."""
    if module is None:
        return 0
    blocks = [m for m in module.modules() if type(m).__name__ in FSDP_BLOCKS]
    in_blocks = {id(p) for blk in blocks for p in blk.parameters()}
    root = sum(nbytes(p) for p in module.parameters() if id(p) not in in_blocks)
    sizes = sorted((sum(nbytes(p) for p in blk.parameters()) for blk in blocks), reverse=True)
    return root + sum(sizes[:2])


def _held(st: dict, roles: dict, trainable: dict, strategy: str, n: int) -> tuple[dict, dict, int, str]:
    """(weights by role, optimiser states, extra bytes, a note) of one device under ``strategy``."""
    weights, optimizer = dict(st["weights"]), dict(st["optimizer"])
    if strategy == "ddp":
        extra = sum(trainable_bytes(m) for m in trainable.values())  # gradient buckets (gradient_as_bucket_view off)
        return weights, optimizer, extra, "DDP gradient buckets: one copy of every trainable tensor"
    if strategy != "fsdp2":
        return weights, optimizer, 0, ""
    for r in ("student", "fake_score"):
        held = sum(nbytes(p) for p in roles[r].parameters())  # sharded copies of every tensor they hold
        weights[r] = held // n
    for r in optimizer:
        optimizer[r] //= n
    extra = max(_fsdp_transient(roles["student"]), _fsdp_transient(roles["fake_score"]))
    return weights, optimizer, extra, ("FSDP2: student and fake score sharded (all tensors they hold, so under LoRA "
                                       "the teacher keeps its own full base next to 2/N of it), gradients and AdamW "
                                       "states 1/N; gathered root unit + 2 blocks")


def _split(st: dict, worst: str, total: int, weights: dict, optimizer: dict, extra: int, runtime: int,
           divide) -> dict:
    """The per-role split at the stage's peak (phase ``worst``, ``total`` bytes)."""
    p = st["phases"][worst]
    grads = divide(p["gradients"])
    split = {r: {"weights": weights.get(r, 0), "gradients": 0, "optimizer": optimizer.get(r, 0), "activations": 0}
             for r in weights}
    if "rl" in optimizer:
        split["student"]["optimizer"] += optimizer["rl"]
    owner = p["roles"][0] if p["roles"][0] in split else "student"
    split[owner]["gradients"] = grads
    transient = total - sum(weights.values()) - sum(optimizer.values()) - extra - runtime - grads
    act = max(p["traced_peak"] - p["gradients"], 0)
    if act >= transient:  # the traced forward / backward decides the phase's peak
        split[owner]["activations"] = transient
    else:  # the optimiser step's temporaries (or the text encoders' forward) do
        split["transient"] = {"weights": 0, "gradients": 0, "optimizer": 0, "activations": 0, "other": transient}
    split["runtime"] = {"weights": 0, "gradients": 0, "optimizer": 0, "activations": 0, "other": runtime + extra}
    return split


def per_device(stage1, stage2, roles, trainable, strategy, n, runtime) -> dict:
    """Per-device bytes of each stage under ``strategy`` over ``n`` processes, with the per-role split at the peak."""
    out = {"stages": {}}

    def divide(b: int) -> int:  # FSDP2 shards gradients and the optimiser step's temporaries N ways
        return b // n if strategy == "fsdp2" else b
    for label, st in (("stage1", stage1), ("stage2", stage2)):
        if st is None:
            continue
        weights, optimizer, extra, note = _held(st, roles, trainable, strategy, n)
        phases = {}
        for name, p in st["phases"].items():
            act = max(p["traced_peak"] - p["gradients"], 0)
            grads, step = divide(p["gradients"]), divide(p["optimizer_step"])
            # model_offload: the phase's own resident weights, the encoding a phase of its own (residency.py)
            held, encode = (p["resident"], 0) if "resident" in p else (weights, st["encode_peak"])
            phases[name] = sum(held.values()) + sum(optimizer.values()) + extra + runtime + max(
                act + grads, grads + step, encode)
        worst = max(phases, key=phases.get)
        held = st["phases"][worst].get("resident", weights)
        out["stages"][label] = {"peak_bytes": phases[worst], "peak_phase": worst, "per_phase": phases,
                                "split": _split(st, worst, phases[worst], held, optimizer, extra, runtime, divide),
                                "note": note}
    setup = stage1.get("setup")
    if setup is not None:  # the text cache's encoding pass, before any trainable tensor exists: nothing is sharded
        total = sum(setup["weights"].values()) + runtime + setup["traced_peak"]
        split = {r: {"weights": b, "gradients": 0, "optimizer": 0, "activations": 0}
                 for r, b in setup["weights"].items()}
        split["text_encoders"]["activations"] = setup["traced_peak"]
        split["runtime"] = {"weights": 0, "gradients": 0, "optimizer": 0, "activations": 0, "other": runtime}
        note = setup.get("note", "the text cache's encoding pass (all frozen parts loaded)")
        out["stages"]["setup"] = {"peak_bytes": total, "peak_phase": "text_cache", "per_phase": {"text_cache": total},
                                  "split": split, "note": note}
    worst_stage = max(out["stages"], key=lambda k: out["stages"][k]["peak_bytes"])
    out["peak_bytes_per_device"] = out["stages"][worst_stage]["peak_bytes"]
    out["peak_phase"] = f"{worst_stage}/{out['stages'][worst_stage]['peak_phase']}"
    out["split"] = out["stages"][worst_stage]["split"]
    return out


def headline(result: dict) -> str:
    """One line for `distill`'s start and `plan`'s output."""
    split = result["split"]
    parts = {k: sum(v[k] for v in split.values() if k in v)
             for k in ("weights", "gradients", "optimizer", "activations", "other")}
    fits = ""
    if result.get("fits") is not None:
        fits = f"; fits {result['device_memory_bytes'] / GiB:.0f} GiB: {'yes' if result['fits'] else 'NO'}"
    cards = [c for c, ok in result["fits_cards_gb"].items() if ok]
    return (f"memory plan ({result['strategy']}, {result['processes']} process(es), {result['device']}): peak "
            f"{result['peak_bytes_per_device'] / GiB:.1f} GiB per device at {result['peak_phase']} -- weights "
            f"{parts['weights'] / GiB:.1f}, gradients {parts['gradients'] / GiB:.1f}, optimiser "
            f"{parts['optimizer'] / GiB:.1f}, activations {parts['activations'] / GiB:.1f}, runtime and temporaries "
            f"{parts['other'] / GiB:.1f} GiB{fits}; fits cards "
            f"of {', '.join(cards) + ' GB' if cards else 'none of 24/48/80/141 GB'}")


def table(result: dict) -> str:
    """The per-role split at the peak, in GiB."""
    rows = ["role            weights  gradients  optimiser  activations  other"]
    for role, v in result["split"].items():
        vals = [v.get(k, 0) / GiB for k in ("weights", "gradients", "optimizer", "activations", "other")]
        if any(vals):
            rows.append(f"{role:<15} " + "  ".join(f"{x:>9.2f}" for x in vals))
    return "\n".join(rows)
