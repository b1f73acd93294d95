"""`flashdmd export --lora-format diffusers|kohya|comfyui`: each family's LoRA file, in each layout flashdmd writes,
is detected by the plain diffusers pipeline's ``load_lora_weights`` (its converters for kohya / ComfyUI layouts),
fused, and reproduces the fused export's 4-step latents within 1e-4 (tests/tolerances.py: the pipeline contract).

The LoRA runs and their fused exports: tests/export_runs.py.
"""
import json
from functools import partial
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
from export_runs import ALPHA, latents, shared_run  # noqa: E402

from flashdmd.cli import main  # noqa: E402
from tolerances import contract_bound  # noqa: E402


@pytest.fixture
def export_runs(tmp_path_factory):
    """family -> the session's shared LoRA run and fused export (tests/export_runs.py)."""
    return partial(shared_run, tmp_path_factory)


CASES = [("sdxl", "kohya", "lora_unet_"), ("sd3", "comfyui", "transformer."),
         ("flux", "comfyui", "transformer."), ("qwenimage", "comfyui", "diffusion_model.transformer_blocks."),
         ("zimage", "comfyui", "diffusion_model."), ("flux2-klein", "comfyui", "diffusion_model.double_blocks.")]


@pytest.mark.parametrize("family,fmt,prefix", CASES, ids=[f"{f}-{m}" for f, m, _ in CASES])
def test_lora_format_loads_back_and_reproduces_the_fused_export(export_runs, family, fmt, prefix, tmp_path):
    run, _, _, ref = export_runs(family)
    out = tmp_path / "lora"
    assert main(["export", "--run", str(run), "--out", str(out), "--lora-format", fmt]) == 0
    record = json.loads((out / "flashdmd_export.json").read_text())
    name = record["lora_weights"]
    assert record["lora"] and record["lora_format"] == fmt and (out / name).is_file()
    keys = list(load_file(str(out / name)))
    assert keys and all(k.startswith(prefix) for k in keys)
    if fmt == "kohya":
        alphas = {k: v for k, v in load_file(str(out / name)).items() if k.endswith(".alpha")}
        assert alphas and all(float(v) == ALPHA for v in alphas.values())  # the run's alpha, not the rank
    got = latents(out, family, weight_name=name)
    assert got.shape == ref.shape
    err = (got - ref).abs().max().item()
    assert err <= contract_bound(ref)
    # the adapter matters: the bare teacher in the same pipeline lands elsewhere
    bare = latents(out, family)
    assert (bare - ref).abs().max().item() > max(100 * err, contract_bound(ref))


def test_bad_lora_format_is_a_one_line_error(export_runs, tmp_path, capsys):
    run3 = export_runs("sd3")[0]
    capsys.readouterr()
    assert main(["export", "--run", str(run3), "--out", str(tmp_path / "o"), "--lora-format", "kohya"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "kohya is for SDXL" in err
    assert not (tmp_path / "o").exists()


def test_sdxl_comfyui_is_the_kohya_file(export_runs, tmp_path):
    """ComfyUI loads SDXL LoRAs in kohya's layout: --lora-format comfyui writes the same tensors under the same keys
    (the kohya case above loads them back)."""
    run = export_runs("sdxl")[0]
    files = {}
    for fmt in ("kohya", "comfyui"):
        out = tmp_path / fmt
        assert main(["export", "--run", str(run), "--out", str(out), "--lora-format", fmt]) == 0
        files[fmt] = load_file(str(out / json.loads((out / "flashdmd_export.json").read_text())["lora_weights"]))
    assert files["kohya"].keys() == files["comfyui"].keys()
    assert all(torch.equal(files["kohya"][k], files["comfyui"][k]) for k in files["kohya"])
