"""``flashdmd plan --suggest``: the cheapest settings that fit a given ``--device-memory``.

The search plans the configuration as given and, if it does not fit, walks a fixed ladder of settings in order of
what they cost the run, each rung added to the ones before it (cumulative, cheapest first), planning every step
(the planner runs on the meta device: seconds at full size). The first combination that fits is the suggestion,
printed as the exact ``--set`` overrides (less any earlier rung it does not need: each is planned without, most
expensive first); when none fits, the best (last) one says by how much it still misses.

The ladder (a rung that changes nothing, or that the configuration cannot take, is passed over):

1. ``model_text_cache=true`` -- the same numbers (the prompts are encoded once at start and the encoders freed).
2. ``model_gradient_checkpointing=true`` -- the same numbers; about a third more compute per step.
3. ``model_text_encoder_quant=int8`` -- the prompt embeddings move by int8's weight round-off; only the text
   encoders' (or the text cache's encoding pass's) bytes.
4. ``model_offload=frozen`` -- the same numbers; the text encoders, VAE, Pixel-GAN backbone and reward model wait on
   the CPU and are copied in for the phases that use them (the plan gives the bytes per iteration), and the text
   cache's encoding pass holds the text encoders without the denoiser.
5. ``disc_backbone_quant=int8`` -- the Pixel-GAN's frozen feature network: a loss term's features, not the student.
6. ``model_frozen_quant=int8`` -- the shared frozen base: the teacher's and the student's forward move by int8's
   round-off (LoRA only).
7. ``model_offload=base`` -- the same numbers; the frozen base streamed block by block at every forward (needs
   gradient checkpointing, rung 2; not for SDXL's UNet): its bytes cross PCIe several times per iteration.
8. ``run_batch_size`` halved, down to 1 -- a smaller batch per step changes the recipe's noise and its speed.
9. ``model_lora_rank`` halved, down to 8 -- a smaller adapter: the student's capacity; last, and said so.

int8 rather than fp8: it runs on every CUDA card (fp8 needs compute capability 8.9 or newer) at the same bytes.
"""
from __future__ import annotations

import dataclasses

from flashdmd import FlashDMDError
from flashdmd.training.config import OFFLOADS
from flashdmd.training.memory.accounting import FIT_HEADROOM, GiB

MIN_LORA_RANK = 8
_NOTES = {
    "model_text_cache": "same numbers",
    "model_gradient_checkpointing": "same numbers, about 1/3 more compute",
    "model_text_encoder_quant": "prompt embeddings within int8 round-off",
    "disc_backbone_quant": "Pixel-GAN features within int8 round-off",
    "model_frozen_quant": "teacher and student forward within int8 round-off",
    "run_batch_size": "fewer images per step: changes the recipe",
    "model_lora_rank": "a smaller adapter: changes the student's capacity (the last resort)",
}


