"""`flashdmd info` reports the pixel resolution and latent shape a model works at (the diffusers pipeline's
default); `flashdmd sample` records every PNG's prompt, seed, steps and guidance in prompts.jsonl, keeping the lines
of earlier calls into the same folder and one line per PNG."""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import tiny_models as tm  # noqa: E402

from flashdmd.cli import main  # noqa: E402
from flashdmd.inference import TEACHER_DEFAULT_CFG, TEACHER_DEFAULT_STEPS  # noqa: E402


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("info_sample")
    return tm.save_pipeline(tm.sdxl_pipeline(tmp), tmp / "sdxl")


def test_info_prints_resolution_and_latent_shape(teacher, capsys):
    from diffusers import StableDiffusionXLPipeline
    capsys.readouterr()
    assert main(["info", "--model", str(teacher)]) == 0
    info = json.loads(capsys.readouterr().out)
    # what the diffusers pipeline draws when no height / width is given
    pipe = StableDiffusionXLPipeline.from_pretrained(teacher)
    side = pipe.default_sample_size * pipe.vae_scale_factor
    assert info["resolution"] == side == 32
    assert info["latent_shape"] == [pipe.unet.config.in_channels, side // pipe.vae_scale_factor,
                                    side // pipe.vae_scale_factor]


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "prompts.jsonl").read_text(encoding="utf-8").splitlines()]


def _pngs(out: Path) -> set[str]:
    return {p.name for p in out.glob("*.png")}


def test_sample_writes_prompts_jsonl_and_appends(teacher, tmp_path, capsys):
    out = tmp_path / "imgs"
    base = ["sample", "--model", str(teacher), "--out", str(out), "--steps", "2", "--cfg", "1"]
    assert main(base + ["--prompt", "a photo of the digit seven", "--prompt", "ein Äpfel \"quoted\"",
                        "--num-per-prompt", "2", "--seed", "3"]) == 0
    first = _log(out)
    assert first == [{"file": f"{i:04d}_seed{s}.png", "prompt": p, "seed": s, "steps": 2, "guidance_scale": 1.0}
                     for i, p in enumerate(["a photo of the digit seven", "ein Äpfel \"quoted\""]) for s in (3, 4)]
    assert {r["file"] for r in first} == _pngs(out)

    # a second call with new names: the earlier lines stay as they were, its own follow (defaults recorded)
    assert main(["sample", "--model", str(teacher), "--out", str(out), "--prompt", "a cat", "--seed", "9"]) == 0
    second = _log(out)
    assert second[:4] == first
    assert second[4:] == [{"file": "0000_seed9.png", "prompt": "a cat", "seed": 9, "steps": TEACHER_DEFAULT_STEPS,
                           "guidance_scale": TEACHER_DEFAULT_CFG}]

    # --overwrite of an existing PNG replaces its line: still one line per PNG, no temporary file left
    assert main(base + ["--prompt", "a dog", "--seed", "3", "--overwrite"]) == 0
    third = _log(out)
    assert [r["file"] for r in third] == ["0000_seed4.png", "0001_seed3.png", "0001_seed4.png", "0000_seed9.png",
                                          "0000_seed3.png"]
    assert third[-1]["prompt"] == "a dog" and third[:4] == second[1:]
    assert {r["file"] for r in third} == _pngs(out) and sorted(p.name for p in out.iterdir()) == sorted(
        _pngs(out) | {"prompts.jsonl", "metadata.jsonl"})
    # metadata.jsonl: the same PNGs with their prompts as captions (an image folder's captions file)
    assert [json.loads(x) for x in (out / "metadata.jsonl").read_text(encoding="utf-8").splitlines()] == [
        {"file_name": r["file"], "text": r["prompt"]} for r in third]

    # a log that is not JSON lines stops the call before it draws anything, with one line saying what to fix
    (out / "prompts.jsonl").write_text('{"file": "0000_seed3.png"}\nnot json\n')
    capsys.readouterr()
    assert main(base + ["--prompt", "a bird", "--seed", "20"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "prompts.jsonl line 2" in err, err
    assert "0000_seed20.png" not in _pngs(out)
