"""`flashdmd export`: an exported folder, loaded with plain diffusers and called with its documented
arguments, gives the same latents as flashdmd's own student sampler for the same seed (both families,
full and LoRA students), and bad input is a one-line error.

The diffusers side (:func:`diffusers_latents`) uses only diffusers, torch and json -- no flashdmd code.
"""
import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import tiny_models as tm  # noqa: E402

from flashdmd.cli import main  # noqa: E402
from flashdmd.inference import load_model  # noqa: E402
from flashdmd.sample import sample_latents  # noqa: E402
from flashdmd.training.config import DistillConfig  # noqa: E402
from flashdmd.training.distill import train  # noqa: E402
from tolerances import contract_bound, fp32_bound  # noqa: E402

PROMPTS = ["a photo of the digit seven", "a drawing of a cat"]
SEED = 7
# The export's contract: the exported pipeline reproduces the student sampler's latents within 1e-4 of latents of
# size ~1 (tests/tolerances.py: PIPELINE_CONTRACT, relative to the largest |latent| where that is larger).
contract = contract_bound


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Tiny teachers; 1-step distill runs (full SDXL and SD3; LoRA SD3 with rank 2, alpha 4 so the scale
    alpha/r matters; a large student learning rate so the one step moves the student visibly). The SDXL LoRA
    run folder is written directly by the run folder's writer (flashdmd.runfolder: run.json + the adapters of
    flashdmd.networks.lora, random LoRA B) to save a distill run: export only reads those files."""
    tmp = tmp_path_factory.mktemp("export")
    out = {}
    for family, make in (("sdxl", tm.sdxl_pipeline), ("sd3", tm.sd3_pipeline)):
        teacher = tm.save_pipeline(make(tmp), tmp / family)
        kinds = (("full", {}), ("lora", {"model_lora_rank": 2, "model_lora_alpha": 4.0})) if family == "sd3" \
            else (("full", {}),)
        for kind, kw in kinds:
            cfg = DistillConfig(model_teacher=str(teacher), run_batch_size=2, run_max_steps=1, disc_kind="none",
                                eval_every_steps=0, run_sample_every_steps=0, run_checkpoint_every_steps=0, run_seed=0,
                                student_lr=1e-3, **kw)
            train(cfg, tmp / f"run_{family}_{kind}", progress=False)
            out[family, kind] = tmp / f"run_{family}_{kind}"
    out["sdxl", "lora"] = _lora_run_folder(out["sdxl", "full"], tmp / "run_sdxl_lora", rank=2, alpha=4.0)
    return out


def _lora_run_folder(full_run: Path, folder: Path, rank: int, alpha: float) -> Path:
    from diffusers import UNet2DConditionModel

    from flashdmd import runfolder
    from flashdmd.networks import lora
    info = runfolder.read_record(full_run)
    info.update(lora_rank=rank, lora_alpha=alpha)
    unet = lora.attach(UNet2DConditionModel.from_pretrained(info["teacher_path"], subfolder="unet"), rank, alpha)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    folder.mkdir(parents=True)
    runfolder.write_student(folder, unet, rank)
    runfolder.write_record(folder, **{k: v for k, v in info.items() if k != "kind"})
    return folder


def load_pipeline(folder: Path):
    """Plain diffusers: the exported folder's pipeline (SD3 without T5 names the missing parts)."""
    from diffusers import DiffusionPipeline
    index = json.loads((folder / "model_index.json").read_text())
    kwargs = {k: None for k in ("text_encoder_3", "tokenizer_3") if k in index and index[k][0] is None}
    pipe = DiffusionPipeline.from_pretrained(folder, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipeline_latents(pipe, folder: Path, prompts, seed: int):
    """One call with the folder's documented arguments -> (latents, the scheduler's timesteps, export record)."""
    record = json.loads((folder / "flashdmd_export.json").read_text())
    sdxl = type(pipe).__name__ == "StableDiffusionXLPipeline"
    # SD3's pipeline does not hand its generator to scheduler.step: the global generator is the one stream
    gen = torch.Generator().manual_seed(seed) if sdxl else torch.manual_seed(seed)
    lat = pipe(prompts, guidance_scale=1.0, output_type="latent", generator=gen, **record["pipeline_kwargs"]).images
    return lat, [float(t) for t in pipe.scheduler.timesteps], record


def diffusers_latents(folder: Path, prompts, seed: int):
    return pipeline_latents(load_pipeline(folder), folder, prompts, seed)


def flashdmd_latents(run: Path, prompts, seed: int, teacher: bool = False):
    """flashdmd's student sampler (``teacher``: the same sampler and steps with the teacher's network)."""
    model = _loaded(run)
    if teacher:
        model = replace(model, net=model.family.denoiser)
    return sample_latents(model, prompts, torch.Generator().manual_seed(seed))


_MODELS = {}


def _loaded(run: Path):
    if run not in _MODELS:
        _MODELS[run] = load_model(str(run))
    return _MODELS[run]


def maxdiff(a, b) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize("family", ["sdxl", "sd3"])
def test_exported_pipeline_reproduces_the_student_sampler(runs, family, tmp_path):
    run = runs[family, "full"]
    out = tmp_path / "exported"
    assert main(["export", "--run", str(run), "--out", str(out)]) == 0
    lat, timesteps, record = diffusers_latents(out, PROMPTS, SEED)
    student_timesteps = json.loads((run / "run.json").read_text())["student_timesteps"]
    assert timesteps == student_timesteps == record["student_timesteps"]
    assert record["timesteps_exact"] and record["pipeline_kwargs"] == {"num_inference_steps": 4}
    ref = flashdmd_latents(run, PROMPTS, SEED)
    assert lat.shape == ref.shape == (2, 4, 16, 16)
    err = maxdiff(lat, ref)
    assert err <= contract(ref)
    # the exported denoiser is the student: the teacher's network in the same sampler lands elsewhere -- outside the
    # contract, and two orders of magnitude above the agreement just measured (other weights, not round-off)
    assert maxdiff(flashdmd_latents(run, PROMPTS, SEED, teacher=True), ref) > max(100 * err, contract(ref))
    assert "guidance_scale=1.0" in (out / "README.md").read_text()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith((".tmp", ".old"))]

    # sample_latents is flashdmd's stochastic student sampler with diffusers' draw order
    model = _loaded(run)
    fam = model.family
    g = torch.Generator().manual_seed(SEED)
    noise = torch.randn((2, 4, 16, 16), generator=g)
    again = fam.sample_latents(model.net, fam.encode_prompts(PROMPTS), noise, model.timesteps, stochastic=True,
                               generator=g, init="noise")
    assert torch.equal(again, ref)  # the same sampler, the same draws


