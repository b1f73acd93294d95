"""A disk that cannot take a write -- here a real kernel failure: a file-size limit (RLIMIT_FSIZE, `ulimit -f`), which
makes the write that crosses it fail with EFBIG, inside safetensors' Rust code as in Python's -- ends in one line that
names the folder and about how much space the write needs, with the partial output removed and the previous version
intact; a checkpoint that failed so leaves the previous checkpoint for `--resume latest`. (ENOSPC and EDQUOT take the
same path: flashdmd/io.py tells them apart only by errno, checked at the end.)

Python ignores SIGXFSZ (CPython sets SIG_IGN at start-up), so the limit gives an error rather than a signal; the
in-process cases set the limit around one call and lift it again.
"""
from __future__ import annotations

import contextlib
import errno
import os
import re
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import tiny_models as tm  # noqa: E402

from flashdmd import FlashDMDError, io  # noqa: E402
from flashdmd.training.checkpoint import resolve, verify  # noqa: E402
from flashdmd.training.config import DistillConfig  # noqa: E402
from flashdmd.training.distill import setup, train  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
UNITS = {"B": 1, "kB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12}
# the message's "needs about" counts the tensors' bytes; the files add safetensors' JSON headers and the JSON files
# (a few kB on a few MB here). human_bytes rounds to 0.1 of its unit: at most 0.05 / 1.0 = 5 %.
NEED_RTOL = 0.08


def stated_need(message: str) -> float:
    m = re.search(r"it needs about ([\d.]+) (B|kB|MB|GB|TB)", message)
    assert m, message
    return float(m[1]) * UNITS[m[2]]


@contextlib.contextmanager
def file_size_limit(nbytes: int):
    """RLIMIT_FSIZE of this process: no file may grow past ``nbytes`` while the block runs."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished 1-step run (full fine-tune, DMD2's latent GAN) with its checkpoint step_00000001 and student."""
    tmp = tmp_path_factory.mktemp("disk")
    teacher = tm.save_pipeline(tm.sdxl_pipeline(tmp), tmp / "sdxl")
    from PIL import Image
    (tmp / "real").mkdir()
    for i in range(4):
        Image.new("RGB", (32, 32), (40 * i, 90, 200 - 30 * i)).save(tmp / "real" / f"{i}.png")
    cfg = DistillConfig(model_teacher=str(teacher), run_batch_size=1, run_max_steps=1, disc_kind="latent",
                        disc_loss="ns",
                        data_real=str(tmp / "real"), eval_every_steps=0, run_sample_every_steps=0,
                        run_checkpoint_every_steps=1, run_log_every_steps=1, run_seed=2, student_timesteps=[999, 499])
    out = tmp / "run"
    ctx = setup(cfg)
    train(cfg, out, progress=False, ctx=ctx)
    assert verify(out / "checkpoints" / "step_00000001") is None
    return {"cfg": cfg, "ctx": ctx, "out": out, "tmp": tmp}


def test_a_full_disk_during_a_checkpoint_is_one_line_and_the_previous_one_resumes(run, tmp_path):
    """`flashdmd distill --resume latest` for one more step under a file-size limit below the size of the roles file:
    exit 2, one line naming the checkpoint folder and about the checkpoint's size, no .tmp-step_* left, step 1
    intact -- and `--resume latest` without the limit finishes."""
    import shutil
    out = tmp_path / "run"
    shutil.copytree(run["out"], out)
    previous = out / "checkpoints" / "step_00000001"
    size = sum(p.stat().st_size for p in previous.iterdir())
    limit = (previous / "roles.safetensors").stat().st_size // 2
    assert limit > 64 * 1024  # above every small file the run writes first (config, RNG states, tensorboard)
    config = tmp_path / "config.yaml"
    config.write_text(run["cfg"].to_yaml())
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "flashdmd.cli", "--threads", "1", "distill", "--config", str(config), "--out",
           str(out), "--set", "run_max_steps=2", "--resume", "latest", "--no-progress", "--no-plan"]

    def limited():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    r = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600, preexec_fn=limited)
    assert r.returncode == 2, r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, r.stderr[-3000:]
    assert errors[0].startswith(f"error: cannot write checkpoint step_00000002 to {out / 'checkpoints'}: file too "
                                "large"), errors[0]
    assert f"the last good checkpoint is {previous}" in errors[0] and "--resume latest" in errors[0], errors[0]
    assert abs(stated_need(errors[0]) - size) < NEED_RTOL * size, (errors[0], size)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000001"]
    assert verify(previous) is None and resolve(out, "latest") == previous
    cfg = DistillConfig.from_sources(str(config), ["run_max_steps=2"])
    result = train(cfg, out, progress=False, resume="latest")
    assert result["generator_steps"] == 2 and verify(out / "checkpoints" / "step_00000002") is None


