"""`flashdmd sample`: PNG count, names and size; a PNG is what the diffusers pipeline draws for that prompt
and seed (teacher folder, and a student run through its exported folder); overwrite refusal; bad input."""
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
import tiny_models as tm  # noqa: E402
from tolerances import U32, assert_close, magnitude, sampling_factor  # noqa: E402

from flashdmd.cli import main  # noqa: E402


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sample")
    return tm.save_pipeline(tm.sdxl_pipeline(tmp), tmp / "sdxl")


@pytest.fixture(scope="module")
def student_run(teacher, tmp_path_factory):
    """A run folder in the distill layout whose student is the teacher's UNet with perturbed weights
    (sampling only reads run.json and student/; a real distill run is exercised in test_export)."""
    from diffusers import UNet2DConditionModel
    run = tmp_path_factory.mktemp("run")
    unet = UNet2DConditionModel.from_pretrained(teacher / "unet")
    torch.manual_seed(0)
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.01 * torch.randn_like(p))
    unet.save_pretrained(run / "student")
    (run / "run.json").write_text(json.dumps({
        "kind": "flashdmd-distill-run", "teacher": str(teacher), "family": "sdxl", "teacher_path": str(teacher),
        "student_timesteps": [999.0, 749.0, 499.0, 249.0], "lora_rank": 0, "lora_alpha": None,
        "generator_steps": 0, "method": "flashdmd"}))
    return run


