"""`flashdmd eval`: sample a model and measure it.

With ``--prompts`` or a metric backend it uses :mod:`flashdmd.evaluation.real` (FID, CLIP score, PickScore,
HPSv2, ImageReward from local weights). Without them, a model that belongs to a plug-in (the embedded world's
``world-sdxl``, or a run distilled from it) is measured by that plug-in's evaluator.
"""
from __future__ import annotations

import json
from pathlib import Path

from flashdmd import FlashDMDError, io, plugins
from flashdmd.families import resolve_path
from flashdmd.evaluation.real import run_eval
from flashdmd.inference import DTYPES, load_model, teacher_spec

# ---------------------------------------------------------------------------------------------------
# CLI

def add_arguments(p):
    p.add_argument("--model", required=True, help="pipeline folder, hub id, a plug-in model name (world-sdxl / world-sd3), or a distill run folder")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's own)")
    p.add_argument("--cfg", type=float, default=None, help="guidance scale w in uncond + w*(cond-uncond)")
    p.add_argument("--num-images", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", required=True, help="write the metrics here")
    p.add_argument("--floor", action="store_true", help="also report FD of train vs test at the same N")
    p.add_argument("--split", default=None, help="a plug-in evaluator's prompt split (the embedded world: test, the "
                   "default, or val, the split distill's eval_split val chooses checkpoints on)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    real = p.add_argument_group(
        "real models", "--prompts or any metric backend below switches from the embedded world's metrics to these "
        "(local weights only; docs/EVALUATION.md says what each expects on disk and gives the COCO-10k command)")
    real.add_argument("--prompts", default=None, help="UTF-8 text file, one prompt per line; image i uses line i mod lines")
    real.add_argument("--fid-inception", default=None, metavar="PTH",
                      help="pytorch-fid weights pt_inception-2015-12-05-6726825d.pth (or a .safetensors conversion)")
    real.add_argument("--fid-ref", default=None, metavar="DIR_OR_STATS",
                      help="real images folder, or statistics .npz (pytorch-fid) / .safetensors (flashdmd eval-stats)")
    real.add_argument("--clip", default=None, metavar="DIR", help="transformers CLIPModel folder: CLIP score")
    real.add_argument("--pickscore", default=None, metavar="DIR", help="PickScore_v1 CLIPModel + processor folder")
    real.add_argument("--hpsv2", default=None, metavar="DIR", help="HPSv2 converted to a CLIPModel folder")
    real.add_argument("--imagereward", default=None, metavar="DIR",
                      help="BlipForImageTextRetrieval folder + mlp_head.safetensors: ImageReward")
    real.add_argument("--batch-size", type=int, default=16, help="sampling batch size (images do not depend on it)")
    real.add_argument("--metric-batch-size", type=int, default=50, help="batch size of the metric networks")
    real.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="fp32",
                   help="dtype the sampled model's networks are loaded in (the metric networks stay float32); "
                        "default fp32")


REAL_FLAGS = ("prompts", "fid_inception", "fid_ref", "clip", "pickscore", "hpsv2", "imagereward")


def run(args):
    if any(getattr(args, k, None) is not None for k in REAL_FLAGS):
        if args.floor or getattr(args, "split", None):
            raise FlashDMDError("--floor / --split are a plug-in's; they do not combine with --prompts / metric "
                                "backends (the --prompts file is the split)")
        run_eval(args)
        return
    if args.num_images < 20:
        raise FlashDMDError("--num-images must be at least 20 (two per class: diversity and FD need pairs)")
    if args.steps is not None and args.steps < 1:
        raise FlashDMDError("--steps must be >= 1")
    out = Path(args.json)
    if not out.parent.exists():
        raise FlashDMDError(f"folder {out.parent} for --json does not exist")
    if not resolve_path(args.model).exists():
        raise FlashDMDError(f"model folder {args.model} does not exist: give a diffusers pipeline folder, a distill run "
                            "folder, a hub id in the local cache (or HF_HUB_OFFLINE=0) or a plug-in model name")
    owner = plugins.model_owner(teacher_spec(args.model))
    if owner is None or owner.evaluator is None:
        raise FlashDMDError(f"{args.model} belongs to no plug-in with its own metrics: give --prompts FILE and metric "
                            "backends (--fid-inception/--fid-ref, --clip, --pickscore, --hpsv2, --imagereward)")
    split = getattr(args, "split", None)
    plugins.check_split(owner, split, "--split")
    evaluator = owner.evaluator(args.num_images, **({} if split is None else {"split": split}))
    if args.floor and not hasattr(evaluator, "floor"):
        raise FlashDMDError(f"--floor: plug-in {owner.name!r} has no real-data floor")
    model = load_model(args.model, device=getattr(args, "device", None) or "cpu", dtype=DTYPES[args.dtype])
    metrics = evaluator.evaluate(model, args.seed, args.steps, args.cfg, progress=not args.no_progress)
    metrics.update(model=args.model, kind=model.kind, steps=args.steps, cfg=args.cfg, seed=args.seed,
                   split=getattr(evaluator, "split", None))
    if args.floor:
        metrics["fd_floor"] = evaluator.floor(args.num_images, args.seed)
    io.atomic_write_text(out, json.dumps(metrics, indent=2), f"the metrics {out.name}")
    print(json.dumps(metrics, indent=2))
