"""Bad input through the command line: every case exits 2 with exactly one `error: ...` line on stderr that names
the problem, no traceback, and leaves every file that existed before untouched.

Table-driven: each case builds its inputs in its own tmp folder and returns a :class:`Case`. Cases run in-process
(``flashdmd.cli.main``, stderr from capsys) unless marked ``subprocess`` (the real ``python -m flashdmd.cli``, to see
what a user sees). Progress-bar lines (tqdm, from transformers' weight loading) and transformers' import notices may
share stderr; the assertions are on the ``error:`` lines and on the absence of "Traceback".

Cases that get as far as training use a tiny SDXL pipeline and a 1-step config so they fail fast.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import tiny_models as tm  # noqa: E402

from flashdmd.cli import main  # noqa: E402
from flashdmd.training.checkpoint import verify  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RES = 32  # the tiny SDXL pipeline's default resolution (UNet sample 16 x VAE factor 2)
NOISE = re.compile(r"(\d+%\|)|(it/s\])|(s/it\])|(^\[transformers\])|(^\s*$)")


# ---------------------------------------------------------------------------------------------------
# fixtures

@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad_input_teacher")
    return tm.save_pipeline(tm.sdxl_pipeline(tmp), tmp / "sdxl")


@pytest.fixture(scope="module")
def latent_run(teacher, tmp_path_factory):
    """A finished 1-step run (latent discriminator) with its checkpoint step_00000001."""
    from flashdmd.training.config import DistillConfig
    from flashdmd.training.distill import train
    run = tmp_path_factory.mktemp("bad_input_run") / "run"
    cfg = DistillConfig(**{**base_config(teacher), "disc_kind": "latent"})
    train(cfg, run, progress=False)
    assert verify(run / "checkpoints" / "step_00000001") is None
    return run


def base_config(teacher) -> dict:
    return dict(model_teacher=str(teacher), run_batch_size=2, run_max_steps=1, disc_kind="none", eval_every_steps=0,
                run_sample_every_steps=0, student_timesteps=[999, 499], run_checkpoint_every_steps=1,
                    run_log_every_steps=1)


# ---------------------------------------------------------------------------------------------------
# the table

@dataclass
class Case:
    argv: list[str]
    match: str                       # regex the error line must contain (names the problem)
    keep: list[Path] = field(default_factory=list)   # files / folders whose existing bytes must survive
    patch: Callable | None = None    # patch(monkeypatch) before running (in-process only)
    usage: bool = False              # argparse usage error (its own 'prog: error:' format, still exit 2)
    subprocess: bool = False         # run as `python -m flashdmd.cli`
    new_files_ok: bool = False       # the run started: new files in `keep` folders are allowed (not changed ones)
    after: Callable | None = None    # extra checks after the run


class Env:
    """One case's inputs: ``tmp`` (its own folder), the tiny ``teacher``, ``out`` (a run folder that already
    holds a user's files), and the finished ``latent_run`` fixture, built lazily."""

    def __init__(self, tmp: Path, teacher: Path, request):
        self.tmp, self.teacher, self._request = tmp, teacher, request
        self.out = tmp / "out"
        self.out.mkdir()
        (self.out / "keep.txt").write_text("the user's notes\n")
        (self.out / "sub").mkdir()
        (self.out / "sub" / "data.bin").write_bytes(bytes(range(256)) * 4)

    @property
    def latent_run(self) -> Path:
        return self._request.getfixturevalue("latent_run")

    def file(self, name: str, data: bytes | str) -> Path:
        p = self.tmp / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data.encode() if isinstance(data, str) else data)
        return p

    def distill(self, *sets: str, config: Path | None = None, out: Path | None = None, extra=()) -> list[str]:
        argv = ["distill", "--no-progress", "--no-plan", "--out", str(out or self.out)]
        if config is not None:
            argv += ["--config", str(config)]
        for k, v in base_config(self.teacher).items():
            argv += ["--set", f"{k}={v}"]
        for s in sets:
            argv += ["--set", s]
        return argv + list(extra)

    def teacher_copy(self) -> Path:
        dst = self.tmp / "teacher_copy"
        shutil.copytree(self.teacher, dst)
        return dst

    def image_folder(self, name: str, sizes: list[int]) -> Path:
        from PIL import Image
        d = self.tmp / name
        d.mkdir()
        for i, s in enumerate(sizes):
            Image.new("RGB", (s, s), (10 * i, 100, 200)).save(d / f"img{i:02d}.png")
        return d


