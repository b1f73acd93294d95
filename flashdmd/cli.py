"""The `flashdmd` command line. Each subcommand lives in the module that owns the work; this file only
parses, dispatches and turns user errors into one line on stderr with exit status 2."""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import textwrap
from pathlib import Path

from flashdmd import FlashDMDError, Preempted, __version__, launch_rank

# Offline by default: the embedded world and the tests never need the network. A user who wants hub
# downloads sets HF_HUB_OFFLINE=0 explicitly.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


def _cmd_info(args):
    from flashdmd.families import load_family

    fam = load_family(args.model, family=args.family)
    n_params = sum(p.numel() for p in fam.denoiser.parameters())
    res = fam.default_resolution  # the pipeline's default image side: what training and sampling use
    print(json.dumps({"family": fam.name, "prediction_type": fam.prediction_type,
                      "schedule": repr(fam.schedule), "denoiser": type(fam.denoiser).__name__,
                      "denoiser_params": n_params, "resolution": res, "latent_shape": list(fam.latent_shape(res, res)),
                      "default_student_timesteps": [float(t) for t in fam.default_student_timesteps]}, indent=2))


def _cmd_world_pretrain(args):
    from flashdmd.world import pretrain
    pretrain.run(args)


def _cmd_eval(args):
    from flashdmd.evaluation import runner
    runner.run(args)


def _cmd_eval_stats(args):
    from flashdmd.evaluation import real
    real.run_stats(args)


def _cmd_distill(args):
    from flashdmd.training.config import DistillConfig
    cfg = DistillConfig.from_sources(args.config, args.set)  # a config's error ends here, before diffusers loads
    from flashdmd.training.distill import dry_run, train
    print(cfg.to_yaml(), end="")
    if not args.no_plan:
        _print_plan(cfg)
    if args.dry_run:
        if args.resume:
            raise FlashDMDError("--dry-run checks a new run; it does not combine with --resume")
        dry_run(cfg, print)
        return
    result = train(cfg, args.out, progress=not args.no_progress, resume=args.resume, overwrite=args.overwrite)
    last = result["evals"][-1] if result["evals"] else {}
    summary = {k: round(last[k], 4) for k in result.get("higher_is_better", {}) if k in last}
    print(f"done: {result['generator_steps']} generator steps in {result['wall_seconds']:.0f} s; student in "
          f"{args.out}/student {summary if summary else ''}")


def _print_plan(cfg) -> None:
    """The memory plan's headline before the run loads anything (main process only). A plan that cannot be made
    is reported in one line and the run goes on: setup's own checks give the precise error."""
    import torch
    if launch_rank() != 0:
        return
    from flashdmd.training import plan
    device = "cuda" if torch.cuda.is_available() else "cpu"
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        result = plan.plan(cfg, plan.Settings(device=device, processes=processes))
    except FlashDMDError as e:
        print(f"memory plan: not available ({e})")
        return
    print(plan.headline(result), flush=True)
    if plan.transfer_line(result):  # model_offload: what the offloaded weights cost per iteration
        print(plan.transfer_line(result), flush=True)


def _cmd_plan(args):
    from flashdmd.training import plan
    plan.run(args)


def _cmd_sample(args):
    from flashdmd import sample
    sample.run(args)


def _cmd_make_reals(args):
    from flashdmd import reals
    reals.run(args)


def _cmd_export(args):
    from flashdmd import export
    export.run(args)


def _cmd_report(args):
    from flashdmd.evaluation.report import write_report
    if not (Path(args.run) / "metrics.json").is_file():
        raise FlashDMDError(f"{args.run} has no metrics.json: give a finished flashdmd distill or demo run folder")
    print(write_report(args.run))


def _cmd_demo(args):
    from flashdmd import demo
    demo.run(args)


def _cmd_reward_make_pairs(args):
    from flashdmd.rewards import pairs
    pairs.run_make_pairs(args)


def _cmd_reward_train(args):
    from flashdmd.rewards import train
    train.run_train(args)


def _cmd_config_help(args):
    from flashdmd.training.config import RESOLUTION, DistillConfig
    print(textwrap.fill(RESOLUTION, 116) + "\n")
    helps = DistillConfig.field_help()
    for f in dataclasses.fields(DistillConfig):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        shown = "the method's" if f.metadata.get("method_default") else repr(default)
        print(f"{f.name} = {shown}\n    {helps[f.name]}")


