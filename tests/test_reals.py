"""Teacher-made real images: `flashdmd sample`'s folder is a data_real as it stands; `flashdmd make-reals` draws with
the teacher's own pipeline defaults, resumes to the same bytes, shards over processes (simulated and one real
2-process launch) and refuses bad input in one line."""
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
import tiny_models as tm  # noqa: E402

from flashdmd import FlashDMDError, reals  # noqa: E402
from flashdmd.cli import main  # noqa: E402
from flashdmd.data import open_image_source  # noqa: E402
from flashdmd.inference import TEACHER_DEFAULT_CFG, TEACHER_DEFAULT_STEPS  # noqa: E402

PROMPTS = ["a photo of the digit seven", "ein Äpfel \"quoted\"", "a drawing of a cat"]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reals")
    return tm.save_pipeline(tm.sdxl_pipeline(tmp), tmp / "sdxl")


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    return path


def _args(teacher, prompt_file, out, num=7, *extra):
    return ["make-reals", "--model", str(teacher), "--prompts", str(prompt_file), "--num", str(num), "--out", str(out),
            "--steps", "2", "--batch-size", "3", "--no-progress", *extra]


@pytest.fixture(scope="module")
def full(teacher, prompt_file, tmp_path_factory):
    """An uninterrupted make-reals run: 7 images over 3 prompts, batches of 3, 2 steps."""
    out = tmp_path_factory.mktemp("full") / "reals"
    assert main(_args(teacher, prompt_file, out)) == 0
    return out


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB")).astype(np.int16)


