"""Both methods on a tiny random FLUX.1-dev-style teacher (issue 18, item 2): every role trains and the teacher
does not, full fine-tune and LoRA; the student is given the fixed embedded guidance and the DM loss's teacher
dm_guidance_scale; a saved student loads back with the run's resolution and guidance."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import tiny_models as tm  # noqa: E402

from flashdmd.training.distill import setup, train  # noqa: E402
from tolerances import U64, contract_bound, fp32_bound  # noqa: E402

RES = 32  # the tiny FLUX VAE's factor is 2: 16x16 latents, 64 tokens (its default resolution, 256 px, is slow)


def _cfg(folders, method, **kw):
    return tm.run_config(folders, "flux", method, data_resolution=RES, **kw)


@pytest.mark.parametrize("method", ["flashdmd", "dmd2"])
@pytest.mark.parametrize("lora", [0, 4])
def test_every_role_trains_and_not_the_teacher(tiny_run_folders, method, lora, tmp_path):
    cfg = _cfg(tiny_run_folders, method, model_lora_rank=lora)
    ctx = setup(cfg)
    assert ctx.family.name == "flux" and ctx.resolution == RES
    before = tm.snapshot_roles(ctx)
    train(cfg, tmp_path / "run", progress=False, ctx=ctx)
    tm.assert_roles_trained(ctx, before, lora=bool(lora))


def test_guidance_reaches_the_embedding(tiny_run_folders, tmp_path):
    """The DM loss's teacher forward gets dm_guidance_scale, the student's and the fake score's the fixed
    model_embedded_guidance."""
    cfg = _cfg(tiny_run_folders, "flashdmd", dm_guidance_scale=4.5, model_embedded_guidance=2.5, run_max_steps=1)
    ctx = setup(cfg)
    seen = {}
    hooks = [getattr(ctx, r).register_forward_pre_hook(
        lambda m, a, kw, r=r: seen.setdefault(r, set()).add(float(kw["guidance"][0])), with_kwargs=True)
        for r in ("teacher", "student", "fake_score")]
    try:
        train(cfg, tmp_path / "run", progress=False, ctx=ctx)
    finally:
        for h in hooks:
            h.remove()
    assert seen == {"teacher": {4.5}, "student": {2.5}, "fake_score": {2.5}}


def test_a_saved_student_loads_with_the_runs_resolution_and_guidance(tiny_run_folders, tmp_path):
    from flashdmd.inference import load_model
    cfg = _cfg(tiny_run_folders, "flashdmd", model_embedded_guidance=2.5, run_max_steps=1)
    ctx = setup(cfg)
    train(cfg, tmp_path / "run", progress=False, ctx=ctx)
    model = load_model(str(tmp_path / "run"))
    assert model.image_size == RES and model.family.embedded_guidance == 2.5
    assert model.family.schedule.shift == ctx.family.schedule.shift  # the same resolution, the same float64 formula
    # ... not the default resolution's: farther than float64 round-off of the formula (a few u64, relative)
    assert model.family.schedule.shift != pytest.approx(tm_default_shift(tiny_run_folders), rel=16 * U64)


def tm_default_shift(folders):
    from flashdmd.families import load_family
    return load_family(folders["flux"]).schedule.shift


@pytest.mark.parametrize("method", ["flashdmd"])  # DMD2's roles resume the same way on every family (test_resume.py)
def test_resume_is_bitwise_identical(tiny_run_folders, method, tmp_path):
    tm.assert_resume_bitwise(lambda **kw: _cfg(tiny_run_folders, method, **kw), tmp_path)


def test_stage2_runs_with_an_lrm_trained_by_flashdmds_commands(tiny_run_folders, tmp_path):
    """`flashdmd reward train` on a pairs file of the FLUX teacher's latents (written with the pairs API; make-pairs
    itself is tested on the other families), then joint RL with that LRM."""
    from flashdmd.cli import main
    from flashdmd.families import load_family
    from flashdmd.rewards.pairs import write_pairs
    # a VAE of factor 1: reward train works at the family's default resolution, 128 px here
    teacher = tm.save_pipeline(tm.flux_pipeline(tmp_path, vae_blocks=1), tmp_path / "flux128")
    fam = load_family(teacher)
    shape = fam.latent_shape(fam.default_resolution, fam.default_resolution)
    prompts = ["a red shoe", "a small bag", "a striped shirt", "a boot"]
    records = [{"prompt": p, "a": 2 * i, "b": 2 * i + 1, "preferred": "a"} for i, p in enumerate(prompts)]
    write_pairs(tmp_path / "pairs.jsonl", records, torch.randn(2 * len(prompts), *shape,
                                                               generator=torch.Generator().manual_seed(0)))
    assert main(["reward", "train", "--pairs", str(tmp_path / "pairs.jsonl"), "--family-model", str(teacher),
                 "--out", str(tmp_path / "lrm"), "--steps", "1", "--batch", "2", "--eval-draws", "1"]) == 0
    cfg = _cfg(tiny_run_folders, "flashdmd", model_teacher=str(teacher), run_max_steps=1, rl_enabled=True,
               rl_reward_model=str(tmp_path / "lrm"), rl_steps=2, rl_distill_ratio=2, rl_num_candidates=2)
    result = train(cfg, tmp_path / "run", progress=False)
    assert result["rl_steps"] == 2 and any("rl/loss" in h for h in result["history"])


@pytest.mark.parametrize("lora", [0, 2])
def test_export_runs_in_a_plain_flux_pipeline_and_reproduces_the_student(tiny_run_folders, lora, tmp_path):
    """`flashdmd export` -> FluxPipeline.from_pretrained, called with the folder's documented arguments (its
    guidance_scale is the embedded guidance the student was distilled with), gives flashdmd's student latents for
    the same seed; full student and LoRA (load_lora_weights)."""
    from diffusers import FluxPipeline

    from flashdmd.cli import main
    from flashdmd.families.flux import unpack
    from flashdmd.inference import load_model
    from flashdmd.sample import sample_latents
    kw = {"model_lora_rank": lora, "model_lora_alpha": 4.0} if lora else {}
    cfg = tm.run_config(tiny_run_folders, "flux", "flashdmd", data_resolution=RES, disc_kind="none", run_max_steps=1,
                        student_lr=1e-3, model_embedded_guidance=2.5, **kw)
    train(cfg, tmp_path / "run", progress=False)
    out = tmp_path / "exported"
    assert main(["export", "--run", str(tmp_path / "run"), "--out", str(out)] + (["--lora"] if lora else [])) == 0
    import json
    record = json.loads((out / "flashdmd_export.json").read_text())
    # the fit is exact up to float32 rounding of timesteps near 1000 (~10 roundings, tests/test_export.py)
    assert record["guidance_scale"] == 2.5 and record["max_timestep_error"] <= fp32_bound(1000.0, 10)
    assert "guidance_scale=2.5 is required" in (out / "README.md").read_text()
    pipe = FluxPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    if lora:
        pipe.load_lora_weights(out)
    prompts = ["a red shoe", "a small bag"]
    lat = pipe(prompts, height=RES, width=RES, guidance_scale=record["guidance_scale"], output_type="latent",
               max_sequence_length=512, generator=torch.manual_seed(11), **record["pipeline_kwargs"]).images
    assert [float(t) for t in pipe.scheduler.timesteps] == pytest.approx(record["student_timesteps"],
                                                                         abs=fp32_bound(1000.0, 10))
    model = load_model(str(tmp_path / "run"))
    ref = sample_latents(model, prompts, torch.manual_seed(11))
    got = unpack(lat, *ref.shape[-2:])
    assert (got - ref).abs().max().item() <= contract_bound(ref)  # the export contract, tests/tolerances.py
    # the exported network is the student: the teacher in the same sampler lands elsewhere (outside the contract)
    from dataclasses import replace
    teacher = sample_latents(replace(model, net=model.family.denoiser), prompts, torch.manual_seed(11))
    assert (teacher - ref).abs().max().item() > contract_bound(ref)