def _threads_arg(value: str) -> str | int:
    if value == "auto":
        return value
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a whole number >= 1, got {value!r}")
    return n


def auto_threads(environ=None) -> int:
    """The thread count of ``--threads auto``: the cores this process may run on (``os.sched_getaffinity``: what
    taskset, a container's cpuset or SLURM's --cpus-per-task leave it), shared among the local processes of a
    multi-process launch (LOCAL_WORLD_SIZE); an explicit OMP_NUM_THREADS (torchrun sets 1) is taken as given. A load
    average is not consulted: it decays over minutes, so right after another job ended it still counts that job's
    cores as busy (a demo started after the test suite ran on one of two idle cores, 1.7x slower)."""
    environ = os.environ if environ is None else environ
    omp = environ.get("OMP_NUM_THREADS", "").strip()
    if omp.isdigit() and int(omp) > 0:
        return int(omp)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    local = environ.get("LOCAL_WORLD_SIZE", "").strip()
    per_process = cores // int(local) if local.isdigit() and int(local) > 0 else cores
    return max(1, per_process)


def set_threads(spec: str | int | None) -> int:
    """Set torch's CPU threads: ``auto`` (the default) is :func:`auto_threads`, a number is taken as given."""
    import torch
    n = auto_threads() if spec is None or spec == "auto" else int(spec)
    torch.set_num_threads(n)
    return n


def _root_parser() -> argparse.ArgumentParser:
    """The parser of the global options alone (what comes before the subcommand's word)."""
    p = argparse.ArgumentParser(prog="flashdmd", description="Flash-DMD distillation and joint preference RL "
                                "for SDXL- and SD3-style diffusion models.")
    p.add_argument("--version", action="version", version=f"flashdmd {__version__}")
    p.add_argument("--threads", dest="global_threads", type=_threads_arg, default="auto", metavar="N|auto",
                   help="CPU threads for torch (default auto: the cores this process may run on, os.sched_getaffinity, "
                   "shared among a launch's local processes; OMP_NUM_THREADS when set)")
    return p


def build_parser(command: str | None = "*") -> argparse.ArgumentParser:
    """The whole parser (``command`` "*", what the tests and the docs read), or one whose subcommands are all listed
    but only ``command``'s arguments are added (None: none of them, for `flashdmd --help`); an unknown ``command``
    gets the whole parser, so argparse's error lists the choices."""
    whole = command == "*" or command not in COMMANDS and command is not None
    p = _root_parser()
    sub = p.add_subparsers(dest="command", required=True)
    for name, (help_line, add_arguments) in COMMANDS.items():
        parser = sub.add_parser(name, help=help_line)
        if whole or name == command:
            add_arguments(parser)
    add_examples(p)
    return p


# What every `--help` ends with: one or more example commands, keyed by the subcommand's words. The examples are
# real commands (tests/test_cli_help.py parses each one with this parser).
EXAMPLES = {
    "": ["flashdmd distill --config configs/world_sdxl_flashdmd.yaml --out runs/flash"],
    "info": ["flashdmd info --model world-sdxl"],
    "world": ["flashdmd world pretrain --out /tmp/world"],
    "world pretrain": ["flashdmd world pretrain --out /tmp/world --quick"],
    "eval": ["flashdmd eval --model runs/flash --json runs/flash/eval.json",
             "flashdmd eval --model runs/sdxl --prompts captions.txt --num-images 1000 --clip clip-vit-large-patch14/ "
             "--json eval.json"],
    "eval-stats": ["flashdmd eval-stats --images coco_val/ --fid-inception pt_inception-2015-12-05-6726825d.pth "
                   "--out coco_stats.safetensors"],
    "distill": ["flashdmd distill --config configs/world_sdxl_flashdmd.yaml --out runs/flash",
                "flashdmd distill --config configs/sdxl_flashdmd.yaml --set data_real=reals/ --out runs/sdxl"],
    "plan": ["flashdmd plan --config configs/sdxl_flashdmd.yaml --processes 8 --device-memory 80GB"],
    "reward": ["flashdmd reward make-pairs --model world-sdxl --num 2000 --out pairs.jsonl"],
    "reward make-pairs": ["flashdmd reward make-pairs --model world-sdxl --num 2000 --out pairs.jsonl"],
    "reward train": ["flashdmd reward train --pairs pairs.jsonl --family-model world-sdxl --out lrm/"],
    "sample": ["flashdmd sample --model runs/flash --prompt \"a photo of a sneaker\" --out samples/"],
    "make-reals": ["accelerate launch --multi_gpu --num_processes 8 -m flashdmd.cli make-reals "
                   "--model /models/sdxl-base --prompts prompts.txt --num 100000 --dtype bf16 --out reals/",
                   "flashdmd make-reals --model world-sdxl --prompts prompts.txt --num 5000 --out reals/"],
    "export": ["flashdmd export --run runs/flash --out exported/"],
    "config-help": ["flashdmd config-help"],
    "report": ["flashdmd report runs/flash"],
    "demo": ["flashdmd demo --out runs/demo --seed 0"],
}


