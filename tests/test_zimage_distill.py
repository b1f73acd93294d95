"""Both methods on a tiny random Z-Image teacher (issue 30, item 3-4): every role trains and the teacher does not, full
fine-tune and LoRA; the DM loss's teacher runs true CFG as a [uncond; cond] pair and the student one forward; resume
is bit-exact; Stage 2 runs with an LRM made by `flashdmd reward train` on this teacher and with an image judge; and
`flashdmd export` (full, fused LoRA, load_lora_weights) is reproduced by a plain ZImagePipeline within 1e-4."""
import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import tiny_models as tm  # noqa: E402
import tiny_zimage as tz  # noqa: E402

from flashdmd.cli import main  # noqa: E402
from flashdmd.families import load_family  # noqa: E402
from flashdmd.inference import load_model  # noqa: E402
from flashdmd.rewards.pairs import write_pairs  # noqa: E402
from flashdmd.sample import sample_latents  # noqa: E402
from flashdmd.training.distill import setup, train  # noqa: E402
from tolerances import contract_bound, fp32_bound  # noqa: E402

# the tiny VAE's factor is 2: 24x24 latents, 144 image tokens (its default resolution, 256 px, is slow). Not a multiple
# of the transformer's 32-token blocks on purpose: the image is padded with x_pad_token, so that trains too (at 32 px
# its 64 tokens need no padding and x_pad_token gets no gradient)
RES = 48
PROMPTS = ["a red shoe", "a small bag", "a striped shirt", "a boot"]


@pytest.fixture(scope="module")
def folders(tiny_run_folders, tmp_path_factory):
    return dict(tiny_run_folders, **tz.session_folders(tmp_path_factory))


def _cfg(folders, method, **kw):
    return tm.run_config(folders, "zimage", method, data_resolution=RES, **kw)


@pytest.mark.parametrize("method", ["flashdmd", "dmd2"])
@pytest.mark.parametrize("lora", [0, 4])
def test_every_role_trains_and_not_the_teacher(folders, method, lora, tmp_path):
    cfg = _cfg(folders, method, model_lora_rank=lora, run_max_steps=2)
    ctx = setup(cfg)
    assert ctx.family.name == "zimage" and ctx.resolution == RES
    before = tm.snapshot_roles(ctx)
    train(cfg, tmp_path / "run", progress=False, ctx=ctx)
    tm.assert_roles_trained(ctx, before, lora=bool(lora))


def test_the_dm_teacher_runs_true_cfg_and_the_student_one_forward(folders, tmp_path):
    """Z-Image has no guidance embedding: dm_guidance_scale != 1 makes the teacher's forward a [uncond; cond] batch
    of 2B frames; the student and the fake score get B."""
    cfg = _cfg(folders, "flashdmd", dm_guidance_scale=6.0, run_max_steps=1, disc_kind="none")
    ctx = setup(cfg)
    seen = {}
    hooks = [getattr(ctx, r).register_forward_pre_hook(
        lambda m, a, kw, r=r: seen.setdefault(r, set()).add(len(a[0] if a else kw["x"])), with_kwargs=True)
        for r in ("teacher", "student", "fake_score")]
    try:
        train(cfg, tmp_path / "run", progress=False, ctx=ctx)
    finally:
        for h in hooks:
            h.remove()
    b = cfg.run_batch_size
    assert seen == {"teacher": {2 * b}, "student": {b}, "fake_score": {b}}


def test_resume_is_bitwise_identical(folders, tmp_path):
    tm.assert_resume_bitwise(lambda **kw: _cfg(folders, "flashdmd", **kw), tmp_path)


