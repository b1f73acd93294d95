"""A user's own model folder end to end, on tiny random models that are not the embedded world's: an SDXL- /
SD3-architecture pipeline folder + a folder of captioned images of mixed sizes and modes + held-out prompts ->
`flashdmd distill` (Pixel-GAN on a SAM backbone, captions as training prompts, CLIP-score evaluation every step)
-> `flashdmd report` -> `flashdmd sample` -> `flashdmd export` -> a plain diffusers pipeline call.

Also `--overwrite` (the old run's state is gone, `--resume latest` continues the new run), `--dry-run`, and
training at a resolution other than the teacher's own.
"""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
import tiny_models as tm  # noqa: E402

from flashdmd.cli import main  # noqa: E402

CAPTIONS = ["a photo of a cat", "a drawing of the digit seven", "a red square", "a handwritten three",
            "the number seven", "a photo of a dog"]
SIZES = [(40, 30, "RGB"), (32, 32, "L"), (100, 50, "RGBA"), (33, 61, "P"), (64, 64, "RGB"), (50, 90, "CMYK")]


def write_images(folder: Path, n: int = 12, seed: int = 0) -> Path:
    """``n`` images of mixed sizes / modes in nested folders, captions in metadata.jsonl (imagefolder)."""
    rng = np.random.default_rng(seed)
    (folder / "sub").mkdir(parents=True)
    rows = []
    for i in range(n):
        w, h, mode = SIZES[i % len(SIZES)]
        arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        name = f"{'sub/' if i % 2 else ''}img_{i:02d}.{'jpg' if mode in ('RGB', 'CMYK') else 'png'}"
        Image.fromarray(arr).convert(mode).save(folder / name)
        rows.append({"file_name": name, "text": CAPTIONS[i % len(CAPTIONS)]})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