def _png(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        assert im.mode == "RGB"
        return np.asarray(im).astype(np.int16)


def _pipe_png(pipe, prompt: str, seed: int, **kw) -> np.ndarray:
    gen = torch.Generator().manual_seed(seed)
    img = pipe(prompt, guidance_scale=1.0, output_type="np", generator=gen, **kw).images[0]
    return (img * 255).round().astype(np.int16)


def _one_line_error(capsys, argv) -> str:
    capsys.readouterr()  # drop earlier output (progress bars)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_teacher_pngs_count_size_seeds_and_overwrite(teacher, tmp_path, capsys):
    from diffusers import StableDiffusionXLPipeline
    out = tmp_path / "imgs" / "nested"
    argv = ["sample", "--model", str(teacher), "--prompt", "a photo of the digit seven", "--prompt", "a cat",
            "--num-per-prompt", "2", "--seed", "3", "--steps", "2", "--cfg", "1", "--out", str(out)]
    assert main(argv) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["0000_seed3.png", "0000_seed4.png", "0001_seed3.png", "0001_seed4.png", "metadata.jsonl",
                     "prompts.jsonl"]
    names = names[:-2]
    assert all(_png(out / n).shape == (32, 32, 3) for n in names)
    # each PNG is the diffusers pipeline's image for that prompt and seed (one prompt, one generator)
    pipe = StableDiffusionXLPipeline.from_pretrained(teacher)
    pipe.set_progress_bar_config(disable=True)
    expected = _pipe_png(pipe, "a cat", 4, num_inference_steps=2)
    # one 8-bit level: the two float images agree to round-off (~1e-6, far below a level, 1/127.5), so they
    # quantise to the same level or, next to a rounding boundary, its neighbour
    assert np.abs(_png(out / "0001_seed4.png") - expected).max() <= 1
    # no silent overwrite; --overwrite replaces
    before = (out / "0000_seed3.png").read_bytes()
    err = _one_line_error(capsys, argv)
    assert "--overwrite" in err and (out / "0000_seed3.png").read_bytes() == before
    assert main(["sample", "--model", str(teacher), "--prompt", "another prompt", "--seed", "3", "--steps", "1",
                 "--cfg", "1", "--out", str(out), "--overwrite"]) == 0
    assert (out / "0000_seed3.png").read_bytes() != before and len(list(out.glob("*.png"))) == 4


def test_student_png_is_the_exported_pipeline_image(student_run, tmp_path):
    """The student's PNG (4 stochastic steps, per-image generator) equals diffusers on the exported folder."""
    from diffusers import DiffusionPipeline
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of the digit seven\n\n  a drawing of a cat  \n")
    out = tmp_path / "student"
    assert main(["sample", "--model", str(student_run), "--prompts", str(prompts), "--seed", "11",
                 "--batch-size", "2", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["0000_seed11.png", "0001_seed11.png", "metadata.jsonl",
                                                     "prompts.jsonl"]
    exported = tmp_path / "exported"
    assert main(["export", "--run", str(student_run), "--out", str(exported)]) == 0
    pipe = DiffusionPipeline.from_pretrained(exported)
    pipe.set_progress_bar_config(disable=True)
    expected = _pipe_png(pipe, "a drawing of a cat", 11, num_inference_steps=4)
    assert np.abs(_png(out / "0001_seed11.png") - expected).max() <= 1  # one 8-bit level, as above
    # flashdmd refuses to treat the exported folder as a teacher
    assert main(["sample", "--model", str(exported), "--prompt", "x", "--out", str(tmp_path / "x")]) == 2


def test_per_image_generators_make_batching_irrelevant(student_run):
    from flashdmd.inference import load_model
    from flashdmd.sample import sample_latents
    model = load_model(str(student_run))
    prompts = ["a photo of the digit seven", "a drawing of a cat"]
    both = sample_latents(model, prompts, [torch.Generator().manual_seed(s) for s in (5, 6)])
    second = sample_latents(model, prompts[1:], [torch.Generator().manual_seed(6)])
    # batch-size float noise only: the text encoders and the student's steps on another batch size
    k = sampling_factor(model.family, len(model.timesteps), model.guidance_scale, decode=False)
    assert_close(both[1:], second, factor=k)
    one_gen = sample_latents(model, prompts, torch.Generator().manual_seed(5))
    # one generator for the batch is diffusers' other convention: other noise, beyond that round-off
    assert (one_gen - both).abs().max() > k * U32 * magnitude(both)


def test_bad_input_is_a_one_line_error(teacher, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    err = _one_line_error(capsys, ["sample", "--model", str(teacher), "--prompts", str(empty), "--out", str(tmp_path / "o")])
    assert "no prompts" in err
    _one_line_error(capsys, ["sample", "--model", str(teacher), "--out", str(tmp_path / "o")])
    _one_line_error(capsys, ["sample", "--model", str(teacher), "--prompts", str(tmp_path / "missing.txt"),
                             "--out", str(tmp_path / "o")])
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    err = _one_line_error(capsys, ["sample", "--model", str(teacher), "--prompt", "x", "--out", str(a_file / "sub")])
    assert "cannot write" in err
    _one_line_error(capsys, ["sample", "--model", str(tmp_path / "nope"), "--prompt", "x", "--out", str(tmp_path / "o")])
    _one_line_error(capsys, ["sample", "--model", str(teacher), "--prompt", "x", "--num-per-prompt", "0",
                             "--out", str(tmp_path / "o")])
    shutil.rmtree(tmp_path / "o", ignore_errors=True)


def test_threads_auto_uses_the_cores_the_process_may_run_on(monkeypatch):
    """`flashdmd --threads auto` (the default) takes the cores in the process's affinity mask -- whatever the load
    average says -- shared among a launch's local processes; an explicit OMP_NUM_THREADS wins; a number is taken
    as given."""
    import os

    import torch

    from flashdmd.cli import auto_threads, set_threads
    before, mask = torch.get_num_threads(), os.sched_getaffinity(0)
    try:
        one = {min(mask)}
        os.sched_setaffinity(0, one)  # the real mask, as taskset / a cpuset / SLURM --cpus-per-task set it
        assert auto_threads({}) == 1
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
        monkeypatch.setattr(os, "getloadavg", lambda: (7.0, 7.0, 7.0))  # a busy-looking machine changes nothing
        assert auto_threads({}) == 4
        assert auto_threads({"LOCAL_WORLD_SIZE": "2"}) == 2 and auto_threads({"LOCAL_WORLD_SIZE": "8"}) == 1
        assert auto_threads({"OMP_NUM_THREADS": "3", "LOCAL_WORLD_SIZE": "2"}) == 3
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
        assert set_threads("auto") == 4 and torch.get_num_threads() == 4
        assert set_threads(3) == 3 and torch.get_num_threads() == 3
    finally:
        os.sched_setaffinity(0, mask)
        torch.set_num_threads(before)