CASES: dict[str, Callable[[Env], Case]] = {}


def case(fn):
    CASES[fn.__name__] = fn
    return fn


# ---- config files and --set ------------------------------------------------------------------------

@case
def config_unknown_key(e):
    cfg = e.file("c.yaml", "studnet_timesteps: [999, 499]\n")
    return Case(e.distill(config=cfg), r"unknown key 'studnet_timesteps'.*did you mean student_timesteps", [cfg, e.out])


@case
def config_unknown_key_via_set(e):
    return Case(e.distill("batchsize=4"), r"unknown key 'batchsize'", [e.out])


@case
def config_non_string_key(e):
    cfg = e.file("c.yaml", "1: 2\nrun_seed: 3\n")
    return Case(e.distill(config=cfg), r"unknown key 1", [cfg, e.out])


@case
def config_wrong_type_int(e):
    cfg = e.file("c.yaml", "run_seed: two\n")  # (a field the tiny base --set overrides do not set)
    return Case(e.distill(config=cfg), r"run_seed must be an integer, got 'two'", [cfg, e.out])


@case
def config_wrong_type_float_int(e):
    return Case(e.distill("run_batch_size=2.5"), r"run_batch_size must be an integer, got 2.5", [e.out])


@case
def config_wrong_type_list(e):
    return Case(e.distill("student_timesteps=999"), r"student_timesteps must be a list", [e.out])


@case
def config_wrong_type_list_item(e):
    return Case(e.distill("student_timesteps=[high, low]"), r"student_timesteps must be a finite number, got 'high'", [e.out])


@case
def config_wrong_type_bool(e):
    return Case(e.distill("model_gradient_checkpointing=maybe"), r"model_gradient_checkpointing must be true or false",
                [e.out])


@case
def config_wrong_type_mapping(e):
    cfg = e.file("c.yaml", "run_seed: {a: 1}\n")
    return Case(e.distill(config=cfg), r"run_seed must be an integer", [cfg, e.out])


@case
def config_unknown_disc_head(e):
    return Case(e.distill("disc_head=global"), r"disc_head must be patch or pooled", [e.out])


@case
def config_text_condition_on_patch_heads(e):
    return Case(e.distill("disc_kind=pixel", "disc_head=patch", "disc_condition=text"),
                r"disc_condition: text needs disc_kind: pixel and disc_head: pooled", [e.out])


@case
def config_student_ema_out_of_range(e):
    return Case(e.distill("student_ema=1.5"), r"student_ema must be in \[0, 1\)", [e.out])


@case
def config_null_required(e):
    return Case(e.distill("run_batch_size=null"), r"run_batch_size must not be null", [e.out])


@case
def config_nan(e):
    return Case(e.distill("optim_grad_clip=.nan"), r"optim_grad_clip must be a finite number, got nan", [e.out])


@case
def config_out_of_range_batch(e):
    return Case(e.distill("run_batch_size=0"), r"run_batch_size must be >= 1", [e.out])


@case
def config_out_of_range_dm_t(e):
    return Case(e.distill("dm_t_min=0.99", "dm_t_max=0.5"), r"dm_t_min < dm_t_max", [e.out])


@case
def config_timesteps_not_decreasing(e):
    return Case(e.distill("student_timesteps=[499, 999]"), r"strictly decreasing", [e.out])


@case
def config_timesteps_outside_schedule(e):
    return Case(e.distill("student_timesteps=[1500, 499]"), r"student_timesteps .*1500.* outside", [e.out])


@case
def config_dm_steps_exceed_k(e):
    return Case(e.distill("student_dm_steps=5"), r"student_dm_steps=5 exceeds the 2 student steps", [e.out])


@case
def config_bad_choice(e):
    return Case(e.distill("method=dmd3"), r"method must be one of", [e.out])


@case
def config_malformed_yaml(e):
    cfg = e.file("c.yaml", "run_batch_size: [1, 2\nrun_seed: 3\n")
    return Case(e.distill(config=cfg), r"config file .*c\.yaml is not valid YAML", [cfg, e.out], subprocess=True)