@pytest.fixture(scope="module")
def user(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("user")
    tm.sam_vision_folder(tmp / "sam")
    (tmp / "eval_prompts.txt").write_text("a photo of a horse\na drawing of a boat\na blue circle\n")
    return {"sdxl": tm.save_pipeline(tm.sdxl_pipeline(tmp), tmp / "sdxl"),
            "sd3": tm.save_pipeline(tm.sd3_pipeline(tmp), tmp / "sd3"),
            "images": write_images(tmp / "images"), "sam": tmp / "sam", "clip": tm.clip_model_folder(tmp / "clip"),
            "eval_prompts": tmp / "eval_prompts.txt"}


def write_config(path: Path, **fields) -> Path:
    path.write_text(yaml.safe_dump(fields))
    return path


def user_config(user, family: str, tmp: Path, **extra) -> Path:
    fields = dict(model_teacher=str(user[family]), data_real=str(user["images"]), data_prompts="captions",
                  disc_backbone="sam", disc_backbone_path=str(user["sam"]), eval_prompts=str(user["eval_prompts"]),
                  eval_clip_model=str(user["clip"]), eval_every_steps=1, eval_num_images=3, eval_batch_size=2,
                  run_sample_every_steps=1, run_checkpoint_every_steps=1, run_batch_size=2, run_max_steps=2,
                  data_workers=2, data_crop="random", run_seed=3)
    fields.update(extra)
    return write_config(tmp / f"{family}.yaml", **fields)


@pytest.mark.parametrize("family", ["sdxl", "sd3"])
def test_user_folder_distill_report_sample_export(user, family, tmp_path, capsys):
    run, cfg = tmp_path / "run", user_config(user, family, tmp_path)
    assert main(["--threads", "1", "distill", "--config", str(cfg), "--out", str(run), "--no-progress"]) == 0
    assert "memory plan (single, 1 process(es), cpu): peak" in capsys.readouterr().out  # printed before the run

    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["higher_is_better"] == {"clip_score": True}
    assert [e["step"] for e in metrics["evals"]] == [0, 1, 2]  # the initial student, then every generator step
    assert all(np.isfinite(e["clip_score"]) and e["num_images"] == 3 for e in metrics["evals"])
    grid = json.loads((run / "samples" / "prompts.json").read_text())
    assert grid["prompts"][:3] == user["eval_prompts"].read_text().split("\n")[:3]
    assert sorted(p.name for p in (run / "samples").glob("step_*.png")) == ["step_000001.png", "step_000002.png"]
    assert list((run / "tb").rglob("events.out.tfevents.*")), "tensorboard scalars are the default tracker"
    info = json.loads((run / "run.json").read_text())
    assert info["resolution"] == 32

    assert main(["report", str(run)]) == 0
    html = (run / "report.html").read_text()
    assert "clip_score" in html and "a drawing of a boat" in html and "step_000002.png" in html

    out = tmp_path / "samples"
    assert main(["sample", "--model", str(run), "--prompt", "a photo of a horse", "--out", str(out)]) == 0
    pngs = sorted(out.glob("*.png"))
    lines = [json.loads(x) for x in (out / "prompts.jsonl").read_text().splitlines()]
    assert len(pngs) == 1 and lines[0]["prompt"] == "a photo of a horse" and lines[0]["file"] == pngs[0].name

    exported = tmp_path / "exported"
    assert main(["export", "--run", str(run), "--out", str(exported)]) == 0
    from diffusers import DiffusionPipeline
    index = json.loads((exported / "model_index.json").read_text())  # SD3 without T5 names the parts it lacks,
    absent = {k: None for k, v in index.items() if isinstance(v, list) and v[0] is None}  # as its README says
    pipe = DiffusionPipeline.from_pretrained(str(exported), **absent)
    image = pipe("a photo of a horse", num_inference_steps=len(info["student_timesteps"]), guidance_scale=1.0,
                 output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 32, 32, 3) and np.isfinite(image).all()


def test_overwrite_removes_the_old_run_and_resume_continues_the_new_one(user, tmp_path):
    run = tmp_path / "run"
    base = dict(model_teacher=str(user["sdxl"]), data_real=str(user["images"]), data_prompts="captions",
                disc_kind="none", eval_every_steps=0, run_sample_every_steps=1, run_checkpoint_every_steps=1,
                run_checkpoint_keep_last=10, run_log_every_steps=1, run_batch_size=2, student_timesteps=[999, 499])
    old = write_config(tmp_path / "old.yaml", **base, run_max_steps=3, run_seed=1)
    assert main(["distill", "--no-plan", "--config", str(old), "--out", str(run), "--no-progress"]) == 0
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000001", "step_00000002", "step_00000003"]
    (run / "notes.txt").write_text("mine")  # not the run's state: kept

    new = write_config(tmp_path / "new.yaml", **base, run_max_steps=1, run_seed=2)
    assert main(["distill", "--no-plan", "--config", str(new), "--out", str(run), "--no-progress"]) == 2  # refused without a flag
    assert main(["distill", "--no-plan", "--config", str(new), "--out", str(run), "--no-progress", "--overwrite"]) == 0
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000001"]
    assert sorted(p.name for p in (run / "samples").glob("*.png")) == ["step_000001.png"]
    assert (run / "notes.txt").read_text() == "mine"
    assert yaml.safe_load((run / "config.yaml").read_text())["run_seed"] == 2

    longer = write_config(tmp_path / "longer.yaml", **base, run_max_steps=2, run_seed=2)
    assert main(["distill", "--no-plan", "--config", str(longer), "--out", str(run), "--no-progress", "--resume", "latest"]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["generator_steps"] == 2 and [h["step"] for h in metrics["history"]][-1] == 2
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000001", "step_00000002"]


def test_dry_run_checks_everything_and_writes_nothing(user, tmp_path, capsys):
    run = tmp_path / "run"
    cfg = user_config(user, "sdxl", tmp_path, rl_enabled=False)
    assert main(["distill", "--no-plan", "--config", str(cfg), "--out", str(run), "--dry-run"]) == 0
    out = capsys.readouterr().out
    for what in ("teacher:", "real images:", "evaluation: RealEvaluator (clip_score)", "stage 1:", "dry run passed"):
        assert what in out, out[-2000:]
    assert not run.exists()


def test_training_at_another_resolution(user, tmp_path):
    """data_resolution 48 (the teacher's own is 32): real images cropped to 48, the student trained and sampled
    at 48, run.json records it, the exported pipeline's default size stays the teacher's."""
    run = tmp_path / "run"
    cfg = write_config(tmp_path / "c.yaml", model_teacher=str(user["sdxl"]), data_real=str(user["images"]),
                       data_prompts="captions", disc_kind="latent", data_resolution=48, eval_every_steps=0,
                       run_sample_every_steps=1, run_checkpoint_every_steps=0, run_batch_size=2, run_max_steps=1,
                       student_timesteps=[999, 499])
    assert main(["distill", "--no-plan", "--config", str(cfg), "--out", str(run), "--no-progress"]) == 0
    assert json.loads((run / "run.json").read_text())["resolution"] == 48
    assert Image.open(run / "samples" / "step_000001.png").size[1] == 2 * (2 * (48 + 2) + 2)  # 2 rows, 2x scale
    from flashdmd.inference import load_model, sample_images
    assert sample_images(load_model(str(run)), ["a red square"]).shape == (1, 3, 48, 48)


def test_stage2_on_a_users_teacher_without_a_reward_model_fails_at_start(user, tmp_path, capsys):
    """The default rl_reward_model (the world's) fits only the world's teachers: the error comes before any
    training and says how to get one."""
    cfg = user_config(user, "sdxl", tmp_path, rl_enabled=True, run_checkpoint_every_steps=0)
    assert main(["distill", "--no-plan", "--config", str(cfg), "--out", str(tmp_path / "run")]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "flashdmd reward make-pairs" in err[0] and "flashdmd reward train" in err[0], err
    assert not (tmp_path / "run").exists()


def test_unreadable_images_fail_before_training(user, tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    for i in range(3):
        (bad / f"{i}.png").write_bytes(b"not a png")
    cfg = user_config(user, "sdxl", tmp_path, data_real=str(bad), data_prompts=str(user["eval_prompts"]))
    assert main(["distill", "--no-plan", "--config", str(cfg), "--out", str(tmp_path / "run")]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "data_real" in err[0], err
    assert not (tmp_path / "run").exists()


def test_wandb_is_an_option_through_accelerate(user, tmp_path, monkeypatch, capsys):
    """run_report_to: [tensorboard, wandb] logs the same scalars to accelerate's WandBTracker (here a stand-in wandb
    module: the tests never need the package); without wandb installed the run stops at start with one line."""
    import importlib.machinery
    import importlib.util
    import types
    cfg = user_config(user, "sdxl", tmp_path, run_report_to=["tensorboard", "wandb"], disc_kind="none",
                      eval_every_steps=0, run_max_steps=1, run_log_every_steps=1)
    if importlib.util.find_spec("wandb") is None:
        assert main(["distill", "--no-plan", "--config", str(cfg), "--out", str(tmp_path / "none")]) == 2
        assert "pip install wandb" in capsys.readouterr().err
    logged, inits = [], []
    run = types.SimpleNamespace(log=lambda values, step=None, **kw: logged.append((step, dict(values))),
                                finish=lambda: None)
    fake = types.ModuleType("wandb")
    fake.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    fake.init = lambda **kw: inits.append(kw) or run
    fake.config = types.SimpleNamespace(update=lambda values, allow_val_change=False: inits.append(dict(values)))
    fake.Image = lambda x: x
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: fake.__spec__ if name == "wandb" else
                        _find_spec(name, *a))
    assert main(["distill", "--no-plan", "--config", str(cfg), "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    assert inits[0]["project"] == "flashdmd" and inits[0]["name"] == "run" and inits[1]["run_max_steps"] == 1
    scalars = [values for step, values in logged if step == 1 and "loss/generator" in values]
    assert scalars and list((tmp_path / "run" / "tb").rglob("events.out.tfevents.*"))


_find_spec = __import__("importlib.util").util.find_spec


def test_dry_run_with_stage2_on_the_world(tmp_path, capsys):
    """With Stage 2 the dry run also loads the reward model (checked against the teacher) and runs one RL update."""
    run = tmp_path / "run"
    assert main(["distill", "--no-plan", "--set", "rl_enabled=true", "--set", "disc_calibration_images=4", "--out", str(run),
                 "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "reward model:" in out and "lrm-sdxl" in out and "stage 2: one RL update" in out, out[-2000:]
    assert not run.exists()
