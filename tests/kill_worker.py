"""A tiny distill run for tests/test_kill_resume.py, meant to be killed with SIGKILL at any moment.

    python tests/kill_worker.py TEACHER OUT --final FILE [--resume] [--data-real DIR]
    python tests/kill_worker.py --serve TEACHER      (what the test uses, see below)

Trains a tiny config (batch 2, student steps [999, 499], 6 generator steps, latent discriminator, a checkpoint after
every step, the last 2 kept) into OUT, resuming from ``latest`` with ``--resume``; at the end writes every trainable
tensor of every role and every optimiser tensor to FILE (safetensors, written to FILE.tmp then renamed).

Progress markers on stdout (one per line, flushed) let the test kill at a chosen moment:
``ready`` (set-up done, training starts), ``saved step_XXXXXXXX`` (a checkpoint is complete), ``write NAME/FILE``
(a file of a checkpoint being written), ``delete NAME/FILE`` (a file of a checkpoint being deleted), ``done``.

``--serve``: a fork server. Importing torch / diffusers / transformers costs many seconds on a loaded machine, so
the server imports (and loads the teacher once, to warm every lazy import and the file cache) and then, for each
JSON line on stdin ``{"out", "final", "resume", "data_real", "env"}``, forks one training process, prints
``started PID``, and when it ends ``exit PID RC`` (RC -9 after SIGKILL). Each forked child is a fresh training
process: the server never trains, so a child inherits imports only. The child runs with 1 torch thread.

Slow-motion hooks, for this process only (environment variables, so the training code itself is unchanged):
    KILLTEST_SLOW_WRITE_STEP=N   after each file written into checkpoint N's temporary folder, print and sleep
    KILLTEST_SLOW_DELETE=1       delete complete checkpoint folders one file at a time, printing and sleeping
    KILLTEST_SLEEP=S             the sleep, seconds (default 0.5)
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def say(msg: str):
    print(msg, flush=True)


def install_hooks():
    import flashdmd.training.checkpoint as ck
    sleep = float(os.environ.get("KILLTEST_SLEEP", "0.5"))

    slow_step = os.environ.get("KILLTEST_SLOW_WRITE_STEP")
    if slow_step:
        slow_dir = f".tmp-{ck.PREFIX}{int(slow_step):08d}"

        def slowly(write):
            def wrapped(path, obj):
                write(path, obj)
                if Path(path).parent.name == slow_dir:
                    say(f"write {Path(path).parent.name}/{Path(path).name}")
                    time.sleep(sleep)
            return wrapped
        ck._write_tensors = slowly(ck._write_tensors)
        ck._write_json = slowly(ck._write_json)

    if os.environ.get("KILLTEST_SLOW_DELETE"):
        real_rmtree = shutil.rmtree

        def slow_rmtree(path, *args, **kwargs):
            p = Path(path)
            if p.is_dir() and (p / "manifest.json").is_file():  # a complete checkpoint being deleted
                for f in sorted(p.iterdir()):
                    say(f"delete {p.name}/{f.name}")
                    time.sleep(sleep)
                    f.unlink()
            return real_rmtree(path, *args, **kwargs)
        shutil.rmtree = slow_rmtree

    real_save = ck.save_checkpoint

    def save_and_report(ctx, writer, root, keep_last, **kwargs):
        folder = real_save(ctx, writer, root, keep_last, **kwargs)
        if folder is not None:
            say(f"saved {Path(folder).name}")
        return folder
    ck.save_checkpoint = save_and_report


def config(teacher: str, data_real: str):
    from flashdmd.training.config import DistillConfig
    from flashdmd.world import plugin
    plugin.register()  # the worker chooses the embedded world, as the CLI does
    return DistillConfig(model_teacher=teacher, run_batch_size=2, run_max_steps=6, student_timesteps=[999, 499],
                         disc_kind="latent", disc_loss="ns", data_real=data_real, eval_every_steps=0,
                         run_sample_every_steps=0, run_checkpoint_every_steps=1, run_checkpoint_keep_last=2,
                             run_log_every_steps=1,
                         student_lr=1e-3, fake_score_lr=1e-3, run_seed=11)


def final_tensors(ctx) -> dict:
    from flashdmd.training.checkpoint import _OPT_MODULE, _optim_split, _role_tensors
    from flashdmd.training.parallel import full_optimizer_state
    out = {}
    for role, part in _role_tensors(ctx).items():
        for k, v in part.items():
            out[f"{role}/{k}"] = v.detach().cpu().contiguous().clone()
    for role, opt in ctx.opt.items():
        for k, v in _optim_split(full_optimizer_state(getattr(ctx, _OPT_MODULE[role]), opt))[0].items():
            out[f"optim.{role}/{k}"] = v.detach().cpu().contiguous().clone()
    return out


def run(teacher: str, out: str, final: str, resume: bool, data_real: str) -> None:
    import torch
    from safetensors.torch import save_file

    from flashdmd.training.distill import setup, train
    torch.set_num_threads(1)
    install_hooks()
    cfg = config(teacher, data_real)
    ctx = setup(cfg)
    say("ready")
    train(cfg, out, progress=False, ctx=ctx, resume="latest" if resume else None)
    tensors = final_tensors(ctx)
    meta = {"generator_steps": str(ctx.generator_steps), "iteration": str(ctx.iteration)}
    tmp = final + ".tmp"
    save_file(tensors, tmp, metadata=meta)
    os.replace(tmp, final)
    say("done")


def serve(teacher: str) -> None:
    import json
    import traceback

    import torch
    import tqdm
    tqdm.tqdm.monitor_interval = 0  # no tqdm monitor thread in the server: forking with threads alive is unsafe
    torch.set_num_threads(1)
    import flashdmd.training.checkpoint  # noqa: F401
    import flashdmd.training.distill  # noqa: F401
    import flashdmd.training.run  # noqa: F401
    from flashdmd.families import load_family
    load_family(teacher)  # warm: lazy diffusers / transformers imports, the page cache
    say("server-ready")
    for line in sys.stdin:
        if not line.strip():
            continue
        job = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the training process
            rc = 0
            try:
                os.environ.update(job.get("env", {}))
                run(teacher, job["out"], job["final"], job.get("resume", False), job.get("data_real", "world"))
            except BaseException:
                traceback.print_exc()
                rc = 1
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(rc)
        say(f"started {pid}")
        _, status = os.waitpid(pid, 0)
        say(f"exit {pid} {os.waitstatus_to_exitcode(status)}")


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "--serve":
        return serve(sys.argv[2])
    ap = argparse.ArgumentParser()
    ap.add_argument("teacher")
    ap.add_argument("out")
    ap.add_argument("--final", required=True)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--data-real", default="world")
    args = ap.parse_args()
    run(args.teacher, args.out, args.final, args.resume, args.data_real)


if __name__ == "__main__":
    sys.exit(main())