def _rungs(cfg):
    """The ladder's steps from ``cfg``: (field, value) pairs, cheapest first; a halving rung repeats."""
    yield "model_text_cache", True
    yield "model_gradient_checkpointing", True
    yield "model_text_encoder_quant", "int8"
    yield "model_offload", "frozen"
    yield "disc_backbone_quant", "int8"
    yield "model_frozen_quant", "int8"
    yield "model_offload", "base"
    b = cfg.run_batch_size
    while b > 1:
        b = max(b // 2, 1)
        yield "run_batch_size", b
    r = cfg.model_lora_rank
    while r > MIN_LORA_RANK:
        r = max(r // 2, MIN_LORA_RANK)
        yield "model_lora_rank", r


def _apply(cfg, field: str, value):
    """``cfg`` with one field changed (the config's own validation runs), or None when that cannot be."""
    now = getattr(cfg, field)
    if now == value or (field.endswith("_quant") and now != "none"):
        return None  # already there, or a quantisation already chosen (fp8) is kept
    if field == "model_offload" and OFFLOADS.index(now) >= OFFLOADS.index(value):
        return None  # offloading as much already (base over frozen)
    try:
        return dataclasses.replace(cfg, **{field: value})
    except FlashDMDError:
        return None  # e.g. model_frozen_quant under a full fine-tune, or a text cache without a prompt file


def _note(field: str, value, result: dict) -> str:
    """A rung's cost note; model_offload's with the bytes it copies per iteration in the suggested plan."""
    if field != "model_offload":
        return _NOTES[field]
    t = result["transfers"]["stage1"]
    what = "frozen parts copied in per phase" if value == "frozen" else "the base streamed block by block"
    return (f"same numbers; {t['per_iteration_bytes'] / GiB:.1f} GiB over PCIe per iteration ({what}; "
            f"{t['per_iteration_seconds']:.2f} s at an assumed {result['transfers']['h2d_gbps']:g} GB/s)")


def _value_text(v) -> str:
    return "true" if v is True else "false" if v is False else str(v)


def _miss(peak: int, memory: int) -> int:
    """Bytes over what fits (the plan's 95 % headroom of ``memory``); <= 0 fits."""
    return peak - int(FIT_HEADROOM * memory)


def suggest(cfg, settings, plan_fn, log=None) -> dict:
    """Plan ``cfg`` and then each cumulative rung until one fits ``settings.device_memory``; the JSON record."""
    if settings.device_memory is None:
        raise FlashDMDError("--suggest needs --device-memory SIZE (e.g. 24GB): the memory to fit")
    log = log or (lambda line: None)
    memory = settings.device_memory
    overrides: dict = {}
    tried = []
    result = plan_fn(cfg, settings)
    tried.append({"overrides": {}, "peak_bytes": result["peak_bytes_per_device"],
                  "peak_phase": result["peak_phase"]})
    best = configured = (cfg, result)
    for field, value in _rungs(cfg):
        if _miss(best[1]["peak_bytes_per_device"], memory) <= 0:
            break
        nxt = _apply(best[0], field, value)
        if nxt is None:
            continue
        try:
            result = plan_fn(nxt, settings)
        except FlashDMDError as e:  # a rung this run cannot take (model_offload base on SDXL's UNet)
            log(f"suggest: {field}={_value_text(value)} passed over: {e}")
            continue
        overrides.pop(field, None)  # a rung that raises an earlier one's value (model_offload) moves to the end
        overrides[field] = value
        log(f"suggest: {field}={_value_text(value)} -> {result['peak_bytes_per_device'] / GiB:.1f} GiB")
        tried.append({"overrides": dict(overrides), "peak_bytes": result["peak_bytes_per_device"],
                      "peak_phase": result["peak_phase"]})
        best = (nxt, result)
    if _miss(best[1]["peak_bytes_per_device"], memory) <= 0:
        best, overrides, pruned = _prune(configured[0], overrides, best, settings, plan_fn, tried)
    else:
        pruned = []
    peak = best[1]["peak_bytes_per_device"]
    miss = _miss(peak, memory)
    return {"device_memory_bytes": memory, "fit_headroom": FIT_HEADROOM, "fits": miss <= 0,
            "overrides": overrides, "set": [f"{k}={_value_text(v)}" for k, v in overrides.items()],
            "notes": {k: _note(k, v, best[1]) for k, v in overrides.items()}, "peak_bytes": peak,
            "peak_phase": best[1]["peak_phase"],
            "miss_bytes": max(miss, 0), "pruned": pruned, "tried": tried, "plan": best[1], "configured": configured[1]}


def _prune(cfg, overrides: dict, best, settings, plan_fn, tried: list):
    """Drop the rungs the fit does not need: each one before the last, most expensive first, planned without it
    and left out when the rest still fits (a rung that saved nothing, e.g. int8 text encoders when training, not
    the text cache's encoding pass, is the peak)."""
    pruned = []
    for field in list(overrides)[-2::-1]:
        keep = {k: v for k, v in overrides.items() if k != field}
        try:
            c = dataclasses.replace(cfg, **keep)
        except FlashDMDError:  # a later rung needs this one (model_offload base: gradient checkpointing)
            continue
        result = plan_fn(c, settings)
        tried.append({"overrides": dict(keep), "peak_bytes": result["peak_bytes_per_device"],
                      "peak_phase": result["peak_phase"]})
        if _miss(result["peak_bytes_per_device"], settings.device_memory) <= 0:
            overrides, best = keep, (c, result)
            pruned.append(field)
    return best, overrides, pruned


def describe(s: dict) -> str:
    """The suggestion for the terminal: the ``--set`` overrides, and the miss when nothing fits."""
    mem = s["device_memory_bytes"] / GiB
    if s["fits"] and not s["overrides"]:
        return f"suggest: the run fits {mem:.0f} GiB as configured (peak {s['peak_bytes'] / GiB:.1f} GiB)"
    sets = " ".join(f"--set {x}" for x in s["set"])
    notes = "; ".join(f"{k}: {v}" for k, v in s["notes"].items())
    if s["fits"]:
        return (f"suggest: {sets}  (peak {s['peak_bytes'] / GiB:.1f} GiB, fits {mem:.0f} GiB; {notes})")
    return (f"suggest: nothing flashdmd has fits {mem:.0f} GiB: the best, {sets or 'the run as configured'}, peaks "
            f"at {s['peak_bytes'] / GiB:.1f} GiB at {s['peak_phase']}, {s['miss_bytes'] / GiB:.1f} GiB over "
            f"{FIT_HEADROOM:.0%} of the device: it needs a larger card, or more devices (--processes; FSDP2 shards "
            "only an unquantised base)")
