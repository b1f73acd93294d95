"""The VRAM table of BENCHMARKS.md section 8, made by `flashdmd plan` (issue 15, item 5).

For each row: the real-checkpoint preset (configs/sdxl_flashdmd.yaml, sdxl_dmd2.yaml, sd3_flashdmd.yaml,
flux_flashdmd.yaml, qwenimage_flashdmd.yaml, flux2_klein_flashdmd.yaml, flux2_dev_flashdmd.yaml, zimage_flashdmd.yaml)
pointed at a config-only full-size folder (benchmarks/fullsize.py: SDXL-base, SD3-medium with T5-XXL, FLUX.1-dev,
Qwen-Image, FLUX.2-klein-4B / -9B, FLUX.2-dev, Z-Image, SAM ViT-B; no weights are written or read; a folder is
written only when a row to plan needs it), at 1024 px, batch 1 and 4 per device, LoRA rank 64 or a full fine-tune,
planned for CUDA (model_frozen_dtype auto -> bf16 frozen parts, fp32 trainable weights and AdamW) on one GPU and over
8 with DDP and FSDP2. Writes benchmarks/results/vram_table.json (rows already there are kept, not replanned) and
prints the markdown table. ``--rows REGEX`` plans only the rows whose label matches.

    python benchmarks/vram_table.py [--work /tmp/flashdmd-vram] [--rows 'FLUX.2|Qwen|Z-Image']
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from common import git_commit  # noqa: E402

GiB = 2 ** 30
CARDS = (24, 48, 80, 141)

# (label, family, preset, method overrides)
ROWS = [
    ("SDXL Flash-DMD full", "sdxl", "sdxl_flashdmd.yaml", {"model_lora_rank": 0}),
    ("SDXL Flash-DMD LoRA 64", "sdxl", "sdxl_flashdmd.yaml", {"model_lora_rank": 64}),
    ("SDXL DMD2 full", "sdxl", "sdxl_dmd2.yaml", {"model_lora_rank": 0}),
    ("SDXL DMD2 LoRA 64", "sdxl", "sdxl_dmd2.yaml", {"model_lora_rank": 64}),
    ("SD3-medium Flash-DMD LoRA 64", "sd3", "sd3_flashdmd.yaml", {"model_lora_rank": 64}),
    ("SD3-medium Flash-DMD LoRA 64, text cache", "sd3", "sd3_flashdmd.yaml",
     {"model_lora_rank": 64, "model_text_cache": True, "data_prompts": "{prompts}"}),
    ("SD3-medium DMD2 LoRA 64", "sd3", "sdxl_dmd2.yaml",
     {"model_lora_rank": 64, "student_timesteps": [1000, 900, 750, 500], "dm_guidance_scale": 7.0}),
    ("FLUX.1-dev Flash-DMD LoRA 64, text cache", "flux", "flux_flashdmd.yaml",
     {"model_lora_rank": 64, "data_prompts": "{prompts}"}),
    ("FLUX.1-dev DMD2 LoRA 64, text cache", "flux", "sdxl_dmd2.yaml",
     {"model_lora_rank": 64, "student_timesteps": None, "dm_guidance_scale": 3.5, "model_text_cache": True,
      "data_prompts": "{prompts}"}),
]
# the language-model-conditioned families (issue 30): their text encoders (7-24 B) are what the text cache removes
TEXT_CACHE = {"model_lora_rank": 64, "model_text_cache": True, "data_prompts": "{prompts}"}
ROWS += [
    ("Qwen-Image Flash-DMD LoRA 64, text cache", "qwenimage", "qwenimage_flashdmd.yaml", TEXT_CACHE),
    ("FLUX.2-klein-4B Flash-DMD LoRA 64, text cache", "flux2-klein-4b", "flux2_klein_flashdmd.yaml", TEXT_CACHE),
    ("FLUX.2-klein-9B Flash-DMD LoRA 64, text cache", "flux2-klein-9b", "flux2_klein_flashdmd.yaml", TEXT_CACHE),
    ("FLUX.2-dev Flash-DMD LoRA 64, text cache", "flux2-dev", "flux2_dev_flashdmd.yaml", TEXT_CACHE),
    ("Z-Image Flash-DMD LoRA 64, text cache", "zimage", "zimage_flashdmd.yaml", TEXT_CACHE),
]


def _writers() -> dict:
    """family -> (folder name, writer of its config-only folder)."""
    import fullsize
    return {"sdxl": ("sdxl", fullsize.write_sdxl),
            "sd3": ("sd3-medium", lambda f, **k: fullsize.write_sd3_medium(f, t5=True, **k)),
            "flux": ("flux-dev", fullsize.write_flux_dev),
            "qwenimage": ("qwen-image", fullsize.write_qwen_image),
            "flux2-klein-4b": ("flux2-klein-4b", lambda f, **k: fullsize.write_flux2_klein(f, size="4b", **k)),
            "flux2-klein-9b": ("flux2-klein-9b", lambda f, **k: fullsize.write_flux2_klein(f, size="9b", **k)),
            "flux2-dev": ("flux2-dev", fullsize.write_flux2_dev),
            "zimage": ("z-image", fullsize.write_z_image)}


def folders(work: Path, families) -> dict:
    """{family: its config-only folder (written unless already there), "sam", "prompts"} for ``families``."""
    import fullsize
    out = {"sam": work / "sam-vit-base", "prompts": work / "prompts.txt"}
    for family, (name, write) in _writers().items():
        if family in families:
            out[family] = work / name
            if not (out[family] / "model_index.json").is_file():
                write(out[family], weights=False)
    if not (out["sam"] / "config.json").is_file():
        fullsize.write_sam_vit_base(out["sam"])
    out["prompts"].write_text("a photo of a cat\n")
    return out


def config(row, paths: dict, batch: int):
    from flashdmd.training.config import DistillConfig
    _, family, preset, extra = row
    sets = {"model_teacher": str(paths[family]), "disc_backbone_path": str(paths["sam"]), "data_resolution": 1024,
            "run_batch_size": batch, "eval_prompts": None, "eval_clip_model": None, "eval_every_steps": 0}
    for k, v in extra.items():
        sets[k] = v.format(prompts=paths["prompts"]) if isinstance(v, str) else v
    overrides = [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" if v is not None else f"{k}=null"
                 for k, v in sets.items()]
    return DistillConfig.from_sources(HERE.parent / "configs" / preset, overrides)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/tmp/flashdmd-vram")
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--out", default=str(HERE / "results" / "vram_table.json"))
    ap.add_argument("--rows", default=None, help="plan only the rows whose label matches this regular expression")
    args = ap.parse_args()
    from flashdmd.training import plan as P
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    rows = [r for r in ROWS if args.rows is None or re.search(args.rows, r[0])]
    paths = folders(work, {r[1] for r in rows})
    out = Path(args.out)
    results = json.loads(out.read_text())["rows"] if out.is_file() else []
    done = {(r["row"], r["batch"]) for r in results}
    commit = git_commit(HERE.parent)
    for row in rows:
        for batch in (int(b) for b in args.batches.split(",")):
            if (row[0], batch) in done:
                continue
            t0 = time.time()
            result = P.plan(config(row, paths, batch), P.Settings(device="cuda", processes=8))
            entry = {"row": row[0], "batch": batch, "seconds": round(time.time() - t0, 1),
                     "setting": result["setting"], "parameters": result["parameters"]}
            for name, strat in result["strategies"].items():
                split = strat["split"]
                entry[name] = {"peak_gib": round(strat["peak_bytes_per_device"] / GiB, 2),
                               "peak_phase": strat["peak_phase"],
                               "weights_gib": round(sum(v.get("weights", 0) for v in split.values()) / GiB, 2),
                               "gradients_gib": round(sum(v.get("gradients", 0) for v in split.values()) / GiB, 2),
                               "optimizer_gib": round(sum(v.get("optimizer", 0) for v in split.values()) / GiB, 2),
                               "activations_gib": round(sum(v.get("activations", 0) for v in split.values()) / GiB, 2),
                               "other_gib": round(sum(v.get("other", 0) for v in split.values()) / GiB, 2)}
            results.append(entry)
            print(f"{row[0]}, batch {batch}: one GPU {entry['single']['peak_gib']} GiB, FSDP2x8 "
                  f"{entry['fsdp2']['peak_gib']} GiB ({entry['seconds']} s)", flush=True)
            tmp = out.with_name(out.name + ".tmp")
            tmp.write_text(json.dumps({"commit": commit, "resolution": 1024, "device": "cuda (planned)",
                                       "rows": results}, indent=1) + "\n")
            tmp.replace(out)
    print(markdown(results))


def fits(gib: float) -> str:
    from flashdmd.training.plan import FIT_HEADROOM
    ok = [str(c) for c in CARDS if gib <= FIT_HEADROOM * c]
    return ok[0] + "+" if ok else "none"


def markdown(results: list) -> str:
    lines = ["| run (1024 px) | batch/GPU | one GPU: peak GiB (weights / grads / AdamW / act. / other) | smallest card | "
             "DDP x8 | FSDP2 x8 | smallest card (FSDP2) |", "|---|---|---|---|---|---|---|"]
    for r in results:
        s = r["single"]
        lines.append(f"| {r['row']} | {r['batch']} | {s['peak_gib']:.1f} ({s['weights_gib']:.1f} / "
                     f"{s['gradients_gib']:.1f} / {s['optimizer_gib']:.1f} / {s['activations_gib']:.1f} / "
                     f"{s['other_gib']:.1f}) | "
                     f"{fits(s['peak_gib'])} GB | {r['ddp']['peak_gib']:.1f} | {r['fsdp2']['peak_gib']:.1f} | "
                     f"{fits(r['fsdp2']['peak_gib'])} GB |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