def _subparsers(parser: argparse.ArgumentParser, words: tuple[str, ...] = ()):
    """(words, parser) of ``parser`` and every subcommand below it, depth first."""
    yield words, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from _subparsers(child, words + (name,))


def add_examples(parser: argparse.ArgumentParser) -> None:
    """End the help of ``parser`` and of each of its subcommands with its EXAMPLES (kept as written)."""
    for words, p in _subparsers(parser):
        lines = EXAMPLES.get(" ".join(words))
        if lines:
            p.epilog = "example" + ("s" if len(lines) > 1 else "") + ":\n" + "\n".join("  " + x for x in lines)
            p.formatter_class = argparse.RawDescriptionHelpFormatter


# The subcommands' modules are imported where their arguments are added or their commands run, not at the top, and
# only the named command's arguments are added (build_parser's ``command``): this module is the face, and
# `flashdmd --help` or `flashdmd distill --help` stay as cheap as argparse (0.1 s) instead of importing torch,
# diffusers and every module that owns arguments (about 5 s).

def _args_info(info) -> None:
    from flashdmd.choices import FAMILY_NAMES
    info.add_argument("--model", required=True, help="diffusers folder, hub id, or a plug-in model name (world-sdxl / "
                      "world-sd3)")
    info.add_argument("--family", choices=sorted(FAMILY_NAMES), default=None, help="default: from model_index.json")
    info.set_defaults(func=_cmd_info)


def _args_world(world) -> None:
    wsub = world.add_subparsers(dest="world_command", required=True)
    pre = wsub.add_parser("pretrain", help="train the world's VAE, text encoders, teachers and eval nets")
    from flashdmd.world import pretrain as _pretrain
    _pretrain.add_arguments(pre)
    pre.set_defaults(func=_cmd_world_pretrain)


def _args_eval(ev) -> None:
    from flashdmd.evaluation import runner as _runner
    _runner.add_arguments(ev)
    ev.set_defaults(func=_cmd_eval)


def _args_eval_stats(est) -> None:
    from flashdmd.evaluation import real as _real
    _real.add_stats_arguments(est)
    est.set_defaults(func=_cmd_eval_stats)


def _args_distill(dist) -> None:
    dist.add_argument("--config", default=None, help="YAML preset (see configs/); default: built-in defaults")
    dist.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="override a config field (repeatable); `flashdmd config-help` lists the fields")
    dist.add_argument("--out", required=True, help="run folder (created)")
    dist.add_argument("--no-progress", action="store_true", help="no progress bar")
    dist.add_argument("--resume", default=None, metavar="latest|CHECKPOINT",
                      help="continue from the newest intact checkpoint in --out, or from a checkpoint folder")
    dist.add_argument("--overwrite", action="store_true", help="replace a run already in --out: its checkpoints, "
                      "tensorboard, samples, metrics and student are removed once every check has passed")
    dist.add_argument("--no-plan", action="store_true", help="skip the memory plan printed at start (flashdmd plan's "
                      "headline: peak memory per device and whether it fits 24/48/80/141 GB cards)")
    dist.add_argument("--dry-run", action="store_true", help="check everything the run needs (teacher, data, "
                      "evaluation backends, Pixel-GAN backbone, reward model), build every role, run one Stage-1 "
                      "iteration (and one RL update with Stage 2) at batch 1, print what was checked; writes nothing")
    dist.set_defaults(func=_cmd_distill)


def _args_plan(pl) -> None:
    from flashdmd.training import plan as _plan
    _plan.add_arguments(pl)
    pl.set_defaults(func=_cmd_plan)


