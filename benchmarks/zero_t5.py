"""SD3 without T5: what counting the 256 zero T5 tokens as one saves (model_zero_t5: counted against padded;
BENCHMARKS.md section 6). Both modes in one process, interleaved in rounds, 1 thread:

  training   seconds per generator update of world-sd3's DMD2 and Flash-DMD presets at batch 32
             (benchmarks/step_cost.py's time_rows: a TTUR-n update includes its n - 1 critic iterations)
  block      one joint transformer block of SD3-medium's width (1536, 24 heads of 64, RMS qk-norm), forward and
             backward at batch 1 on the image tokens of 512 and 1024 px (32^2 and 64^2 patches) with 77 CLIP tokens
             and 256 zero tokens (padded) or one counted zero token (counted): what a real SD3 spends per block

    .venv/bin/python benchmarks/zero_t5.py --out benchmarks/results/zero_t5.json
"""
import argparse
import datetime
import json
import sys
import time
from statistics import median_high as median   # the middle of 3 rounds (step_cost's and attribution's choice)
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import add_threads_arg, git_commit, parse  # noqa: E402

MODES = ("padded", "counted")


def training(rounds: int) -> dict:
    from step_cost import time_rows
    specs = {f"{method} {mode}": (ROOT / "configs" / f"world_sd3_{preset}.yaml", {"model_zero_t5": mode})
             for method, preset in (("DMD2", "dmd2"), ("Flash-DMD preset", "flashdmd")) for mode in MODES}
    runs = time_rows(specs, 32, 1, rounds)
    return {name: {"ttur": ttur, "seconds_per_generator_update": median(t), "rounds": t}
            for name, (ttur, t) in runs.items()}


def block(rounds: int, sides=(32, 64)) -> dict:
    import torch
    from diffusers.models.attention import JointTransformerBlock

    from flashdmd.families.sd3 import CountedZeroT5Processor, count_zero_tokens

    torch.manual_seed(0)
    dim = 1536
    blk = JointTransformerBlock(dim, 24, 64, context_pre_only=False, qk_norm="rms_norm")
    blk.attn.set_processor(CountedZeroT5Processor())  # without a mask it is the pipeline's attention
    clip = torch.randn(1, 77, dim)
    temb = torch.randn(1, dim)
    inputs = {}
    for side in sides:
        x = torch.randn(1, side * side, dim)
        ctx, bias = count_zero_tokens(clip, side * side, torch.tensor([256.0]))
        inputs[side, "padded"] = (x, torch.cat([clip, torch.zeros(1, 256, dim)], 1), None)
        inputs[side, "counted"] = (x, ctx, {"attention_mask": bias})
    times = {k: [] for k in inputs}

    def once(key):
        x, ctx, kw = inputs[key]
        blk.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        c, h = blk(x, ctx, temb, joint_attention_kwargs=kw)
        (h.square().mean() + c.square().mean()).backward()
        return time.perf_counter() - t0

    for key in inputs:  # warm-up
        once(key)
    for _ in range(rounds):
        for key in inputs:
            times[key].append(once(key))
    return {f"{side * 16} px {mode}": {"image_tokens": side * side, "context_tokens": inputs[side, mode][1].shape[1],
                                       "seconds": median(times[side, mode]), "rounds": times[side, mode]}
            for side, mode in inputs}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--parts", nargs="+", default=["training", "block"], choices=["training", "block"])
    add_threads_arg(p)
    a = parse(p)
    out = {"commit": git_commit(ROOT), "date": datetime.date.today().isoformat(), "threads": a.threads}
    if "block" in a.parts:
        out["block"] = block(a.rounds)
        print(json.dumps(out["block"], indent=1), flush=True)
    if "training" in a.parts:
        out["training"] = training(a.rounds)
        print(json.dumps(out["training"], indent=1), flush=True)
    Path(a.out).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
