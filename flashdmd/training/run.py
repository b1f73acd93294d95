"""The run folder: resolved config, tensorboard scalars, sample grids, evaluations, the student.

    DIR/config.yaml     resolved config            DIR/run.json       what `eval`/`sample`/`export` need
    DIR/tb/             tensorboard scalars        DIR/samples/       image grids over training (step_*.png)
    DIR/student/        the student (diffusers folder  DIR/samples/prompts.json  the grids' prompts, row-major
                        of the denoiser; LoRA: adapter safetensors)
    DIR/metrics.json    evaluations over training and the final one, with each metric's direction
Only the main process writes. Files are written to a temporary name and renamed (atomic on POSIX); a write that
fails (full disk, quota, file-size limit) leaves the previous version, removes the partial one and stops every
process with one line naming the folder and about how many bytes it needed (flashdmd/io.py).
Scalars go to tensorboard and/or wandb (``run_report_to``; wandb through accelerate's WandBTracker).
"""
from __future__ import annotations

import json
import os
import shutil
import time
import warnings
from pathlib import Path

import torch
from accelerate.tracking import TensorBoardTracker

from flashdmd import FlashDMDError, io, runfolder
from flashdmd.evaluation import worsened
from flashdmd.evaluation.report import save_grid
from flashdmd.inference import Model, sample_images
from flashdmd.training import residency
from flashdmd.training.checkpoint import save_checkpoint
from flashdmd.training.parallel import all_true, is_sharded, replica
from flashdmd.training.roles import copy_sharing_frozen

RUN_STATE = ("run.json", "config.yaml", "metrics.json", "report.html", "student", "student.tmp", "student.old",
             "checkpoints", "tb", "samples", "wandb")


def prepare_run_dir(out_dir: str | Path) -> Path:
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-probe"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise FlashDMDError(f"cannot write to run folder {out}: {e.strerror}") from None
    return out


def clear_run_dir(out_dir: str | Path) -> list[str]:
    """``--overwrite``: remove the previous run's state (checkpoints, tensorboard, samples, metrics, student,
    run records) before the new run writes anything; other files in the folder are left alone."""
    out, removed = Path(out_dir), []
    for name in RUN_STATE:
        p = out / name
        try:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            elif p.exists() or p.is_symlink():
                p.unlink()
            else:
                continue
        except OSError as e:
            raise FlashDMDError(f"--overwrite: cannot remove {p}: {e.strerror or e}") from None
        removed.append(name)
    return removed