@case
def config_yaml_list(e):
    cfg = e.file("c.yaml", "- batch_size: 2\n- seed: 3\n")
    return Case(e.distill(config=cfg), r"must be a mapping of key: value, got list", [cfg, e.out])


@case
def config_not_utf8(e):
    cfg = e.file("c.yaml", b"run_seed: 3\nmethod: \xff\xfe\n")
    return Case(e.distill(config=cfg), r"config file .*c\.yaml is not valid YAML", [cfg, e.out])


@case
def config_missing_file(e):
    return Case(e.distill(config=e.tmp / "nope.yaml"), r"config file .*nope\.yaml not found", [e.out])


@case
def config_yaml_boolean_for_a_string(e):
    cfg = e.file("c.yaml", "model_mixed_precision: no\n")  # YAML 1.1: `no` is false (--set keeps the text)
    return Case(e.distill(config=cfg), r'model_mixed_precision must be a string, got False .*quote the value', [cfg, e.out])


@case
def set_without_equals(e):
    return Case(e.distill("batch_size"), r"--set 'batch_size': expected key=value", [e.out])


@case
def set_invalid_yaml_value(e):
    return Case(e.distill("student_timesteps=[999, 499"), r"value is not valid YAML", [e.out])


# ---- model folders ---------------------------------------------------------------------------------

@case
def model_missing_folder(e):
    return Case(e.distill(f"model_teacher={e.tmp / 'no_such_model'}"), r"model folder .*no_such_model does not exist",
                [e.out])


@case
def model_not_a_pipeline(e):
    d = e.tmp / "photos"
    d.mkdir()
    (d / "README.txt").write_text("not a model\n")
    return Case(e.distill(f"model_teacher={d}"), r"not a diffusers pipeline folder: model_index.json is missing",
                [d, e.out])


@case
def model_is_a_file(e):
    f = e.file("model.safetensors", b"\0" * 64)
    return Case(e.distill(f"model_teacher={f}"), r"model folder .*model.safetensors does not exist", [f, e.out])


@case
def model_index_not_json(e):
    t = e.teacher_copy()
    (t / "model_index.json").write_text("{not json")
    return Case(e.distill(f"model_teacher={t}"), r"model_index.json is not readable JSON", [t, e.out])


@case
def model_index_is_a_list(e):
    t = e.teacher_copy()
    (t / "model_index.json").write_text("[1, 2, 3]")
    return Case(e.distill(f"model_teacher={t}"), r"model_index.json .*not a JSON object", [t, e.out])


@case
def model_unsupported_pipeline(e):
    t = e.teacher_copy()
    idx = json.loads((t / "model_index.json").read_text())
    idx["_class_name"] = "StableDiffusionPipeline"
    (t / "model_index.json").write_text(json.dumps(idx))
    return Case(e.distill(f"model_teacher={t}"), r"holds a StableDiffusionPipeline pipeline; supported", [t, e.out])


@case
def model_wrong_family(e):
    return Case(e.distill("model_family=sd3"), r"holds a StableDiffusionXLPipeline but family 'sd3' needs",
                [e.teacher, e.out], subprocess=True)


