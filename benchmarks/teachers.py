"""Teacher table of BENCHMARKS.md: FD, alignment, diversity, oracle and seconds per image of both world teachers
at 1, 2, 4, 8, 25 and 50 steps with CFG, plus the train-vs-test FD floor.

    .venv/bin/python benchmarks/teachers.py --num-images 500 --out benchmarks/results/teachers.json
"""
import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from flashdmd.world.metrics import evaluate_world, floor  # noqa: E402
from flashdmd.inference import load_model  # noqa: E402
from flashdmd.world import plugin as _world  # noqa: E402

_world.register()  # benchmarks are a face: they choose the embedded world


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--models", nargs="+", default=["world-sdxl", "world-sd3"])
    p.add_argument("--steps", nargs="+", type=int, default=[1, 2, 4, 8, 25, 50])
    p.add_argument("--num-images", type=int, default=500)
    p.add_argument("--cfg", type=float, default=None, help="default: each teacher's recommended scale")
    p.add_argument("--out", default="benchmarks/results/teachers.json")
    a = p.parse_args()
    rows = []
    for spec in a.models:
        model = load_model(spec)
        for steps in a.steps:
            m = evaluate_world(model, a.num_images, seed=0, steps=steps, guidance_scale=a.cfg)
            m.update(model=spec, steps=steps, cfg=a.cfg if a.cfg is not None else model.guidance_scale)
            rows.append(m)
            print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in m.items()}), flush=True)
    result = {"rows": rows, "fd_floor": floor(a.num_images, 0), "num_images": a.num_images}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"floor {result['fd_floor']:.3f}; wrote {out}")


if __name__ == "__main__":
    main()
