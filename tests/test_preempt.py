"""Preemption: SIGTERM or SIGUSR1 -> the run finishes the iteration it is in, writes a checkpoint, says so in one
line and stops (exit 128 + signal); `--resume latest` then ends with every trainable tensor and optimiser state
bitwise equal to an uninterrupted run's (same process or same machine and thread count: bitwise is what holds).

One tiny run (SDXL, batch 1, TTUR 2, DMD2's latent GAN, 2 generator steps, then Stage 2 with 2 RL updates each
followed by a distillation cycle) is the reference. Signals are real: in-process ones are sent with os.kill at a
chosen iteration (so that the checkpoint lands where the old code had no checkpoint: after a critic-only
iteration, and after an RL update that a distillation cycle follows); the CLI case sends SIGTERM to a running
`flashdmd distill` from outside once its first checkpoint exists, wherever it then is.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import tiny_models as tm  # noqa: E402
from kill_worker import final_tensors  # noqa: E402

from flashdmd import Preempted  # noqa: E402
from flashdmd.families import load_family  # noqa: E402
from flashdmd.networks.reward import LatentRewardModel  # noqa: E402
from flashdmd.training import distill, stage1, stage2  # noqa: E402
from flashdmd.training.checkpoint import resolve, verify  # noqa: E402
from flashdmd.training.config import DistillConfig  # noqa: E402
from flashdmd.training.distill import setup, train  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
LINE = re.compile(r"^preempted by (SIG\w+) at step (\d+) \(iteration (\d+)(?:, RL update (\d+))?\): checkpoint written "
                  r"to (\S+); continue with --resume latest$")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The config (also as a YAML file for the CLI) and the final tensors of its uninterrupted run."""
    tmp = tmp_path_factory.mktemp("preempt")
    teacher = tm.save_pipeline(tm.sdxl_pipeline(tmp), tmp / "sdxl")
    torch.manual_seed(0)
    LatentRewardModel(load_family(teacher), proj_dim=16, hidden_dim=16).save(tmp / "lrm")
    from PIL import Image
    (tmp / "real").mkdir()
    for i in range(4):
        Image.new("RGB", (32, 32), (40 * i, 90, 200 - 30 * i)).save(tmp / "real" / f"{i}.png")
    cfg = DistillConfig(model_teacher=str(teacher), run_batch_size=1, run_max_steps=2, fake_score_ttur=2,
                        disc_kind="latent",
                        disc_loss="ns", data_real=str(tmp / "real"), eval_every_steps=0, run_sample_every_steps=0,
                        run_checkpoint_every_steps=2, run_checkpoint_keep_last=20, run_log_every_steps=1, run_seed=5,
                        student_timesteps=[999, 499], student_lr=1e-3, fake_score_lr=1e-3, rl_enabled=True,
                        rl_reward_model=str(tmp / "lrm"), rl_steps=2, rl_distill_ratio=1, rl_num_candidates=2,
                        rl_step_indices=[0])
    (tmp / "config.yaml").write_text(cfg.to_yaml())
    ctx = setup(cfg)
    result = train(cfg, tmp / "reference", progress=False, ctx=ctx)
    assert result["rl_steps"] == 2 and ctx.iteration == 8  # 4 Stage-1 iterations + 2 cycles of 2
    return {"cfg": cfg, "tmp": tmp, "final": final_tensors(ctx)}


def tensors_equal(a: dict, b: dict):
    assert a.keys() == b.keys() and any(k.startswith("reference/") for k in a), sorted(set(a) ^ set(b))[:5]
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)} of {len(a)} tensors differ from the uninterrupted run, e.g. {differ[:3]}"


def resume_and_compare(run, out: Path, folder: Path):
    """--resume latest picks ``folder`` and finishes bitwise equal to the uninterrupted run."""
    assert resolve(out, "latest") == folder
    ctx = setup(run["cfg"])
    train(run["cfg"], out, progress=False, ctx=ctx, resume="latest")
    tensors_equal(run["final"], final_tensors(ctx))