@case
def model_truncated_unet_weights(e):
    t = e.teacher_copy()
    w = t / "unet" / "diffusion_pytorch_model.safetensors"
    data = w.read_bytes()
    w.write_bytes(data[: len(data) // 2])
    return Case(e.distill(f"model_teacher={t}"), r"could not load .*unet as UNet2DConditionModel", [t, e.out])


@case
def model_empty_text_encoder_weights(e):
    t = e.teacher_copy()
    (t / "text_encoder" / "model.safetensors").write_bytes(b"")
    return Case(e.distill(f"model_teacher={t}"), r"could not load .*text_encoder as CLIPTextModel", [t, e.out])


@case
def model_missing_unet_folder(e):
    t = e.teacher_copy()
    shutil.rmtree(t / "unet")
    return Case(e.distill(f"model_teacher={t}"), r"unet is missing: the pipeline folder has no unet/ subfolder",
                [t, e.out])


@case
def info_not_a_pipeline(e):
    d = e.tmp / "empty"
    d.mkdir()
    return Case(["info", "--model", str(d)], r"not a diffusers pipeline folder", [d])


# ---- prompt files ----------------------------------------------------------------------------------

@case
def prompts_empty_file(e):
    p = e.file("prompts.txt", "\n   \n\n")
    return Case(e.distill(f"data_prompts={p}"), r"prompt file .*prompts.txt has no prompts", [p, e.out])


@case
def prompts_binary(e):
    p = e.file("prompts.txt", b"a cat\n\x00\x01\x02\x03binary\n")
    return Case(e.distill(f"data_prompts={p}"), r"looks binary \(contains NUL bytes\)", [p, e.out])


@case
def prompts_not_utf8(e):
    p = e.file("prompts.txt", "a caf\u00e9 at night\n".encode("latin-1"))
    return Case(e.distill(f"data_prompts={p}"), r"is not UTF-8 text", [p, e.out])


@case
def prompts_enormous_line(e):
    p = e.file("prompts.txt", "a cat\n" + "x" * 1_000_000 + "\n")
    return Case(e.distill(f"data_prompts={p}"), r"prompt 2 has 1000000 characters \(max \d+\)", [p, e.out])


@case
def prompts_missing(e):
    return Case(e.distill(f"data_prompts={e.tmp / 'nope.txt'}"), r"prompt file .*nope.txt not found", [e.out])


@case
def prompts_is_a_folder(e):
    d = e.tmp / "prompt_dir"
    d.mkdir()
    return Case(e.distill(f"data_prompts={d}"), r"prompt file .*prompt_dir not found", [d, e.out])


# ---- real-image folders ------------------------------------------------------------------------------

@case
def real_images_unreadable(e):
    """Images of any size are resized, a few unreadable ones are skipped and counted; a folder of nothing readable
    fails before any model work."""
    d = e.tmp / "real"
    d.mkdir()
    (d / "broken.png").write_bytes(b"this is not a png at all")
    (d / "also_broken.jpg").write_bytes(b"\xff\xd8 nor a jpeg")
    return Case(e.distill("disc_kind=latent", f"data_real={d}"), r"data_real: none of the first 2 images .* can be read",
                [d, e.out])


@case
def real_images_truncated(e):
    d = e.image_folder("real", [RES, 48])
    for f in d.iterdir():
        f.write_bytes(f.read_bytes()[:60])
    return Case(e.distill("disc_kind=latent", f"data_real={d}"), r"data_real: none of the first 2 images .*can be read",
                [d, e.out])


@case
def real_images_without_captions_for_a_text_conditioned_gan(e):
    d = e.image_folder("real", [RES, RES])  # no metadata.jsonl / .txt: no captions
    return Case(e.distill("disc_kind=pixel", "disc_head=pooled", "disc_condition=text", f"data_real={d}"),
                r"disc_condition: text needs a caption for every real image", [d, e.out])


@case
def real_images_empty_folder(e):
    d = e.tmp / "real"
    d.mkdir()
    (d / "notes.txt").write_text("no images here")
    return Case(e.distill("disc_kind=latent", f"data_real={d}"), r"image folder .*real holds no images", [d, e.out])


@case
def real_images_not_a_folder(e):
    f = e.file("real.zip", b"PK\x03\x04")
    return Case(e.distill("disc_kind=latent", f"data_real={f}"), r"data_real .*real.zip.* is a file: give an image folder",
                [f, e.out])


# ---- output folder -----------------------------------------------------------------------------------

@case
def out_parent_is_a_file(e):
    f = e.file("a_file", "x")
    return Case(e.distill(out=f / "run"), r"cannot write to run folder .*a_file/run", [f])


@case
def out_is_a_file(e):
    f = e.file("run_file", "precious")
    return Case(e.distill(out=f), r"cannot write to run folder .*run_file", [f])


@case
def out_read_only(e):
    """chmod 0o500 where that blocks writes; as root (where it does not) a path under /proc, which nobody can
    create folders in."""
    if os.geteuid() != 0:
        d = e.tmp / "ro"
        d.mkdir()
        (d / "keep.txt").write_text("keep")
        d.chmod(0o500)
        return Case(e.distill(out=d / "run"), r"cannot write to run folder .*ro/run", [d])
    return Case(e.distill(out=Path("/proc/flashdmd-bad-input/run")), r"cannot write to run folder /proc/", [])


def _enospc_after_half(real_save):
    """A safetensors writer that writes half of the file, then runs out of space."""
    from safetensors.torch import save as to_bytes

    def save_file(tensors, filename, metadata=None):
        data = to_bytes(tensors, metadata=metadata)
        with open(filename, "wb") as f:
            f.write(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(filename))
    return save_file


def _no_partial_checkpoint(e):
    root = e.out / "checkpoints"
    left = sorted(p.name for p in root.iterdir()) if root.is_dir() else []
    assert left == [], f"a failed checkpoint write left {left}"


@case
def disk_full_at_checkpoint(e):
    import flashdmd.training.checkpoint as ck
    return Case(e.distill(), r"(?i)checkpoint.*no space left on device", [e.out], new_files_ok=True,
                patch=lambda mp: mp.setattr(ck, "save_file", _enospc_after_half(ck.save_file)),
                after=_no_partial_checkpoint)


@case
def disk_full_at_student_save(e):
    import safetensors.torch as st

    def after(e):
        _no_partial_checkpoint(e)
        assert not (e.out / "student").exists() and not (e.out / "student.tmp").exists()
    return Case(e.distill("run_checkpoint_every_steps=0"), r"(?i)student.*no space left on device", [e.out],
                new_files_ok=True, patch=lambda mp: mp.setattr(st, "save_file", _enospc_after_half(st.save_file)),
                after=after)


# ---- resume --------------------------------------------------------------------------------------

def _previous_run_files(e):
    """An --out that holds an earlier run's config and metrics (no checkpoints)."""
    (e.out / "config.yaml").write_text("run_seed: 1\n")
    (e.out / "metrics.json").write_text('{"history": []}')


@case
def resume_latest_without_checkpoints(e):
    _previous_run_files(e)
    return Case(e.distill(extra=["--resume", "latest"]), r"no intact checkpoint under .*checkpoints to resume from",
                [e.out], subprocess=True)


@case
def resume_missing_checkpoint(e):
    _previous_run_files(e)
    return Case(e.distill(extra=["--resume", str(e.tmp / "step_00000009")]), r"step_00000009 cannot be used: not a folder",
                [e.out])


@case
def resume_corrupt_checkpoint(e):
    _previous_run_files(e)
    ck = e.tmp / "step_00000001"
    shutil.copytree(e.latent_run / "checkpoints" / "step_00000001", ck)
    blob = ck / "roles.safetensors"
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    blob.write_bytes(bytes(data))
    return Case(e.distill("disc_kind=latent", extra=["--resume", str(ck)]),
                r"step_00000001 cannot be used: roles.safetensors fails its checksum", [e.out, ck])


@case
def resume_checkpoint_of_other_config(e):
    _previous_run_files(e)
    ck = e.latent_run / "checkpoints" / "step_00000001"
    return Case(e.distill("disc_kind=none", extra=["--resume", str(ck)]),
                r"checkpoint .*step_00000001 does not match this run.*different config", [e.out, e.latent_run])


# ---- eval / report / export / sample -------------------------------------------------------------------

@case
def eval_too_few_images(e):
    return Case(["eval", "--model", str(e.teacher), "--num-images", "3", "--json", str(e.tmp / "m.json")],
                r"--num-images must be at least 20", [e.teacher])


@case
def eval_json_folder_missing(e):
    return Case(["eval", "--model", str(e.teacher), "--num-images", "20", "--json", str(e.tmp / "nope" / "m.json")],
                r"folder .*nope for --json does not exist", [e.teacher])


@case
def eval_model_missing(e):
    return Case(["eval", "--model", str(e.tmp / "gone"), "--num-images", "20", "--json", str(e.tmp / "m.json")],
                r"model folder .*gone does not exist", [])


@case
def report_not_a_run(e):
    return Case(["report", str(e.out)], r"has no metrics.json: give a finished flashdmd distill or demo run folder",
                [e.out], subprocess=True)


@case
def report_corrupt_metrics(e):
    (e.out / "metrics.json").write_text('{"history": [')
    return Case(["report", str(e.out)], r"metrics.json is not readable JSON", [e.out])


@case
def export_not_a_run(e):
    return Case(["export", "--run", str(e.out), "--out", str(e.tmp / "exported")],
                r"is not a flashdmd distill run \(no run.json\)", [e.out])


@case
def export_garbage_run_json(e):
    (e.out / "run.json").write_bytes(b"\x89PNG\r\n")
    return Case(["export", "--run", str(e.out), "--out", str(e.tmp / "exported")], r"run.json is not readable JSON", [e.out])


@case
def sample_empty_prompts(e):
    p = e.file("prompts.txt", "")
    return Case(["sample", "--model", str(e.teacher), "--prompts", str(p), "--out", str(e.out)],
                r"prompt file .*prompts.txt has no prompts", [p, e.out])


@case
def sample_no_prompts(e):
    return Case(["sample", "--model", str(e.teacher), "--out", str(e.out)], r"no prompts: give --prompt", [e.out])


# ---- argparse usage errors (argparse's own format and exit status 2) --------------------------------

@case
def usage_distill_without_out(e):
    return Case(["distill", "--set", "run_seed=1"], r"the following arguments are required: --out", usage=True)


@case
def usage_eval_num_images_not_int(e):
    return Case(["eval", "--model", "world-sdxl", "--num-images", "three", "--json", str(e.tmp / "m.json")],
                r"--num-images: invalid int value: 'three'", usage=True)


@case
def usage_threads_zero(e):
    return Case(["--threads", "0", "distill", "--out", str(e.out)],
                r"--threads: expected 'auto' or a whole number >= 1, got '0'", [e.out], usage=True)


# ---------------------------------------------------------------------------------------------------
# the test

def _snapshot(paths: list[Path]) -> dict[str, str]:
    out = {}
    for root in paths:
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else []
        for f in files:
            out[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def _run_subprocess(argv: list[str]) -> tuple[int, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    p = subprocess.run([sys.executable, "-m", "flashdmd.cli", *argv], capture_output=True, text=True, env=env,
                       timeout=300, cwd=REPO)
    return p.returncode, p.stderr


def test_table_is_large_enough():
    assert len(CASES) >= 30


@case
def set_infinite_lr(e):
    return Case(e.distill("student_lr=inf"), r"student_lr must be a finite number, got inf", [e.out])


@case
def distill_into_existing_run(e):
    (e.out / "run.json").write_text('{"kind": "flashdmd-distill-run"}')
    return Case(e.distill(), r"already holds a run: continue it with --resume latest", [e.out])


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_line_error(name, teacher, tmp_path, request, capsys, monkeypatch):
    env = Env(tmp_path, teacher, request)
    c = CASES[name](env)
    before = _snapshot(c.keep)
    if c.subprocess:
        rc, err = _run_subprocess(c.argv)
    else:
        if c.patch is not None:
            c.patch(monkeypatch)
        capsys.readouterr()
        try:
            rc = main(c.argv)
        except SystemExit as ex:  # argparse
            rc = ex.code
        err = capsys.readouterr().err
        monkeypatch.undo()
    assert "Traceback" not in err, err
    assert rc == 2, f"exit status {rc}; stderr:\n{err}"
    lines = [ln for ln in err.splitlines() if ln.strip()]
    if c.usage:
        errors = [ln for ln in lines if "error:" in ln]
        assert len(errors) == 1 and re.match(r"flashdmd( [\w-]+)?: error: ", errors[0]), err
    else:
        errors = [ln for ln in lines if ln.startswith("error:")]
        assert len(errors) == 1, f"expected one 'error:' line, got:\n{err}"
        other = [ln for ln in lines if not ln.startswith("error:") and not NOISE.search(ln)]
        assert not other, f"unexpected stderr lines besides the error: {other}"
    assert re.search(c.match, errors[0]), f"{errors[0]!r} does not match {c.match!r}"
    after = _snapshot(c.keep)
    changed = [p for p in before if after.get(p) != before[p]]
    assert not changed, f"existing files changed or lost: {changed}"
    if not c.new_files_ok:
        assert sorted(after) == sorted(before), f"new files written: {sorted(set(after) - set(before))}"
    if c.after is not None:
        c.after(env)
