"""The planned memory targets of issue 31 (item 4), made by `flashdmd plan` on the config-only full-size folders.

Each target: Flash-DMD LoRA 64 at 1024 px, batch 1, with the text cache, on one GPU (CUDA: frozen parts bf16, LoRA
and AdamW fp32), the family's preset (configs/) with the target's quantisation (an int8 / fp8 base quantises the text
encoders the same way: they are what the text cache's encoding pass holds next to the teacher). For each: the planned
peak, its phase, the card, whether it fits (the plan's 95 % of the card), and for a miss: by how much, what
`flashdmd plan --suggest` proposes (its cumulative ladder, flashdmd/training/memory/suggest.py, offloading among its
rungs) or by how much its best still misses.
The ``model_offload`` targets also give the bytes copied host -> device per Stage-1 iteration and their time at the
plan's assumed 25 GB/s (a bound, not a measurement: on a GPU prefetch overlaps the copies with compute). Writes
benchmarks/results/plan_targets.json.

    python benchmarks/plan_targets.py [--work /tmp/flashdmd-vram]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from common import git_commit  # noqa: E402

GiB = 2 ** 30
TEXT_CACHE = {"model_lora_rank": 64, "model_text_cache": True, "data_prompts": "{prompts}"}
INT8 = {"model_frozen_quant": "int8", "model_text_encoder_quant": "int8"}
FP8 = {"model_frozen_quant": "fp8", "model_text_encoder_quant": "fp8"}
BASE = {"model_offload": "base"}  # the presets have gradient checkpointing on, which streaming the base needs
# (target, family, preset, quantisation, card GB)
TARGETS = [
    ("Qwen-Image, int8 base, one 48 GB card", "qwenimage", "qwenimage_flashdmd.yaml", INT8, 48),
    ("Qwen-Image, bf16, one 80 GB card", "qwenimage", "qwenimage_flashdmd.yaml", {}, 80),
    ("FLUX.2-dev, int8 base, one 80 GB card", "flux2-dev", "flux2_dev_flashdmd.yaml", INT8, 80),
    ("FLUX.2-dev, fp8 base, one 80 GB card", "flux2-dev", "flux2_dev_flashdmd.yaml", FP8, 80),
    ("Z-Image, bf16, one 24 GB card", "zimage", "zimage_flashdmd.yaml", {}, 24),
    ("FLUX.2-klein-4B, bf16, one 16 GB card", "flux2-klein-4b", "flux2_klein_flashdmd.yaml", {}, 16),
    ("Qwen-Image, bf16, base offloaded, one 48 GB card", "qwenimage", "qwenimage_flashdmd.yaml", BASE, 48),
    ("FLUX.2-dev, bf16, base offloaded, one 80 GB card", "flux2-dev", "flux2_dev_flashdmd.yaml", BASE, 80),
    ("FLUX.2-dev, int8 base, frozen parts offloaded, one 80 GB card", "flux2-dev", "flux2_dev_flashdmd.yaml",
     dict(INT8, model_offload="frozen"), 80),
]


def _gib(b: int) -> float:
    return round(b / GiB, 2)


def plan_target(target, paths: dict) -> dict:
    from flashdmd.training import plan as P
    from flashdmd.training.memory.suggest import suggest
    from vram_table import config
    label, family, preset, quant, card = target
    cfg = config((label, family, preset, dict(TEXT_CACHE, **quant)), paths, 1)
    settings = P.Settings(device="cuda", processes=1, device_memory=card * GiB)
    memo = {}

    def plan(c, s):
        key = c.to_yaml()
        if key not in memo:
            t0 = time.time()
            memo[key] = P.plan(c, s)
            print(f"  planned in {time.time() - t0:.0f} s: {_gib(memo[key]['peak_bytes_per_device'])} GiB at "
                  f"{memo[key]['peak_phase']}", flush=True)
        return memo[key]
    result = plan(cfg, settings)
    peak = result["peak_bytes_per_device"]
    entry = {"target": label, "card_gb": card, "settings": {"lora_rank": 64, "resolution": 1024, "batch_size": 1,
                                                            "text_cache": True, **quant},
             "planned_peak_gib": _gib(peak), "peak_phase": result["peak_phase"], "fits": bool(result["fits"]),
             "fit_limit_gib": _gib(int(P.FIT_HEADROOM * card * GiB)),
             "per_stage_gib": {k: _gib(v["peak_bytes"]) for k, v in
                               result["strategies"]["single"]["stages"].items()}}
    if "transfers" in result:
        t = result["transfers"]["stage1"]
        entry["transfer_gib_per_iteration"] = _gib(t["per_iteration_bytes"])
        entry["transfer_seconds_per_iteration"] = t["per_iteration_seconds"]
        entry["h2d_gbps"] = result["transfers"]["h2d_gbps"]
        entry["block_calls_per_phase"] = t["block_calls"]
    if not entry["fits"]:
        entry["miss_gib"] = _gib(peak - int(P.FIT_HEADROOM * card * GiB))
        rec = suggest(cfg, settings, plan)
        entry["suggest"] = {"fits": rec["fits"], "set": rec["set"], "peak_gib": _gib(rec["peak_bytes"]),
                            "peak_phase": rec["peak_phase"], "miss_gib": _gib(rec["miss_bytes"]),
                            "tried": [{"set": t["overrides"], "peak_gib": _gib(t["peak_bytes"]),
                                       "peak_phase": t["peak_phase"]} for t in rec["tried"]]}
    return entry


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/tmp/flashdmd-vram")
    ap.add_argument("--out", default=str(HERE / "results" / "plan_targets.json"))
    args = ap.parse_args()
    from vram_table import folders
    paths = folders(Path(args.work), {t[1] for t in TARGETS})
    commit = git_commit(HERE.parent)
    out = Path(args.out)
    rows = []
    for target in TARGETS:
        print(target[0], flush=True)
        rows.append(plan_target(target, paths))
        r = rows[-1]
        print(f"{r['target']}: {r['planned_peak_gib']} GiB at {r['peak_phase']} -> "
              f"{'fits' if r['fits'] else 'misses by ' + str(r['miss_gib']) + ' GiB'}", flush=True)
        out.write_text(json.dumps({"commit": commit, "device": "cuda (planned)", "fit_headroom": 0.95,
                                   "targets": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
