"""`flashdmd export --lora-format diffusers|kohya|comfyui`: each family's LoRA file, in each layout flashdmd writes,
is detected by the plain diffusers pipeline's ``load_lora_weights`` (its converters for kohya / ComfyUI layouts),
fused, and reproduces the fused export's 4-step latents within 1e-4 (tests/tolerances.py: the pipeline contract).

The LoRA run folders are written by the run folder's writer (flashdmd.runfolder: run.json + random adapters with
rank 2 and alpha 4, so that alpha / rank matters): export only reads those files.
"""
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
import tiny_flux2  # noqa: E402
import tiny_models as tm  # noqa: E402
import tiny_qwenimage  # noqa: E402
import tiny_zimage  # noqa: E402

from flashdmd import runfolder  # noqa: E402
from flashdmd.cli import main  # noqa: E402
from flashdmd.families import FAMILIES, load_family  # noqa: E402
from flashdmd.networks import lora  # noqa: E402
from tolerances import contract_bound  # noqa: E402

RANK, ALPHA = 2, 4.0
PROMPTS = ["a red shoe", "a small bag"]
SEED = 11
# family -> (tiny pipeline builder, resolution of the call)
TEACHERS = {"sdxl": (tm.sdxl_pipeline, 32), "sd3": (tm.sd3_pipeline, 32), "flux": (tm.flux_pipeline, 32),
            "qwenimage": (tiny_qwenimage.qwenimage_pipeline, 32), "zimage": (tiny_zimage.zimage_pipeline, 48),
            "flux2-klein": (tiny_flux2.klein_pipeline, 32)}


def lora_run(tmp: Path, family: str, make=None) -> Path:
    """A tiny teacher folder (``make``: another builder than TEACHERS') and a LoRA run folder on it (random lora_B,
    so that the adapter changes the output)."""
    make, res = make or TEACHERS[family][0], TEACHERS[family][1]
    teacher = tm.save_pipeline(make(tmp), tmp / f"teacher_{family}")
    fam = load_family(teacher)
    net = lora.attach(fam.denoiser, RANK, ALPHA)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    run = tmp / f"run_{family}"
    run.mkdir()
    runfolder.write_student(run, net, RANK)
    runfolder.write_record(run, teacher=str(teacher), family=fam.name, teacher_path=str(teacher),
                           student_timesteps=[float(t) for t in fam.default_student_timesteps], resolution=res,
                           embedded_guidance=3.5, lora_rank=RANK, lora_alpha=ALPHA, generator_steps=1, rl_steps=0,
                           method="flashdmd")
    return run


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return {}, tmp_path_factory.mktemp("formats")


def _run(runs, family):
    cache, tmp = runs
    if family not in cache:
        run = lora_run(tmp, family)
        fused = tmp / f"fused_{family}"
        assert main(["export", "--run", str(run), "--out", str(fused)]) == 0
        cache[family] = run, latents(fused, family)
    return cache[family]


def latents(folder: Path, family: str, weight_name: str | None = None):
    """Plain diffusers: the folder's pipeline (with ``weight_name``: its LoRA file loaded and fused), called with
    the folder's documented arguments."""
    from diffusers import DiffusionPipeline
    record = json.loads((folder / "flashdmd_export.json").read_text())
    pipe = DiffusionPipeline.from_pretrained(folder, **{k: None for k in record["missing_components"]})
    pipe.set_progress_bar_config(disable=True)
    if weight_name:
        pipe.load_lora_weights(folder, weight_name=weight_name)
        pipe.fuse_lora()
    res = TEACHERS[family][1]
    gen = torch.Generator().manual_seed(SEED) if family == "sdxl" else torch.manual_seed(SEED)
    kw = {FAMILIES[family].pipeline_guidance_kwarg: record["guidance_scale"]}
    # a copy: ZImagePipeline.encode_prompt rewrites the list in place (chat template)
    return pipe(prompt=list(PROMPTS), height=res, width=res, output_type="latent", generator=gen, **kw,
                **record["pipeline_kwargs"]).images


CASES = [("sdxl", "kohya", "lora_unet_"), ("sdxl", "comfyui", "lora_unet_"), ("sd3", "comfyui", "transformer."),
         ("flux", "comfyui", "transformer."), ("qwenimage", "comfyui", "diffusion_model.transformer_blocks."),
         ("zimage", "comfyui", "diffusion_model."), ("flux2-klein", "comfyui", "diffusion_model.double_blocks.")]


@pytest.mark.parametrize("family,fmt,prefix", CASES, ids=[f"{f}-{m}" for f, m, _ in CASES])
def test_lora_format_loads_back_and_reproduces_the_fused_export(runs, family, fmt, prefix, tmp_path):
    run, ref = _run(runs, family)
    out = tmp_path / "lora"
    assert main(["export", "--run", str(run), "--out", str(out), "--lora-format", fmt]) == 0
    record = json.loads((out / "flashdmd_export.json").read_text())
    name = record["lora_weights"]
    assert record["lora"] and record["lora_format"] == fmt and (out / name).is_file()
    keys = list(load_file(str(out / name)))
    assert keys and all(k.startswith(prefix) for k in keys)
    if fmt == "kohya" or (fmt == "comfyui" and family == "sdxl"):
        alphas = {k: v for k, v in load_file(str(out / name)).items() if k.endswith(".alpha")}
        assert alphas and all(float(v) == ALPHA for v in alphas.values())  # the run's alpha, not the rank
    got = latents(out, family, weight_name=name)
    assert got.shape == ref.shape
    err = (got - ref).abs().max().item()
    assert err <= contract_bound(ref)
    # the adapter matters: the bare teacher in the same pipeline lands elsewhere
    bare = latents(out, family)
    assert (bare - ref).abs().max().item() > max(100 * err, contract_bound(ref))


def test_bad_lora_format_is_a_one_line_error(runs, tmp_path, capsys):
    run3, _ = _run(runs, "sd3")
    capsys.readouterr()
    assert main(["export", "--run", str(run3), "--out", str(tmp_path / "o"), "--lora-format", "kohya"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "kohya is for SDXL" in err
    assert not (tmp_path / "o").exists()