@pytest.mark.parametrize("sig,where,expect", [
    # the second Stage-1 iteration updates only the critics (TTUR 2): global step 1, iteration 2
    (signal.SIGUSR1, ("iteration", 1), ("step_00000001_iter00000002", 1, 2, 0)),
    # the first RL update (global step 3), which a distillation cycle follows: the resume must run that cycle
    (signal.SIGTERM, ("rl_update", 0), ("step_00000003", 3, 4, 1)),
], ids=["SIGUSR1-critic-iteration", "SIGTERM-RL-update"])
def test_a_signal_checkpoints_the_iteration_and_resume_is_bitwise(run, tmp_path, monkeypatch, sig, where, expect):
    kind, at = where
    real_iteration, real_rl_step = distill.distill_iteration, stage2.rl_step

    def iteration(ctx, writer):
        if kind == "iteration" and ctx.iteration == at:
            os.kill(os.getpid(), sig)  # arrives while the iteration runs
        return real_iteration(ctx, writer)

    def rl_step(ctx, *args, **kwargs):
        if kind == "rl_update" and ctx.rl_steps == at:
            os.kill(os.getpid(), sig)
        return real_rl_step(ctx, *args, **kwargs)
    monkeypatch.setattr(stage1, "distill_iteration", iteration)  # the Stage-1 loop's
    monkeypatch.setattr(stage2, "distill_iteration", iteration)  # Stage 2's distillation cycles
    monkeypatch.setattr(stage2, "rl_step", rl_step)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    out = tmp_path / "run"
    with pytest.raises(Preempted) as stopped:
        train(run["cfg"], out, progress=False)
    assert {s: signal.getsignal(s) for s in handlers} == handlers  # the run's handlers are gone again
    assert stopped.value.signum == sig
    name, step, iteration_no, rl = expect
    m = LINE.match(str(stopped.value))
    assert m, str(stopped.value)
    assert (m[1], int(m[2]), int(m[3]), int(m[4] or 0)) == (sig.name, step, iteration_no, rl)
    folder = Path(m[5])
    assert folder == out / "checkpoints" / name and verify(folder) is None
    state = json.loads((folder / "state.json").read_text())
    assert (state["global_step"], state["iteration"], state["rl_steps"]) == (step, iteration_no, rl)
    monkeypatch.undo()
    resume_and_compare(run, out, folder)


def test_sigterm_to_a_running_distill(run, tmp_path):
    """`flashdmd distill` signalled from outside: exit 143, the one line on stderr, no traceback, a verified
    checkpoint of the iteration it names; the resume finishes bitwise equal to the uninterrupted run."""
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "flashdmd.cli", "--threads", str(torch.get_num_threads()), "distill", "--config",
           str(run["tmp"] / "config.yaml"), "--out", str(out), "--no-progress", "--no-plan"]
    logs = {name: tmp_path / f"{name}.txt" for name in ("stdout", "stderr")}  # files: a full pipe would block it
    with open(logs["stdout"], "w") as o, open(logs["stderr"], "w") as e:
        proc = subprocess.Popen(cmd, stdout=o, stderr=e, text=True, env=env, cwd=REPO)
    first = out / "checkpoints" / "step_00000002"
    end = time.monotonic() + 300
    while not first.is_dir() and proc.poll() is None and time.monotonic() < end:
        time.sleep(0.02)
    if not first.is_dir():
        proc.kill()
        proc.wait()
        raise AssertionError(f"no checkpoint of step 2; stderr:\n{logs['stderr'].read_text()[-3000:]}")
    proc.send_signal(signal.SIGTERM)  # 1 iteration, 2 RL updates and their 4 iterations are left: it is still going
    proc.wait(timeout=300)
    stdout, stderr = logs["stdout"].read_text(), logs["stderr"].read_text()
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    lines = [ln for ln in (stdout + stderr).splitlines() if ln.startswith("preempted by")]
    assert len(lines) == 1 and "Traceback" not in stderr and "error:" not in stderr, stderr[-3000:]
    m = LINE.match(lines[0])
    assert m and m[1] == "SIGTERM", lines[0]
    folder = Path(m[5])
    assert verify(folder) is None
    state = json.loads((folder / "state.json").read_text())
    assert (state["global_step"], state["iteration"], state["rl_steps"]) == (int(m[2]), int(m[3]), int(m[4] or 0))
    resume_and_compare(run, out, folder)
