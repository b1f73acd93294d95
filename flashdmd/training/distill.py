"""``flashdmd distill``: a run from its config to its student -- Stage 1, then Stage 2 when enabled.

    train(cfg, out):
        refuse a folder that holds a run (unless --resume / --overwrite); check a checkpoint to resume from
        run = setup(cfg)                                 every check first (training/setup.py)
        resume: build what the checkpoint's stage needs (Stage 2: reference, reward, RL optimiser), restore the state
        run_stage1(run)                                  training/stage1.py: distill_iteration x iterations
        Stage 2: enter (EMA -> student, reference, reward, baseline evaluation), run_stage2   (training/stage2.py)
        the student, the last sample grid and evaluation, metrics.json             (training/run.py: RunWriter)

:func:`dry_run` is ``flashdmd distill --dry-run``. The names tests and scripts use (``setup``, ``distill_iteration``,
``generator_step``, ...) are re-exported here.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from pathlib import Path

from flashdmd import FlashDMDError, launch_rank
from flashdmd.training import preempt, stage2
from flashdmd.training.checkpoint import check_global_batch, load_checkpoint, read_state, resolve
from flashdmd.training.config import DistillConfig
from flashdmd.training.optim import lr_factor, step_schedulers, STAGE1_SCHEDULERS  # noqa: F401 (re-exported)
from flashdmd.training.run import RunWriter, clear_run_dir
from flashdmd.training.setup import RunSetup, build, holds_run, make_accelerator  # noqa: F401 (re-exported)
from flashdmd.training.stage1 import distill_iteration, run_stage1
from flashdmd.training.stage2 import setup_stage2
from flashdmd.training.state import Run, TrainState  # noqa: F401 (re-exported)
from flashdmd.training.steps import (after_student_update, discriminator_step, encode, fake_score_step,  # noqa: F401
                                     generator_step, real_batch, rollout)

setup = build          # distill.setup(cfg) -> Run: the set-up and the initial state (training/setup.py)
Context = Run          # the name before the set-up / state split
_encode = encode
_real_batch = real_batch


def _print_on_rank0(line: str) -> None:
    """One copy of a set-up line under torchrun, before the accelerator that knows the rank exists."""
    if launch_rank() == 0:
        print(line, flush=True)


def train(cfg: DistillConfig, out_dir: str | Path, *, progress: bool = True, accelerator=None,
          max_iterations: int | None = None, ctx: Run | None = None, resume: str | None = None,
          overwrite: bool = False) -> dict:
    """Stage 1 for ``cfg.run_max_steps`` generator steps (or ``max_iterations`` iterations), then Stage 2 when
    ``cfg.rl_enabled``, into ``out_dir``. ``resume``: "latest" or a checkpoint folder. A folder that already
    holds a run is refused unless ``resume`` or ``overwrite``. ``ctx`` lets a caller (tests) pass a run built by
    :func:`setup`."""
    folder = _check_out_dir(cfg, out_dir, resume, overwrite, ctx.accelerator if ctx is not None else accelerator)
    run = ctx or build(cfg, accelerator, log=_print_on_rank0)  # what the set-up chose: teacher, dtypes, data
    acc = run.setup.accelerator
    if overwrite and acc.is_main_process:  # every check passed: now the old run's state goes
        removed = clear_run_dir(out_dir)
        if removed:
            print(f"--overwrite: removed the previous run's {', '.join(removed)} from {out_dir}")
    acc.wait_for_everyone()
    writer_state = _restore(run, folder) if folder is not None else None  # another config fails here, folder kept
    writer = RunWriter(out_dir, cfg, run)
    if folder is not None:
        writer.load_state_dict(writer_state)
        run.state.last_checkpoint = str(folder)
        if acc.is_main_process:
            print(f"resumed from {folder} at step {run.state.global_step} (stage {run.state.stage})")
    t0 = time.time()
    total = cfg.run_max_steps * cfg.fake_score_ttur
    if max_iterations is not None:
        total = min(total, max_iterations)
    real = run.setup.real
    # SIGTERM / SIGUSR1: checkpoint after the iteration, raise Preempted; the data-loader workers stop when training
    # ends, however it ends (left to the interpreter's exit, their shutdown took seconds)
    with preempt.watch() as signalled, contextlib.nullcontext() if real is None else real:
        if run.state.global_step == 0 and cfg.eval_every_steps:
            writer.maybe_eval(run, force=True)  # the curve starts at the initial student (the teacher's weights)
        run_stage1(run, writer, total, progress, signalled)
        if cfg.rl_enabled and max_iterations is None:
            if run.state.stage == 1:
                stage2.enter(run, writer)
            stage2.run_stage2(run, writer, progress, signalled)
        return writer.finish(run, wall_seconds=time.time() - t0)


def _check_out_dir(cfg: DistillConfig, out_dir, resume: str | None, overwrite: bool, accelerator) -> Path | None:
    """The checks before anything is loaded or written: --resume / --overwrite, a folder that holds a run, the
    checkpoint to resume from (intact, and of this global batch). Returns that checkpoint's folder or None."""
    if resume and overwrite:
        raise FlashDMDError("--resume and --overwrite exclude each other: continue the run, or replace it")
    if not resume and not overwrite and holds_run(Path(out_dir)):
        raise FlashDMDError(f"{out_dir} already holds a run: continue it with --resume latest, choose another --out, "
                            "or pass --overwrite to replace it")
    if not resume:
        return None
    folder = resolve(Path(out_dir), resume)
    # another global batch fails before any model is loaded (the launcher sets WORLD_SIZE)
    processes = accelerator.num_processes if accelerator is not None else int(os.environ.get("WORLD_SIZE", "1"))
    check_global_batch(folder, read_state(folder), cfg.run_batch_size, processes)
    return folder