def _pngs(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.png"))}


def _one_line_error(capsys, argv) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def test_sample_folder_is_a_data_real(teacher, tmp_path):
    out = tmp_path / "samples"
    base = ["sample", "--model", str(teacher), "--out", str(out), "--steps", "1", "--cfg", "1", "--no-progress"]
    assert main(base + ["--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--num-per-prompt", "2"]) == 0
    assert main(base + ["--prompt", PROMPTS[2], "--overwrite"]) == 0   # replaces 0000_seed0.png and its caption
    src = open_image_source(out)
    want = {"0000_seed0.png": PROMPTS[2], "0000_seed1.png": PROMPTS[0], "0001_seed0.png": PROMPTS[1],
            "0001_seed1.png": PROMPTS[1]}
    assert len(src) == 4
    for i in range(len(src)):
        image, caption = src.read(i)
        assert caption == want[Path(src.name(i)).name] and image.size == (32, 32)


def test_defaults_are_the_pipeline_call(teacher, prompt_file, tmp_path):
    """No --steps / --cfg: the teacher's own 50 steps and guidance, image i with seed SEED*1e8+i -- the image the
    diffusers pipeline draws for that prompt and seed with its defaults; the folder reads back with its captions."""
    from diffusers import StableDiffusionXLPipeline
    out = tmp_path / "reals"
    assert main(["make-reals", "--model", str(teacher), "--prompts", str(prompt_file), "--num", "1", "--seed", "1",
                 "--out", str(out), "--no-progress"]) == 0
    record = json.loads((out / reals.MANIFEST).read_text())
    assert record["sampler_steps"] == TEACHER_DEFAULT_STEPS and record["guidance_scale"] == TEACHER_DEFAULT_CFG
    pipe = StableDiffusionXLPipeline.from_pretrained(teacher)
    pipe.set_progress_bar_config(disable=True)
    img = pipe(PROMPTS[0], output_type="np", generator=torch.Generator().manual_seed(reals.MAX_NUM)).images[0]
    # one 8-bit level: the two float images agree to round-off (tests/test_sample.py), quantised to the same level
    # or, next to a rounding boundary, its neighbour
    assert np.abs(_pixels(out / "00000000.png") - (img * 255).round().astype(np.int16)).max() <= 1
    src = open_image_source(out)
    assert len(src) == 1 and src.caption(0) == PROMPTS[0]
    assert [json.loads(x) for x in (out / "metadata.jsonl").read_text().splitlines()] == [
        {"file_name": "00000000.png", "text": PROMPTS[0], "seed": 10 ** 8}]


def test_an_interrupted_run_continues_to_the_same_bytes(teacher, prompt_file, full, tmp_path, monkeypatch, capsys):
    want = _pngs(full)
    assert sorted(want) == [f"{i:08d}.png" for i in range(7)]
    out = tmp_path / "reals"
    saved = []
    real_save = reals.save_png

    def stop_after_four(px, path):
        if len(saved) == 4:   # inside the second batch: images 0-3 written, 4 and 5 not
            raise KeyboardInterrupt
        real_save(px, path)
        saved.append(path.name)

    monkeypatch.setattr(reals, "save_png", stop_after_four)
    assert main(_args(teacher, prompt_file, out)) == 130
    monkeypatch.undo()
    assert sorted(_pngs(out)) == [f"{i:08d}.png" for i in range(4)] and not (out / "metadata.jsonl").exists()
    (out / "00000004.png.tmp").write_bytes(b"half a png")   # a process killed inside an atomic write
    assert main(_args(teacher, prompt_file, out)) == 0
    assert _pngs(out) == want and not list(out.glob("*.tmp"))
    assert (out / "metadata.jsonl").read_bytes() == (full / "metadata.jsonl").read_bytes()
    # a partial folder: only the missing image is drawn (its batch again, whole), the same bytes
    (out / "00000005.png").unlink()
    before = {n: (out / n).stat().st_mtime_ns for n in want if n != "00000005.png"}
    assert main(_args(teacher, prompt_file, out)) == 0
    assert _pngs(out) == want and before == {n: (out / n).stat().st_mtime_ns for n in before}
    # a finished folder: nothing to draw, the teacher is not even loaded
    monkeypatch.setattr(reals, "load_model", lambda *a, **k: pytest.fail("loaded the teacher for nothing"))
    assert main(_args(teacher, prompt_file, out)) == 0 and _pngs(out) == want
    monkeypatch.undo()
    assert "make-reals:" not in capsys.readouterr().err   # --no-progress
    # a larger --num continues the same folder: the first 7 stay, 2 more are drawn; the progress bar (without
    # --no-progress) starts at the 7 there and ends with tqdm's [elapsed<remaining, rate]
    assert main(_args(teacher, prompt_file, out, 9)[:-1]) == 0
    err = capsys.readouterr().err
    assert "make-reals:  78%" in err and "make-reals: 100%" in err and "9/9 [" in err and "<" in err, err[-500:]
    assert {n: b for n, b in _pngs(out).items() if n in want} == want and len(_pngs(out)) == 9
    assert len(open_image_source(out)) == 9 and open_image_source(out).caption(8) == PROMPTS[8 % 3]


def test_shards_cover_every_image_once(teacher, prompt_file, full, tmp_path):
    for world in (1, 2, 3, 8):
        for batch in (1, 3):
            shards = [reals.shard(7, r, world, batch) for r in range(world)]
            got = sorted(i for s in shards for b in s for i in b)
            assert got == list(range(7))
            assert all(i % world == r and len(b) <= batch for r, s in enumerate(shards) for b in s for i in b)
    # three processes simulated one after the other: every image, the same ones as one process draws
    req = reals.Request(str(teacher), tuple(PROMPTS), 7, steps=2, batch_size=3)
    out = tmp_path / "reals"

    def state(rank):
        return SimpleNamespace(device=torch.device("cpu"), process_index=rank, num_processes=3,
                               is_main_process=rank == 0, wait_for_everyone=lambda: None)
    with pytest.raises(FlashDMDError, match="4 of the 7 images are missing"):   # rank 0 alone: 0, 3, 6
        reals.make_reals(req, out, progress=False, state=state(0))
    assert sorted(_pngs(out)) == ["00000000.png", "00000003.png", "00000006.png"]
    for rank in (2, 1, 0):
        reals.make_reals(req, out, progress=False, state=state(rank))
    assert (out / "metadata.jsonl").read_bytes() == (full / "metadata.jsonl").read_bytes()
    for name, data in _pngs(full).items():
        # other batches than one process's: the same images up to round-off of other batch shapes (one 8-bit level)
        assert np.abs(_pixels(out / name) - _pixels(full / name)).max() <= 1


def test_two_processes(teacher, prompt_file, full, tmp_path):
    """Two real processes joined over gloo, started with the variables torchrun and accelerate launch set (RANK,
    WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT; the launchers' own start-up is left out): rank r draws
    i mod 2 == r, rank 0 writes the metadata after both finished. (torchrun's own options take --num, so the command
    uses its alias --num-images.)"""
    out = tmp_path / "two"
    argv = ["make-reals", "--model", str(teacher), "--prompts", str(prompt_file), "--num-images", "7", "--steps", "2",
            "--batch-size", "3", "--no-progress"]
    with socket.socket() as sock:   # a port free now (the suite runs files side by side)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    launch = {"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    procs = [subprocess.Popen([sys.executable, "-m", "flashdmd.cli", *argv, "--out", str(out)],
                              env={**os.environ, **launch, "RANK": str(r), "LOCAL_RANK": str(r), "HF_HUB_OFFLINE": "1",
                                   "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][1][-2000:] + outs[1][1][-2000:]
    assert "2 process(es)" in outs[0][0] and "images and metadata.jsonl" not in outs[1][0]   # the main process
    # the same images as one process draws with these settings (the fixture `full`)
    assert (out / "metadata.jsonl").read_bytes() == (full / "metadata.jsonl").read_bytes()
    assert sorted(_pngs(out)) == sorted(_pngs(full))
    for name in _pngs(full):   # other batches (rank 0: [0, 2, 4], [6]): one 8-bit level, as above
        assert np.abs(_pixels(out / name) - _pixels(full / name)).max() <= 1


def test_bad_input_is_one_line(teacher, prompt_file, full, tmp_path, capsys):
    out = tmp_path / "o"
    err = _one_line_error(capsys, _args(teacher, tmp_path / "missing.txt", out))
    assert "prompt file" in err and "not found" in err
    assert "--num must be between 1" in _one_line_error(capsys, _args(teacher, prompt_file, out, 0))
    assert "--batch-size must be >= 1" in _one_line_error(capsys, _args(teacher, prompt_file, out, 3, "--batch-size",
                                                                         "0"))
    assert "--seed must be" in _one_line_error(capsys, _args(teacher, prompt_file, out, 3, "--seed", "-1"))
    assert "not found" in _one_line_error(capsys, _args(tmp_path / "nope", prompt_file, out))
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"kind": "flashdmd-distill-run", "teacher": str(teacher),
                                              "family": "sdxl", "student_timesteps": [999.0]}))
    err = _one_line_error(capsys, _args(run, prompt_file, out))
    assert "is a distill run" in err and f"--model {teacher}" in err
    other = tmp_path / "other"
    other.mkdir()
    (other / ".DS_Store").write_bytes(b"x")   # hidden: an image folder skips it, so may make-reals
    (other / "cat.jpg").write_bytes(b"x")
    err = _one_line_error(capsys, _args(teacher, prompt_file, other))
    assert "holds cat.jpg (not written by make-reals)" in err
    (other / "cat.jpg").rename(other / "notes.tmp")   # a .tmp that no make-reals write leaves
    assert "holds notes.tmp (not written by make-reals)" in _one_line_error(capsys, _args(teacher, prompt_file, other))
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    assert "is not a folder" in _one_line_error(capsys, _args(teacher, prompt_file, a_file))
    # the folder of an earlier call with other settings, or with images beyond --num
    copy = tmp_path / "copy"
    shutil.copytree(full, copy)
    before = _pngs(copy)
    err = _one_line_error(capsys, _args(teacher, prompt_file, copy, 7, "--seed", "1"))
    assert "other settings (seed: 0 there, 1 now)" in err
    assert "holds 00000005.png (an image of index >= --num 5)" in _one_line_error(
        capsys, _args(teacher, prompt_file, copy, 5))
    (copy / reals.MANIFEST).unlink()
    assert "holds images but no make-reals.json" in _one_line_error(capsys, _args(teacher, prompt_file, copy))
    assert _pngs(copy) == before   # nothing drawn or removed
    assert not out.exists()        # every check ran before the folder was made