def test_stage2_runs_with_an_lrm_trained_by_flashdmds_commands(folders, tmp_path):
    """`flashdmd reward train` on a pairs file of the Z-Image teacher's latents (a factor-1 VAE: the default resolution
    is 128 px), then joint RL with that LRM."""
    teacher = folders["zimage128"]
    fam = load_family(teacher)
    shape = fam.latent_shape(fam.default_resolution, fam.default_resolution)
    records = [{"prompt": p, "a": 2 * i, "b": 2 * i + 1, "preferred": "a"} for i, p in enumerate(PROMPTS)]
    write_pairs(tmp_path / "pairs.jsonl", records, torch.randn(2 * len(PROMPTS), *shape,
                                                               generator=torch.Generator().manual_seed(0)))
    assert main(["reward", "train", "--pairs", str(tmp_path / "pairs.jsonl"), "--family-model", str(teacher),
                 "--out", str(tmp_path / "lrm"), "--steps", "1", "--batch", "2", "--eval-draws", "1",
                 "--proj-dim", "8", "--hidden-dim", "8"]) == 0
    assert json.loads((tmp_path / "lrm" / "lrm.json").read_text())["family"] == "zimage"
    cfg = _cfg(folders, "flashdmd", model_teacher=str(teacher), run_max_steps=1, rl_enabled=True,
               rl_reward_model=str(tmp_path / "lrm"), rl_steps=2, rl_distill_ratio=2, rl_num_candidates=2)
    result = train(cfg, tmp_path / "run", progress=False)
    assert result["rl_steps"] == 2 and any("rl/loss" in h for h in result["history"])


def test_stage2_runs_with_an_image_judge(folders, clip_dir, tmp_path):
    cfg = _cfg(folders, "flashdmd", disc_kind="none", run_max_steps=1, rl_enabled=True, rl_steps=2,
               rl_distill_ratio=2, rl_num_candidates=2, rl_judge="clip", rl_judge_model=str(clip_dir))
    ctx = setup(cfg)
    before = {n: p.detach().clone() for n, p in ctx.student.named_parameters() if p.requires_grad}
    result = train(cfg, tmp_path / "run", progress=False, ctx=ctx)
    assert result["rl_steps"] == 2 and any("rl/loss" in h for h in result["history"])
    assert all(not torch.equal(p, before[n]) for n, p in ctx.student.named_parameters() if n in before)


@pytest.mark.parametrize("lora,flag", [(0, False), (2, False), (2, True)], ids=["full", "lora-fused", "lora-file"])
def test_export_runs_in_a_plain_zimage_pipeline_and_reproduces_the_student(folders, lora, flag, tmp_path):
    """`flashdmd export` -> ZImagePipeline.from_pretrained, called with the folder's documented arguments
    (guidance_scale 0: ZImagePipeline's no-CFG value), gives flashdmd's student latents for the same seed: the full
    student, a LoRA fused into the transformer, and a LoRA file through load_lora_weights."""
    from diffusers import ZImagePipeline

    kw = {"model_lora_rank": lora, "model_lora_alpha": 4.0} if lora else {}
    cfg = _cfg(folders, "flashdmd", disc_kind="none", run_max_steps=1, student_lr=1e-3, **kw)
    train(cfg, tmp_path / "run", progress=False)
    out = tmp_path / "exported"
    assert main(["export", "--run", str(tmp_path / "run"), "--out", str(out)] + (["--lora"] if flag else [])) == 0
    record = json.loads((out / "flashdmd_export.json").read_text())
    # the fit is exact up to float32 rounding of timesteps near 1000 (~10 roundings, tests/test_export.py)
    assert record["guidance_scale"] == 0.0 and record["max_timestep_error"] <= fp32_bound(1000.0, 10)
    assert record["lora_fused"] == (bool(lora) and not flag)
    assert "guidance_scale=0.0 is required" in (out / "README.md").read_text()
    pipe = ZImagePipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    if flag:
        pipe.load_lora_weights(out)
    prompts = PROMPTS[:2]  # a copy goes to the pipeline: its encode_prompt rewrites the list in place (chat template)
    got = pipe(list(prompts), height=RES, width=RES, guidance_scale=record["guidance_scale"], output_type="latent",
               generator=torch.manual_seed(11), **record["pipeline_kwargs"]).images
    assert [float(t) for t in pipe.scheduler.timesteps] == pytest.approx(record["student_timesteps"],
                                                                         abs=fp32_bound(1000.0, 10))
    model = load_model(str(tmp_path / "run"))
    ref = sample_latents(model, prompts, torch.manual_seed(11))
    assert (got - ref).abs().max().item() <= contract_bound(ref)  # the export contract, tests/tolerances.py
    # the exported network is the student: the teacher in the same sampler lands elsewhere (outside the contract)
    teacher = sample_latents(replace(model, net=model.family.denoiser), prompts, torch.manual_seed(11))
    assert (teacher - ref).abs().max().item() > contract_bound(ref)
