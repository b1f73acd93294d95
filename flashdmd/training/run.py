"""The run folder: resolved config, tensorboard scalars, sample grids, evaluations, the student.

    DIR/config.yaml     resolved config            DIR/run.json       what `eval`/`sample`/`export` need
    DIR/tb/             tensorboard scalars        DIR/samples/       image grids over training
    DIR/student/        the student (diffusers folder of the denoiser; LoRA: adapter safetensors)
    DIR/metrics.json    evaluations over training and the final one
Only the main process writes. Files are written to a temporary name and renamed (atomic on POSIX).
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import torch

from flashdmd import FlashDMDError

RUN_KIND = "flashdmd-distill-run"


def _atomic_write_text(path: Path, text: str):
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
    except OSError as e:  # disk full / read-only: the old file stays as it was
        tmp.unlink(missing_ok=True)
        raise FlashDMDError(f"cannot write {path}: {e.strerror or e}") from None


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


class RunWriter:
    def __init__(self, out_dir, cfg, ctx):
        self.cfg = cfg
        self.main = ctx.accelerator.is_main_process
        self.out = prepare_run_dir(out_dir) if self.main else Path(out_dir)
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}
        self.history: list[dict] = []
        self.evals: list[dict] = []
        self.lrm_scores: list[float] = []
        self.stage2_baseline: dict | None = None
        self.warnings: list[str] = []
        self.last_eval_step: int | None = None
        self.t0 = time.time()
        self.tb = None
        if self.main:
            _atomic_write_text(self.out / "config.yaml", cfg.to_yaml())
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(self.out / "tb"))
        self._fixed = None

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
        if s % self.cfg.log_every_steps:
            return
        means = self._reduce(ctx)
        for role, opt in ctx.opt.items():
            means[f"lr/{role}"] = opt.param_groups[0]["lr"]
        means["time/seconds"] = time.time() - self.t0
        if "rl/lrm_score" in means:
            self.lrm_scores.append(means["rl/lrm_score"])
        if self.main:
            for k, v in means.items():
                self.tb.add_scalar(k, v, s)
            self.history.append({"step": s, "stage": ctx.stage, "generator_steps": ctx.generator_steps,
                                 "rl_steps": ctx.rl_steps, **means})
        self.sums, self.counts = {}, {}

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
        import copy

        from flashdmd.evaluation.runner import Model
        from flashdmd.training.parallel import is_sharded, replica
        ema = ctx.student_ema.full_state() if ctx.student_ema is not None else None  # collective under FSDP
        net = replica(ctx, ctx.student)
        if net is None:
            return None
        if ema is not None:  # the EMA weights in a copy; training continues on the raw ones
            net = net if is_sharded(ctx.student) else copy.deepcopy(net)
            net.load_state_dict(ema, strict=False)
        return Model(ctx.family, net, "student", ctx.timesteps, 1.0, True)

    def maybe_sample(self, ctx, force=False):
        n = self.cfg.sample_every_steps
        if not (force or (n and ctx.global_step % n == 0)):
            return
        student = self._student_model(ctx)
        if not self.main:
            return
        from flashdmd.evaluation.report import save_grid
        from flashdmd.evaluation.runner import sample_images
        prompts = grid_prompts(self.cfg)
        was = student.net.training
        student.net.eval()
        imgs = sample_images(student, prompts, seed=1234)
        student.net.train(was)
        path = self.out / "samples" / f"step_{ctx.global_step:06d}.png"
        save_grid(imgs, path, nrow=10)
        self.tb.add_images("samples", (imgs[:20] + 1) / 2, ctx.global_step)

    def maybe_eval(self, ctx, force=False):
        n = self.cfg.eval_every_steps
        if self.cfg.data_prompts != "world" or not (force or (n and ctx.global_step % n == 0)):
            return None
        self.last_eval_step = ctx.global_step  # on every rank (start_stage2 decides on it)
        student = self._student_model(ctx)
        if not self.main:
            return None
        from flashdmd.evaluation.runner import evaluate_world
        student.net.eval()
        m = evaluate_world(student, self.cfg.eval_num_images, seed=0)
        student.net.train()
        m.update(step=ctx.global_step, stage=ctx.stage, generator_steps=ctx.generator_steps, rl_steps=ctx.rl_steps,
                 images_seen=ctx.generator_steps * self.cfg.batch_size * ctx.accelerator.num_processes,
                 wall_seconds=time.time() - self.t0)
        if ctx.stage == 2:
            self._guard(m)
        self.evals.append(m)
        for k in ("fd", "alignment", "diversity", "oracle", "hacking_warning"):
            if k in m:
                self.tb.add_scalar(f"eval/{k}", m[k], ctx.global_step)
        return m

    def start_stage2(self, ctx):
        """Evaluate the Stage-1 student once: the baseline the reward-hacking guard compares against."""
        if not self.cfg.eval_every_steps:
            return
        # the same decision on every rank (under FSDP an evaluation gathers the student: a collective)
        if self.last_eval_step == ctx.global_step:  # Stage 1 just evaluated this student
            self.stage2_baseline = self.evals[-1] if self.evals else None
        else:
            self.stage2_baseline = self.maybe_eval(ctx, force=True)

    def _guard(self, m: dict):
        """Warn when the training reward (LRM) rises while held-out quality worsens beyond the tolerance."""
        base, tol = self.stage2_baseline, self.cfg.rl_guard_tolerance
        if base is None or len(self.lrm_scores) < 2:
            return
        reward_up = self.lrm_scores[-1] > self.lrm_scores[0]
        worse = []
        if "oracle" in m and "oracle" in base and m["oracle"] < base["oracle"] - tol * abs(base["oracle"]):
            worse.append(f"held-out oracle {base['oracle']:.3f} -> {m['oracle']:.3f}")
        if m["fd"] > base["fd"] * (1 + tol):
            worse.append(f"FD {base['fd']:.2f} -> {m['fd']:.2f}")
        if m["diversity"] < base["diversity"] * (1 - tol):
            worse.append(f"diversity {base['diversity']:.3f} -> {m['diversity']:.3f}")
        m["hacking_warning"] = float(reward_up and bool(worse))
        if reward_up and worse:
            msg = (f"possible reward hacking at step {m['step']}: LRM score {self.lrm_scores[0]:.3f} -> "
                   f"{self.lrm_scores[-1]:.3f} while " + ", ".join(worse))
            self.warnings.append(msg)
            import warnings
            warnings.warn(msg, stacklevel=2)

    # -- checkpoints ----------------------------------------------------------------------------------
    def maybe_checkpoint(self, ctx, force: bool = False):
        n = self.cfg.checkpoint_every_steps
        if force or (n and ctx.global_step % n == 0):
            from flashdmd.training.checkpoint import save_checkpoint
            folder = save_checkpoint(ctx, self, self.out / "checkpoints", self.cfg.checkpoint_keep_last)
            if folder is not None:
                ctx.last_checkpoint = str(folder)
            self.save_student(ctx)

    def state_dict(self) -> dict:
        return {"history": self.history, "evals": self.evals, "lrm_scores": self.lrm_scores,
                "stage2_baseline": self.stage2_baseline, "warnings": self.warnings,
                "elapsed": time.time() - self.t0, "sums": self.sums, "counts": self.counts,
                "last_eval_step": self.last_eval_step}

    def load_state_dict(self, s: dict):
        self.history, self.evals, self.lrm_scores = s["history"], s["evals"], s["lrm_scores"]
        self.stage2_baseline, self.warnings = s["stage2_baseline"], s["warnings"]
        self.sums, self.counts = s["sums"], s["counts"]
        self.last_eval_step = s.get("last_eval_step")
        self.t0 = time.time() - s["elapsed"]

    def save_student(self, ctx):
        ctx.accelerator.wait_for_everyone()
        student = self._student_model(ctx)
        if not self.main:
            return
        net = student.net
        tmp = self.out / "student.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            if self.cfg.model_lora_rank > 0:
                from peft.utils import get_peft_model_state_dict
                from safetensors.torch import save_file
                tmp.mkdir(parents=True)
                save_file({k: v.contiguous() for k, v in get_peft_model_state_dict(net).items()},
                          str(tmp / "adapter.safetensors"))
            else:
                net.save_pretrained(tmp, safe_serialization=True)
        except OSError as e:  # disk full / read-only: the previous student (if any) stays in place
            shutil.rmtree(tmp, ignore_errors=True)
            raise FlashDMDError(f"cannot write the student to {tmp}: {e.strerror or e}") from None
        final = self.out / "student"
        old = self.out / "student.old"
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
        info = {"kind": RUN_KIND, "teacher": self.cfg.model_teacher, "family": ctx.family.name,
                "teacher_path": str(ctx.family.path), "student_timesteps": ctx.timesteps,
                "lora_rank": self.cfg.model_lora_rank, "lora_alpha": self.cfg.model_lora_alpha,
                "generator_steps": ctx.generator_steps, "rl_steps": ctx.rl_steps, "method": self.cfg.method}
        _atomic_write_text(self.out / "run.json", json.dumps(info, indent=2))

    def finish(self, ctx, wall_seconds: float) -> dict:
        self.save_student(ctx)
        if self.cfg.sample_every_steps and ctx.global_step % self.cfg.sample_every_steps:
            self.maybe_sample(ctx, force=True)
        if self.cfg.eval_every_steps and ctx.global_step % self.cfg.eval_every_steps:
            self.maybe_eval(ctx, force=True)
        result = {"generator_steps": ctx.generator_steps, "rl_steps": ctx.rl_steps, "wall_seconds": wall_seconds,
                  "history": self.history, "evals": self.evals, "warnings": self.warnings}
        if self.main:
            _atomic_write_text(self.out / "metrics.json", json.dumps(result, indent=2))
            self.tb.close()
        return result


def grid_prompts(cfg) -> list[str]:
    if cfg.data_prompts == "world":
        from flashdmd.world.prompts import eval_prompts
        return eval_prompts(20)[0]
    from flashdmd.training.data import read_prompt_file
    return (read_prompt_file(cfg.data_prompts) * 20)[:20]


def load_student(run_dir: str | Path, device="cpu"):
    """A distill run folder -> evaluation Model with the student's weights and its K steps."""
    from flashdmd.evaluation.runner import Model
    from flashdmd.families import load_family
    run_dir = Path(run_dir)
    try:
        info = json.loads((run_dir / "run.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise FlashDMDError(f"{run_dir}/run.json is unreadable ({e}); is this a flashdmd distill run folder?") from None
    if info.get("kind") != RUN_KIND:
        raise FlashDMDError(f"{run_dir}/run.json is not a flashdmd distill run")
    fam = load_family(info["teacher"], family=info["family"], device=device)
    net = _load_student_net(fam, run_dir / "student", info)
    return Model(fam, net, "student", [float(t) for t in info["student_timesteps"]], 1.0, True)


def _load_student_net(fam, folder: Path, info: dict):
    import copy
    if not folder.is_dir():
        raise FlashDMDError(f"{folder} is missing: the run has not saved a student yet")
    if info.get("lora_rank", 0) > 0:
        from peft import LoraConfig
        from peft.utils import set_peft_model_state_dict
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        from flashdmd.training.roles import LORA_TARGETS
        net = copy.deepcopy(fam.denoiser)
        net.add_adapter(LoraConfig(r=info["lora_rank"], lora_alpha=info.get("lora_alpha") or info["lora_rank"],
                                   target_modules=LORA_TARGETS))
        try:
            set_peft_model_state_dict(net, load_file(str(folder / "adapter.safetensors")))
        except (OSError, SafetensorError) as e:
            raise FlashDMDError(f"{folder}/adapter.safetensors cannot be read: {e}") from None
        return net.eval()
    cls = type(fam.denoiser)
    try:
        return cls.from_pretrained(folder, use_safetensors=True).to(fam.device).eval()
    except (OSError, ValueError) as e:
        raise FlashDMDError(f"student weights in {folder} cannot be loaded: {str(e).splitlines()[0]}") from None