def _restore(run: Run, folder: Path) -> dict:
    """Build what the checkpoint's stage needs (Stage 2: the reference, the reward model and the RL optimiser,
    which the checkpoint's tensors then fill), restore the state; returns the run writer's saved state."""
    if read_state(folder)["stage"] == 2 and run.setup.reference is None:
        setup_stage2(run)
    return load_checkpoint(run, None, folder)


def dry_run(cfg: DistillConfig, log=print, accelerator=None) -> None:
    """``flashdmd distill --dry-run``: every check :func:`setup` makes, every role built, one Stage-1 iteration
    (a generator update with its critic updates) and, with Stage 2 enabled, one RL update, all at batch 1 with
    nothing written. Raises FlashDMDError on the first problem."""
    t0 = time.time()
    small = dataclasses.replace(cfg, run_batch_size=1, disc_calibration_images=min(cfg.disc_calibration_images, 4))
    run = build(small, accelerator, log=log)
    sink = _NullWriter()
    for _ in range(small.fake_score_ttur):  # the first iteration updates the generator, the rest the critics
        distill_iteration(run, sink)
    log(f"stage 1: one generator update and {small.fake_score_ttur} critic update(s) at batch 1")
    if small.rl_enabled:
        setup_stage2(run)
        one = run.setup.prompts.sample(1, run.state.rng)
        stage2.rl_step(run, encode(run, one), one)
        log("stage 2: one RL update at batch 1")
    if run.setup.real is not None:
        run.setup.real.close()
    log(f"dry run passed in {time.time() - t0:.1f} s: nothing was written")


class _NullWriter:
    """The run writer's interface, writing nothing (dry runs)."""
    def accumulate(self, logs: dict):
        pass

    def bookkeeping(self, run):
        pass


class _WriterState:
    """Holds the run writer's state from a checkpoint until the writer exists (tests, benchmarks)."""
    state: dict | None = None

    def load_state_dict(self, s: dict):
        self.state = s
