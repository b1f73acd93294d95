"""World-sdxl Stage 1 with an int8 frozen base against an unquantised (fp32) one: collect the runs' FD curves.

300 generator steps, the preset's own length (run to 200, then continued to 300 by a bit-exact resume). Every row is the shipped preset
configs/world_sdxl_flashdmd.yaml with a LoRA of rank 32 (model_frozen_quant needs a LoRA: a full fine-tune trains the
weights it would quantise) and the preset's learning rates x 10 (LoRA's usual scale), 300 evaluation images; a row
differs from its pair only in model_frozen_quant. Each run (run_seed S, quant Q in int8 / none):

    flashdmd distill --config configs/world_sdxl_flashdmd.yaml --out R/qQ_sS --set model_frozen_quant=Q \
        --set run_seed=S --set model_lora_rank=32 --set student_lr=5.0e-4 --set fake_score_lr=2.0e-3 \
        --set run_max_steps=40 --set eval_every_steps=20 --set eval_num_images=300 --set run_sample_every_steps=0 \
        --set run_checkpoint_every_steps=40
    # continued (bit-exact resume, constant learning rates) to 80, 200, then 300 steps (the same as one 300-step run):
    flashdmd distill --config R/qQ_sS/config.yaml --out R/qQ_sS --resume latest --set run_max_steps=80 \
        --set run_checkpoint_every_steps=20
    flashdmd distill --config R/qQ_sS/config.yaml --out R/qQ_sS --resume latest --set run_max_steps=200 \
        --set run_checkpoint_every_steps=20
    flashdmd distill --config R/qQ_sS/config.yaml --out R/qQ_sS --resume latest --set run_max_steps=300 \
        --set run_checkpoint_every_steps=20
    # the bf16 rows: --set model_frozen_quant=none --set model_frozen_dtype=bfloat16, the rest the same

then  python benchmarks/quant_stage1.py --runs R  writes benchmarks/results/quant_stage1.json (the FD / alignment
curve of every run folder R/q*_s* that has a metrics.json, its seconds and its steps).
"""
import argparse
import json
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def collect(folder: Path) -> dict:
    m = json.loads((folder / "metrics.json").read_text())
    cfg = (folder / "config.yaml").read_text()
    evals = {}
    for h in m.get("evals", []) + [h for h in m.get("history", []) if "eval/fd" in h]:
        step = h.get("step", h.get("generator_steps"))
        fd = h.get("fd", h.get("eval/fd"))
        if fd is not None:
            evals[int(step)] = {"step": int(step), "fd": round(float(fd), 3),
                                "alignment": round(float(h.get("alignment", h.get("eval/alignment"))), 3),
                                "diversity": round(float(h.get("diversity", h.get("eval/diversity"))), 3)}
    return {"generator_steps": m.get("generator_steps"), "wall_seconds": m.get("wall_seconds"),
            "evals": [evals[s] for s in sorted(evals)],
            "config": {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in cfg.splitlines())
                       if k.strip() in ("model_frozen_quant", "model_frozen_dtype", "run_seed", "model_lora_rank",
                                        "student_lr", "fake_score_lr", "eval_num_images")}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", required=True)
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/quant_stage1.json"))
    a = p.parse_args()
    out, rows = Path(a.out), {}
    for f in sorted(Path(a.runs).glob("q*_s*")):
        if (f / "metrics.json").exists():
            rows[f.name] = collect(f)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(rows, indent=1))
    os.replace(tmp, out)
    for k, r in rows.items():
        print(k, r["generator_steps"], [(e["step"], e["fd"]) for e in r["evals"]])


if __name__ == "__main__":
    main()