def test_student_sample_grid_metrics_and_pngs_on_a_full_disk(run, tmp_path):
    """The student folder, a sample grid, a JSON record (metrics.json, run.json, config.yaml go through the same
    writer) and `flashdmd sample`'s PNGs: one line each, nothing partial left, the previous version intact."""
    from flashdmd.sample import save_png
    from flashdmd.training.run import RunWriter
    ctx, out = run["ctx"], run["out"]
    writer = RunWriter(out, run["cfg"], ctx)
    weights = out / "student" / "diffusion_pytorch_model.safetensors"
    before = weights.read_bytes()
    with file_size_limit(len(before) // 2), pytest.raises(FlashDMDError) as e:
        writer.save_student(ctx)
    msg = str(e.value)
    assert msg.startswith(f"cannot write the student to {out}: file too large") and "\n" not in msg, msg
    assert abs(stated_need(msg) - len(before)) < NEED_RTOL * len(before), (msg, len(before))
    assert weights.read_bytes() == before and not (out / "student.tmp").exists()

    with file_size_limit(2000), pytest.raises(FlashDMDError) as e:
        writer.maybe_sample(ctx, force=True)
    msg = str(e.value)
    assert msg.startswith(f"cannot write sample grid step_000001.png to {out / 'samples'}: file too large"), msg
    assert stated_need(msg) > 2000 and not list((out / "samples").glob("step_*"))

    record = out / "metrics.json"
    old = record.read_bytes()
    with file_size_limit(len(old)), pytest.raises(FlashDMDError) as e:
        io.atomic_write_text(record, "x" * (2 * len(old)))
    assert str(e.value).startswith(f"cannot write metrics.json to {out}: file too large"), str(e.value)
    assert record.read_bytes() == old and not record.with_name("metrics.json.tmp").exists()

    pixels = torch.rand(3, 64, 64) * 2 - 1
    with file_size_limit(1000), pytest.raises(FlashDMDError) as e:
        save_png(pixels, tmp_path / "0000_seed0.png")
    assert str(e.value).startswith(f"cannot write image 0000_seed0.png to {tmp_path}: file too large"), str(e.value)
    assert abs(stated_need(str(e.value)) - 64 * 64 * 3) < NEED_RTOL * 64 * 64 * 3  # the raw pixels: an upper bound
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("code,reason", [(errno.ENOSPC, "no space left on device"),
                                         (errno.EDQUOT, "disk quota exceeded")])
def test_enospc_and_edquot_read_as_a_full_disk(tmp_path, code, reason):
    """The errno decides the wording, from an OSError or from the text safetensors gives its SafetensorError."""
    from safetensors import SafetensorError
    for exc in (OSError(code, os.strerror(code)),
                SafetensorError(f"Error while serializing: I/O error: {os.strerror(code)} (os error {code})")):
        msg = str(io.write_error("checkpoint step_00000003", tmp_path, exc, need_bytes=1_234_000))
        assert msg.startswith(f"cannot write checkpoint step_00000003 to {tmp_path}: {reason} (it needs about 1.2 MB; ")
        assert "free on that filesystem" in msg
    assert not io.is_write_error(SafetensorError("You are trying to save a non contiguous tensor"))