@pytest.mark.parametrize("family", ["sdxl", "sd3"])
def test_lora_export_loads_with_load_lora_weights(runs, family, tmp_path):
    run = runs[family, "lora"]
    out = tmp_path / "lora"
    assert main(["export", "--run", str(run), "--out", str(out), "--lora"]) == 0
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    pipe = load_pipeline(out)
    bare, _, _ = pipeline_latents(pipe, out, PROMPTS, SEED)
    pipe.load_lora_weights(out)
    lat, _, _ = pipeline_latents(pipe, out, PROMPTS, SEED)
    ref = flashdmd_latents(run, PROMPTS, SEED)
    err = maxdiff(lat, ref)
    assert err <= contract(ref)
    # the adapter matters: the bare teacher with the same scheduler and seed lands elsewhere
    assert maxdiff(bare, ref) > max(100 * err, contract(ref))


def test_lora_run_without_flag_is_fused_into_a_full_denoiser(runs, tmp_path):
    run = runs["sdxl", "lora"]
    out = tmp_path / "fused"
    assert main(["export", "--run", str(run), "--out", str(out)]) == 0
    assert not (out / "pytorch_lora_weights.safetensors").exists()
    lat, _, record = diffusers_latents(out, PROMPTS, SEED)
    assert record["lora_fused"]
    ref = flashdmd_latents(run, PROMPTS, SEED)
    assert maxdiff(lat, ref) <= contract(ref)


def _one_line_error(capsys, argv):
    capsys.readouterr()  # drop earlier output (progress bars)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_bad_input_is_a_one_line_error(runs, tmp_path, capsys):
    not_a_run = tmp_path / "not_a_run"
    not_a_run.mkdir()
    (not_a_run / "something.txt").write_text("x")
    err = _one_line_error(capsys, ["export", "--run", str(not_a_run), "--out", str(tmp_path / "o1")])
    assert "not a flashdmd distill run" in err and not (tmp_path / "o1").exists()
    _one_line_error(capsys, ["export", "--run", str(tmp_path / "missing"), "--out", str(tmp_path / "o2")])
    err = _one_line_error(capsys, ["export", "--run", str(runs["sd3", "full"]), "--out", str(tmp_path / "o3"), "--lora"])
    assert "--lora needs a LoRA run" in err
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    err = _one_line_error(capsys, ["export", "--run", str(runs["sd3", "full"]), "--out", str(busy)])
    assert "not empty" in err and [p.name for p in busy.iterdir()] == ["keep.txt"]
    assert not [p for p in tmp_path.iterdir() if p.name.endswith((".tmp", ".old"))]


def test_flow_fit_hits_shifted_uniform_steps_for_other_k():
    """The FlowMatchLCM config fit is exact for the SD3-shifted uniform grids of other K and shifts too: up to the
    float32 round-off of timesteps near 1000 (the shift and * 1000 here, diffusers' sigmas and * 1000 there: ~10
    roundings)."""
    exact = fp32_bound(1000.0, 10)
    from flashdmd.diffusion.schedules import FlowSchedule
    from flashdmd.export import flow_lcm_scheduler
    for k, shift in ((1, 3.0), (2, 3.0), (3, 3.0), (6, 3.0), (4, 1.0), (4, 6.0)):
        unshifted = torch.tensor([1 - i / k for i in range(k)])
        target = FlowSchedule(shift=shift).shifted_timesteps(unshifted).tolist()
        _, call, err = flow_lcm_scheduler({"num_train_timesteps": 1000, "shift": shift}, target)
        assert call == {"num_inference_steps": k} and err <= exact, (k, shift, err)
    # steps that are no Moebius image of a uniform grid fall back to the pipeline's sigmas= argument
    _, call, err = flow_lcm_scheduler({"num_train_timesteps": 1000, "shift": 3.0}, [1000.0, 990.0, 400.0, 10.0])
    assert "sigmas" in call and err <= exact


def test_lcm_grid_search_and_fallback():
    from flashdmd.export import lcm_scheduler
    cfg = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}
    sched, call, err = lcm_scheduler(cfg, [999.0, 749.0, 499.0, 249.0])
    assert call == {"num_inference_steps": 4} and err == 0 and sched.config.original_inference_steps == 4
    _, call, err = lcm_scheduler(cfg, [999.0, 500.0])
    assert call == {"timesteps": [999, 500]} and err == 0