class RunWriter:
    """Everything a run writes into its folder. ``ctx`` in every method: the :class:`flashdmd.training.state.Run`
    being trained (read; the writer records the latest checkpoint in its state)."""

    def __init__(self, out_dir, cfg, ctx):
        self.cfg = cfg
        self.acc = ctx.accelerator
        self.main = ctx.accelerator.is_main_process
        self.out = Path(out_dir)
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}
        self.history: list[dict] = []
        self.evals: list[dict] = []
        self.lrm_scores: list[float] = []
        self.stage2_baseline: dict | None = None
        self.stage2_start_step: int | None = None
        self.warnings: list[str] = []
        self.disc_flat_logs = 0       # logged intervals in a row with D(real) - D(fake) inside disc_stall_band
        self.last_eval_step: int | None = None
        self.higher_is_better = dict(getattr(ctx.evaluator, "higher_is_better", {}) or {})
        key = cfg.eval_select_metric
        if cfg.eval_keep_students == "improved" and ctx.evaluator is not None and key not in self.higher_is_better:
            raise FlashDMDError(f"eval_keep_students: improved follows eval_select_metric {key!r}, which this run's "
                                f"evaluator does not give (it gives {', '.join(self.higher_is_better) or 'nothing'})")
        self.t0 = time.time()
        self.trackers = []
        self._on_main(lambda: self._start(cfg))

    def _start(self, cfg):
        prepare_run_dir(self.out)
        io.atomic_write_text(self.out / "config.yaml", cfg.to_yaml())
        self.trackers = open_trackers(cfg, self.out)

    # -- scalars ------------------------------------------------------------------------------------
    def accumulate(self, logs: dict):
        for k, v in logs.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v)
            self.counts[k] = self.counts.get(k, 0) + 1

    def bookkeeping(self, ctx):
        """After every student update (global step): log, sample, evaluate, checkpoint on their intervals."""
        self.maybe_log(ctx)
        self.maybe_sample(ctx)
        self.maybe_eval(ctx)
        self.maybe_checkpoint(ctx)

    def maybe_log(self, ctx):
        s = ctx.global_step
        if s % self.cfg.run_log_every_steps:
            return
        means = self._reduce(ctx)
        for role, opt in ctx.opt.items():
            means[f"lr/{role}"] = opt.param_groups[0]["lr"]
        means["time/seconds"] = time.time() - self.t0
        if ctx.real is not None:  # this process's reads of real images and the unreadable ones it skipped
            stats = ctx.real.stats()
            means["data/images_read"], means["data/bad_images"] = stats["reads"], stats["bad_files"]
        if "rl/lrm_score" in means:
            self.lrm_scores.append(means["rl/lrm_score"])
        self.watch_disc(means, s)
        if self.main:
            self._log_scalars(means, s)
            self.history.append({"step": s, "stage": ctx.stage, "generator_steps": ctx.generator_steps,
                                 "rl_steps": ctx.rl_steps, **means})
        self.sums, self.counts = {}, {}

    def watch_disc(self, means: dict, step: int):
        """Warn once when the Pixel-GAN is not learning: its mean D(real) - D(fake) has stayed inside
        +-disc_stall_band for disc_stall_logs logged intervals in a row."""
        n, band = self.cfg.disc_stall_logs, self.cfg.disc_stall_band
        if not n or "disc/D_real" not in means or "disc/D_fake" not in means:
            return
        gap = means["disc/D_real"] - means["disc/D_fake"]
        self.disc_flat_logs = self.disc_flat_logs + 1 if abs(gap) < band else 0
        if self.disc_flat_logs != n:
            return
        msg = (f"the Pixel-GAN is not learning: D(real) - D(fake) has stayed within +-{band:g} for {n} logged "
               f"intervals (to step {step}); likely causes: heads too weak for the frozen backbone's features (the "
               f"paper's patch heads; try disc_head: pooled), disc_lr too low, or a degenerate backbone (random or "
               f"wrongly loaded weights: transformers' SamVisionConfig initialises with initializer_range 1e-10)")
        self._warn(msg)

    def _warn(self, msg: str):
        """A run-level warning: kept in metrics.json (and the checkpoint) and shown once."""
        self.warnings.append(msg)
        warnings.warn(msg, stacklevel=3)

    def _log_scalars(self, values: dict, step: int):
        for tracker in self.trackers:
            tracker.log(values, step=step)

    def _reduce(self, ctx) -> dict:
        """Means over the interval, averaged across processes once (one all-reduce for all scalars)."""
        keys = sorted(self.sums)
        local = torch.tensor([[self.sums[k], self.counts[k]] for k in keys] or [[0.0, 0.0]], dtype=torch.float64,
                             device=ctx.accelerator.device)
        if ctx.accelerator.num_processes > 1:
            local = ctx.accelerator.reduce(local, reduction="sum")
        return {k: float(local[i, 0] / max(local[i, 1], 1)) for i, k in enumerate(keys)}

    # -- images and evaluation ------------------------------------------------------------------------
    def _student_model(self, ctx):
        """The student for rank-0-only work: the module itself, or under FSDP a gathered replica (a collective:
        call on every rank; other ranks get None)."""
        ema = ctx.student_ema.full_state() if ctx.student_ema is not None else None  # collective under FSDP
        net = replica(ctx.setup, ctx.student)
        if net is None:
            return None
        if ema is not None:  # the EMA weights in a copy; training continues on the raw ones
            net = net if is_sharded(ctx.student) else copy_sharing_frozen(net)  # frozen base shared
            net.load_state_dict(ema, strict=False)
        return Model(ctx.family, net, "student", ctx.timesteps, 1.0, True, ctx.resolution)

    def maybe_sample(self, ctx, force=False):
        n = self.cfg.run_sample_every_steps
        if not (force or (n and ctx.global_step % n == 0)):
            return
        student = self._student_model(ctx)
        self._on_main(lambda: self._sample(ctx, student))

    def _on_main(self, work) -> None:
        """``work()`` on the main process; a FlashDMDError there (a full disk) stops every process, not only the
        main one (one all-reduce of one flag), so that no other process waits for it in a collective."""
        error = None
        if self.main:
            try:
                work()
            except FlashDMDError as e:
                error = e
        if not all_true(error is None, self.acc.device):
            raise error or FlashDMDError("the main process stopped on an error (its message says why)")

    def _sample(self, ctx, student):
        prompts = ctx.grid_prompts
        was = student.net.training
        student.net.eval()
        with residency.phase(ctx.offload):
            imgs = sample_images(student, prompts, seed=1234)
        student.net.train(was)
        folder = self.out / "samples"
        save_grid(imgs, folder / f"step_{ctx.global_step:06d}.png", nrow=GRID_ROW)
        if not (folder / "prompts.json").is_file():
            io.atomic_write_text(folder / "prompts.json",
                                 json.dumps({"prompts": prompts, "nrow": GRID_ROW, "seed": 1234}, indent=2))
        grid = ((imgs[:GRID_IMAGES] + 1) / 2).clamp(0, 1)
        for tracker in self.trackers:  # tensorboard takes an (N, C, H, W) batch, wandb a list of HWC arrays
            images = grid if tracker.name == "tensorboard" else list(grid.permute(0, 2, 3, 1).numpy())
            tracker.log_images({"samples": images}, step=ctx.global_step)

    def maybe_eval(self, ctx, force=False):
        n = self.cfg.eval_every_steps
        if ctx.evaluator is None or not (force or (n and ctx.global_step % n == 0)):
            return None
        self.last_eval_step = ctx.global_step  # on every rank (start_stage2 decides on it)
        student = self._student_model(ctx)
        if not self.main:
            return None
        student.net.eval()
        with residency.phase(ctx.offload):  # model_offload: the VAE (and text encoders) leave after it
            m = ctx.evaluator.evaluate(student, seed=0)
        student.net.train()
        m.update(step=ctx.global_step, stage=ctx.stage, generator_steps=ctx.generator_steps, rl_steps=ctx.rl_steps,
                 images_seen=ctx.generator_steps * self.cfg.run_batch_size * ctx.accelerator.num_processes,
                 wall_seconds=time.time() - self.t0)
        if ctx.stage == 2:
            self._guard(m)
        self.evals.append(m)
        self._keep_student(ctx, student, m)
        shown = [k for k in m if k in self.higher_is_better or k == "hacking_warning"]
        self._log_scalars({f"eval/{k}": m[k] for k in shown}, ctx.global_step)
        return m

    def start_stage2(self, ctx):
        """Evaluate the Stage-1 student once: the baseline the reward-hacking guard compares against."""
        self.stage2_start_step = ctx.global_step  # the report marks it
        if ctx.evaluator is None:
            warnings.warn("Stage 2 without held-out metrics: the reward-hacking guard has nothing to compare the "
                          "training reward with (set eval_prompts and a metric backend)", stacklevel=2)
            return
        # the same decision on every rank (under FSDP an evaluation gathers the student: a collective)
        if self.last_eval_step == ctx.global_step:  # Stage 1 just evaluated this student
            self.stage2_baseline = self.evals[-1] if self.evals else None
        else:
            self.stage2_baseline = self.maybe_eval(ctx, force=True)

    def _guard(self, m: dict):
        """Warn when the training reward (LRM) rises while any held-out metric worsens beyond the tolerance
        (each metric's direction from the evaluator's ``higher_is_better``)."""
        base = self.stage2_baseline
        if base is None or len(self.lrm_scores) < 2:
            return
        reward_up = self.lrm_scores[-1] > self.lrm_scores[0]
        worse = worsened(base, m, self.higher_is_better, self.cfg.rl_guard_tolerance)
        m["hacking_warning"] = float(reward_up and bool(worse))
        if reward_up and worse:
            msg = (f"possible reward hacking at step {m['step']}: LRM score {self.lrm_scores[0]:.3f} -> "
                   f"{self.lrm_scores[-1]:.3f} while " + ", ".join(worse))
            self._warn(msg)

    # -- checkpoints ----------------------------------------------------------------------------------
    def maybe_checkpoint(self, ctx, force: bool = False, name: str | None = None):
        """A checkpoint (and the student) on the checkpoint interval, or now with ``force``; ``name``: the
        checkpoint's folder name (default: the global step's)."""
        n = self.cfg.run_checkpoint_every_steps
        if force or (n and ctx.global_step % n == 0):
            folder = save_checkpoint(ctx, self, self.out / "checkpoints", self.cfg.run_checkpoint_keep_last, name=name)
            if folder is not None:
                ctx.state.last_checkpoint = str(folder)
            self.save_student(ctx)

    def state_dict(self) -> dict:
        """What a checkpoint keeps of the writer. A collective with several processes: the scalars accumulated
        since the last log are summed over the processes (the main process keeps them; see load_state_dict)."""
        sums, counts = self.sums, self.counts
        if self.acc.num_processes > 1:
            keys = sorted(self.sums)  # the same keys on every process: every process runs the same phases
            local = torch.tensor([[self.sums[k], self.counts[k]] for k in keys] or [[0.0, 0.0]], dtype=torch.float64,
                                 device=self.acc.device)
            total = self.acc.reduce(local, reduction="sum").cpu()
            sums = {k: float(total[i, 0]) for i, k in enumerate(keys)}
            counts = {k: int(total[i, 1]) for i, k in enumerate(keys)}
        return {"history": self.history, "evals": self.evals, "lrm_scores": self.lrm_scores,
                "stage2_baseline": self.stage2_baseline, "stage2_start_step": self.stage2_start_step,
                "warnings": self.warnings, "disc_flat_logs": self.disc_flat_logs,
                "elapsed": time.time() - self.t0, "sums": sums, "counts": counts,
                "last_eval_step": self.last_eval_step}

    def load_state_dict(self, s: dict):
        """The saved sums of the interval being logged are totals over the processes: the main process continues
        them and the others start from zero under the same keys, so the next log's all-reduce gives the totals on
        any number of processes."""
        self.history, self.evals, self.lrm_scores = s["history"], s["evals"], s["lrm_scores"]
        self.stage2_baseline, self.warnings = s["stage2_baseline"], s["warnings"]
        self.stage2_start_step = s.get("stage2_start_step")
        self.disc_flat_logs = s.get("disc_flat_logs", 0)
        self.sums, self.counts = dict(s["sums"]), dict(s["counts"])
        if not self.main:
            self.sums, self.counts = dict.fromkeys(self.sums, 0.0), dict.fromkeys(self.counts, 0)
        self.last_eval_step = s.get("last_eval_step")
        self.t0 = time.time() - s["elapsed"]

    def close(self) -> None:
        """Flush and close the trackers (the run stops here without finish: preemption)."""
        for tracker in self.trackers:
            tracker.finish()
        self.trackers = []

    def save_student(self, ctx):
        ctx.accelerator.wait_for_everyone()
        student = self._student_model(ctx)
        self._on_main(lambda: self._write_student(ctx, student))

    def _keep_student(self, ctx, student, m: dict) -> None:
        """eval_keep_students: the evaluated student as the run folder OUT/students/step_N (every evaluation, or
        when eval_select_metric is the best so far)."""
        keep, key = self.cfg.eval_keep_students, self.cfg.eval_select_metric
        if keep == "none":
            return
        if keep == "improved":
            if key not in m:
                return
            sign = 1.0 if self.higher_is_better[key] else -1.0
            if any(sign * e[key] >= sign * m[key] for e in self.evals[:-1] if key in e):
                return
        self._write_student(ctx, student, self.out / "students" / f"step_{ctx.global_step:08d}")

    def _write_student(self, ctx, student, out: Path | None = None):
        """DIR/student written whole (the previous one stays until the new one is complete), then DIR/run.json."""
        out = self.out if out is None else out
        runfolder.write_student(out, student.net, self.cfg.model_lora_rank)
        runfolder.write_record(out, teacher=self.cfg.model_teacher, family=ctx.family.name,
                               teacher_path=str(ctx.family.path), student_timesteps=ctx.timesteps,
                               resolution=ctx.resolution, embedded_guidance=self.cfg.model_embedded_guidance,
                               lora_rank=self.cfg.model_lora_rank, lora_alpha=self.cfg.model_lora_alpha,
                               generator_steps=ctx.generator_steps, rl_steps=ctx.rl_steps, method=self.cfg.method)

    def finish(self, ctx, wall_seconds: float) -> dict:
        self.save_student(ctx)
        if self.cfg.run_sample_every_steps and ctx.global_step % self.cfg.run_sample_every_steps:
            self.maybe_sample(ctx, force=True)
        if self.cfg.eval_every_steps and ctx.global_step % self.cfg.eval_every_steps:
            self.maybe_eval(ctx, force=True)
        result = {"generator_steps": ctx.generator_steps, "rl_steps": ctx.rl_steps, "wall_seconds": wall_seconds,
                  "history": self.history, "evals": self.evals, "warnings": self.warnings,
                  "higher_is_better": self.higher_is_better, "stage2_start_step": self.stage2_start_step}
        self._on_main(lambda: io.atomic_write_text(self.out / "metrics.json", json.dumps(result, indent=2)))
        self.close()
        return result


GRID_ROW = 10      # images per row of a sample grid
GRID_IMAGES = 20   # images per sample grid (two rows of ten); training/distill.py picks that many prompts


def open_trackers(cfg, out: Path) -> list:
    """accelerate's trackers for ``run_report_to``: TensorBoardTracker writing DIR/tb (the default) and/or
    WandBTracker (project ``run_wandb_project``, run name = the run folder's name, files under DIR/wandb)."""
    trackers = []
    if "tensorboard" in cfg.run_report_to:
        trackers.append(TensorBoardTracker("tb", str(out)))
        trackers[-1].start()
    if "wandb" in cfg.run_report_to:
        try:  # lazy: wandb is an optional package (and accelerate's tracker imports it)
            from accelerate.tracking import WandBTracker
            import wandb  # noqa: F401
        except ImportError:
            raise FlashDMDError("run_report_to has wandb but wandb is not installed: `pip install wandb`, or drop it "
                                "from run_report_to") from None
        os.environ.setdefault("WANDB_DIR", str(out))
        tracker = WandBTracker(cfg.run_wandb_project, name=out.resolve().name, dir=str(out))
        tracker.start()
        tracker.store_init_configuration(cfg.to_dict())
        trackers.append(tracker)
    return trackers