def _args_reward(reward) -> None:
    rsub = reward.add_subparsers(dest="reward_command", required=True)
    mk = rsub.add_parser("make-pairs", help="sample two models' images for the same prompts and let a judge pick "
                         "(PickScore, HPSv2, ImageReward, CLIP from local weights; a plug-in model's own judge)")
    rt = rsub.add_parser("train", help="train a latent reward model on a pairs file (noisy Bradley-Terry)")
    from flashdmd.rewards import pairs as _pairs
    from flashdmd.rewards import train as _rtrain
    _pairs.add_make_pairs_arguments(mk)
    _rtrain.add_train_arguments(rt)
    mk.set_defaults(func=_cmd_reward_make_pairs)
    rt.set_defaults(func=_cmd_reward_train)


def _args_module(module: str, func):
    """The arguments of a command whose module has ``add_arguments(parser)`` (sample, make-reals, export)."""
    def add(parser) -> None:
        import importlib
        importlib.import_module(module).add_arguments(parser)
        parser.set_defaults(func=func)
    return add


def _args_config_help(ch) -> None:
    ch.set_defaults(func=_cmd_config_help)


def _args_report(rep) -> None:
    rep.add_argument("run", help="run folder")
    rep.set_defaults(func=_cmd_report)


def _args_demo(demo) -> None:
    demo.add_argument("--out", default="runs/demo", help="run folder (default runs/demo)")
    demo.add_argument("--seed", type=int, default=0,
                      help="training seed (default 0; the evaluation noise is the same for every seed, so runs of "
                           "seeds 0, 1, 2 show the spread of training alone)")
    demo.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a preset field")
    demo.set_defaults(func=_cmd_demo)


# name -> (the one-line help `flashdmd --help` lists, what adds its arguments)
COMMANDS = {
    "info": ("load a model folder through its family adapter and describe it", _args_info),
    "world": ("the embedded default world", _args_world),
    "eval": ("sample a model and measure its metrics and speed (the world's FD, alignment, diversity; or FID, CLIP "
             "score, PickScore, HPSv2, ImageReward from local weights)", _args_eval),
    "eval-stats": ("FID reference statistics (mu, sigma) of a folder of real images", _args_eval_stats),
    "distill": ("Stage 1 (and Stage 2 when configured): distil a teacher into a K-step student", _args_distill),
    "plan": ("peak memory per device of a configured run (weights, gradients, optimiser state, activations per "
             "role; one process, DDP, FSDP2), from config files alone", _args_plan),
    "reward": ("latent reward model: preference pairs and LRM training", _args_reward),
    "sample": ("write PNGs from a student run (its K steps) or a teacher (its defaults)",
               _args_module("flashdmd.sample", _cmd_sample)),
    "make-reals": ("a teacher's own images (its default steps and guidance) as a captioned image folder for "
                   "data_real: resumable, sharded over `accelerate launch` processes",
                   _args_module("flashdmd.reals", _cmd_make_reals)),
    "export": ("write a distill run as a standard diffusers pipeline folder (or LoRA file)",
               _args_module("flashdmd.export", _cmd_export)),
    "config-help": ("list every config field with its default and help text", _args_config_help),
    "report": ("(re)write DIR/report.html for a run folder", _args_report),
    "demo": ("the main job: distil the embedded teacher and write a report", _args_demo),
}


def command_word(argv: list[str]) -> str | None:
    """The subcommand ``argv`` names (its first word that is not a global option or its value), or None. The global
    options that take a value come from the root parser, each also as argparse's unambiguous abbreviation."""
    valued = [s for a in _root_parser()._actions if a.nargs != 0 for s in a.option_strings if s.startswith("--")]
    words = iter(argv)
    for w in words:
        if w.startswith("--") and "=" not in w and any(s.startswith(w) for s in valued):
            next(words, None)
        elif not w.startswith("-"):
            return w
    return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(command_word(argv)).parse_args(argv)   # --help and bad arguments end here, before imports
    from flashdmd.world import plugin as world
    world.register()  # the face chooses the embedded world: its names (world, world-sdxl, ...) resolve from here on
    if args.command != "config-help":
        set_threads(args.global_threads)
    try:
        args.func(args)
    except Preempted as e:  # a checkpoint is written: one line (main process), the signal's exit status
        if launch_rank() == 0:
            print(str(e), file=sys.stderr, flush=True)
        return 128 + e.signum
    except FlashDMDError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
