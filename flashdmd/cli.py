"""The `flashdmd` command line. Each subcommand lives in the module that owns the work; this file only
parses, dispatches and turns user errors into one line on stderr with exit status 2."""
from __future__ import annotations

import argparse
import os
import sys

from flashdmd import FlashDMDError, __version__

# Offline by default: the embedded world and the tests never need the network. A user who wants hub
# downloads sets HF_HUB_OFFLINE=0 explicitly.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


def _cmd_info(args):
    import json

    from flashdmd.families import load_family

    fam = load_family(args.model, family=args.family)
    n_params = sum(p.numel() for p in fam.denoiser.parameters())
    print(json.dumps({"family": fam.name, "prediction_type": fam.prediction_type,
                      "schedule": repr(fam.schedule), "denoiser": type(fam.denoiser).__name__,
                      "denoiser_params": n_params,
                      "default_student_timesteps": [float(t) for t in fam.default_student_timesteps]}, indent=2))


def _cmd_world_pretrain(args):
    from flashdmd.world import pretrain
    pretrain.run(args)


def _cmd_eval(args):
    from flashdmd.evaluation import runner
    runner.run(args)


def _cmd_distill(args):
    from flashdmd.training.config import DistillConfig
    from flashdmd.training.distill import train
    cfg = DistillConfig.from_sources(args.config, args.set)
    print(cfg.to_yaml(), end="")
    result = train(cfg, args.out, progress=not args.no_progress)
    last = result["evals"][-1] if result["evals"] else {}
    summary = {k: last[k] for k in ("fd", "alignment", "diversity", "oracle") if k in last}
    print(f"done: {result['generator_steps']} generator steps in {result['wall_seconds']:.0f} s; student in "
          f"{args.out}/student {summary if summary else ''}")


def _cmd_demo(args):
    from flashdmd import demo
    demo.run(args)


def _cmd_config_help(args):
    import dataclasses

    from flashdmd.training.config import DistillConfig
    for f in dataclasses.fields(DistillConfig):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        print(f"{f.name} = {default!r}\n    {f.metadata.get('help', '')}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flashdmd", description="Flash-DMD distillation and joint preference RL "
                                "for SDXL- and SD3-style diffusion models.")
    p.add_argument("--version", action="version", version=f"flashdmd {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="load a model folder through its family adapter and describe it")
    info.add_argument("--model", required=True, help="diffusers folder, hub id, or world-sdxl / world-sd3")
    info.add_argument("--family", choices=["sdxl", "sd3"], default=None, help="default: from model_index.json")
    info.set_defaults(func=_cmd_info)

    world = sub.add_parser("world", help="the embedded default world")
    wsub = world.add_subparsers(dest="world_command", required=True)
    pre = wsub.add_parser("pretrain", help="train the world's VAE, text encoders, teachers and eval nets")
    try:
        from flashdmd.world import pretrain as _pretrain
        _pretrain.add_arguments(pre)
    except ImportError:  # pragma: no cover - only while the module is being written
        pass
    pre.set_defaults(func=_cmd_world_pretrain)

    ev = sub.add_parser("eval", help="sample a model and measure FD, alignment, diversity and speed")
    try:
        from flashdmd.evaluation import runner as _runner
        _runner.add_arguments(ev)
    except ImportError:  # pragma: no cover
        pass
    ev.set_defaults(func=_cmd_eval)

    dist = sub.add_parser("distill", help="Stage 1 (and Stage 2 when configured): distil a teacher into a K-step student")
    dist.add_argument("--config", default=None, help="YAML preset (see configs/); default: built-in defaults")
    dist.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="override a config field (repeatable); `flashdmd config-help` lists the fields")
    dist.add_argument("--out", required=True, help="run folder (created)")
    dist.add_argument("--no-progress", action="store_true", help="no progress bar")
    dist.set_defaults(func=_cmd_distill)

    ch = sub.add_parser("config-help", help="list every config field with its default and help text")
    ch.set_defaults(func=_cmd_config_help)

    demo = sub.add_parser("demo", help="the main job: distil the embedded teacher and write a report")
    demo.add_argument("--out", default="runs/demo", help="run folder (default runs/demo)")
    demo.set_defaults(func=_cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except FlashDMDError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
