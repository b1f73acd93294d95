"""Both methods on a tiny random Qwen-Image teacher (issue 30, items 3 and 4): every role trains and the teacher does
not, full fine-tune and LoRA; the DM loss's teacher runs the pipeline's true CFG (a [negative; prompt] pair); resume
is bitwise; Stage 2 runs with an LRM made by `flashdmd reward train` on this teacher and with a CLIP image judge; and
`flashdmd export` (full, fused LoRA, load_lora_weights) is reproduced by a plain QwenImagePipeline within 1e-4."""
import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import tiny_models as tm  # noqa: E402
import tiny_qwenimage as tq  # noqa: E402

from flashdmd.cli import main  # noqa: E402
from flashdmd.families import load_family  # noqa: E402
from flashdmd.families.qwenimage import unpack  # noqa: E402
from flashdmd.inference import load_model  # noqa: E402
from flashdmd.rewards.pairs import write_pairs  # noqa: E402
from flashdmd.sample import sample_latents  # noqa: E402
from flashdmd.training.distill import setup, train  # noqa: E402
from tolerances import assert_close, contract_bound, fp32_bound, network_factor  # noqa: E402

RES = 32  # the tiny VAE's factor is 2: 16x16 latents, 64 tokens (its default resolution, 256 px, is slow)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return tq.qwenimage_folders(tmp_path_factory)


def dead_text_tail(ctx) -> tuple[str, ...]:
    """QwenImageTransformer2DModel returns only the image stream: the last block's text-stream output (its attention's
    to_add_out and its txt_mlp) feeds nothing, so those tensors get no gradient by construction -- in the pipeline's
    network too. Excused in full fine-tunes (LoRA adapts the image-stream projections only)."""
    last = len(ctx.teacher.transformer_blocks) - 1
    return tuple(f"{role}.transformer_blocks.{last}.{m}" for role in ("student", "fake_score")
                 for m in ("attn.to_add_out", "txt_mlp"))


def _cfg(folders, method, **kw):
    return tm.run_config(folders, "qwenimage", method, data_resolution=RES, **{"run_max_steps": 2, **kw})


@pytest.mark.parametrize("method", ["flashdmd", "dmd2"])
@pytest.mark.parametrize("lora", [0, 4])
def test_every_role_trains_and_not_the_teacher(folders, method, lora, tmp_path):
    cfg = _cfg(folders, method, model_lora_rank=lora)
    ctx = setup(cfg)
    assert ctx.family.name == "qwenimage" and ctx.resolution == RES
    before = tm.snapshot_roles(ctx)
    train(cfg, tmp_path / "run", progress=False, ctx=ctx)
    tm.assert_roles_trained(ctx, before, lora=bool(lora), exempt=dead_text_tail(ctx))


def test_the_dm_teacher_runs_true_cfg_and_the_student_does_not(folders, tmp_path):
    """The teacher's DM-loss forward is the [negative; prompt] pair (twice the batch, padded masked text), the
    student's and the fake score's a single conditional forward."""
    cfg = _cfg(folders, "flashdmd", dm_guidance_scale=4.0, run_max_steps=1, run_batch_size=2)
    ctx = setup(cfg)
    seen = {}
    hooks = [getattr(ctx, r).register_forward_pre_hook(
        lambda m, a, kw, r=r: seen.setdefault(r, set()).add(kw["hidden_states"].shape[0]), with_kwargs=True)
        for r in ("teacher", "student", "fake_score")]
    try:
        train(cfg, tmp_path / "run", progress=False, ctx=ctx)
    finally:
        for h in hooks:
            h.remove()
    assert 4 in seen["teacher"] and seen["student"] == {2} and seen["fake_score"] == {2}


def test_resume_is_bitwise_identical(folders, tmp_path):
    tm.assert_resume_bitwise(lambda **kw: _cfg(folders, "flashdmd", **kw), tmp_path)


def test_stage2_runs_with_an_lrm_trained_by_flashdmds_commands(folders, tmp_path):
    """`flashdmd reward train` on a pairs file of the Qwen-Image teacher's latents (a VAE of factor 1: reward train
    works at the family's default resolution, 128 px here), then joint RL with that LRM."""
    teacher = folders["qwenimage128"]
    fam = load_family(teacher)
    shape = fam.latent_shape(fam.default_resolution, fam.default_resolution)
    prompts = ["a red shoe", "a small bag", "a striped shirt", "a boot"]
    records = [{"prompt": p, "a": 2 * i, "b": 2 * i + 1, "preferred": "a"} for i, p in enumerate(prompts)]
    write_pairs(tmp_path / "pairs.jsonl", records, torch.randn(2 * len(prompts), *shape,
                                                               generator=torch.Generator().manual_seed(0)))
    assert main(["reward", "train", "--pairs", str(tmp_path / "pairs.jsonl"), "--family-model", str(teacher),
                 "--out", str(tmp_path / "lrm"), "--steps", "1", "--batch", "2", "--eval-draws", "1",
                 "--proj-dim", "8", "--hidden-dim", "8"]) == 0
    cfg = _cfg(folders, "flashdmd", model_teacher=str(teacher), run_max_steps=1, rl_enabled=True,
               rl_reward_model=str(tmp_path / "lrm"), rl_steps=2, rl_distill_ratio=2, rl_num_candidates=2)
    result = train(cfg, tmp_path / "run", progress=False)
    assert result["rl_steps"] == 2 and any("rl/loss" in h for h in result["history"])


def test_stage2_runs_with_an_image_judge(folders, clip_dir, tmp_path):
    cfg = _cfg(folders, "flashdmd", run_max_steps=1, rl_enabled=True, rl_steps=1, rl_distill_ratio=0,
               rl_num_candidates=2, rl_step_indices=[0], rl_judge="clip", rl_judge_model=str(clip_dir))
    ctx = setup(cfg)
    before = tm.snapshot_roles(ctx)
    result = train(cfg, tmp_path / "run", progress=False, ctx=ctx)
    assert result["rl_steps"] == 1 and any("rl/loss" in h for h in result["history"])
    tm.assert_roles_trained(ctx, before, exempt=dead_text_tail(ctx))


@pytest.mark.parametrize("lora,flag", [(0, False), (2, False), (2, True)], ids=["full", "fused-lora", "lora-weights"])
def test_export_runs_in_a_plain_qwenimage_pipeline_and_reproduces_the_student(folders, lora, flag, tmp_path):
    """`flashdmd export` -> QwenImagePipeline.from_pretrained, called with the folder's documented arguments (no
    negative prompt: the teacher's true CFG is distilled in), gives flashdmd's student latents for the same seed:
    full student, LoRA fused into the transformer, and LoRA weights through load_lora_weights."""
    from diffusers import QwenImagePipeline

    kw = {"model_lora_rank": lora, "model_lora_alpha": 4.0} if lora else {}
    cfg = _cfg(folders, "flashdmd", disc_kind="none", run_max_steps=1, student_lr=1e-3, **kw)
    train(cfg, tmp_path / "run", progress=False)
    out = tmp_path / "exported"
    assert main(["export", "--run", str(tmp_path / "run"), "--out", str(out)] + (["--lora"] if flag else [])) == 0
    record = json.loads((out / "flashdmd_export.json").read_text())
    # the fit is exact up to float32 rounding of timesteps near 1000 (~10 roundings, tests/test_export.py)
    assert record["guidance_scale"] == 1.0 and record["max_timestep_error"] <= fp32_bound(1000.0, 10)
    assert record["lora"] == flag and record["lora_fused"] == (bool(lora) and not flag)
    # the README names the pipeline's own CFG keyword (its guidance_scale is for guidance-distilled models only)
    assert "**true_cfg_scale=1.0 is required.**" in (out / "README.md").read_text()
    pipe = QwenImagePipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    if flag:
        pipe.load_lora_weights(out)
    prompts = ["a red shoe", "a small bag"]
    lat = pipe(prompts, height=RES, width=RES, true_cfg_scale=record["guidance_scale"], output_type="latent",
               generator=torch.manual_seed(11), **record["pipeline_kwargs"]).images
    assert [float(t) for t in pipe.scheduler.timesteps] == pytest.approx(record["student_timesteps"],
                                                                         abs=fp32_bound(1000.0, 10))
    model = load_model(str(tmp_path / "run"))
    ref = sample_latents(model, prompts, torch.manual_seed(11))
    got = unpack(lat, *ref.shape[-2:])
    assert (got - ref).abs().max().item() <= contract_bound(ref)  # the export contract, tests/tolerances.py
    # the exported network is the student: the teacher in the same sampler lands elsewhere (outside the contract)
    teacher = sample_latents(replace(model, net=model.family.denoiser), prompts, torch.manual_seed(11))
    assert (teacher - ref).abs().max().item() > contract_bound(ref)


def test_a_text_cached_run_trains_from_padded_cached_rows(folders, tmp_path):
    """model_text_cache (the preset's): the masked embeddings of prompts of different lengths come from the cache,
    padded to the longest cached row; the cached batch's prediction is the directly encoded one's (the padding is
    masked out: the same attention up to the summation order of the longer masked rows)."""
    (tmp_path / "prompts.txt").write_text("a boot\na small striped shirt on a dark background\nthe cat\n")
    cfg = _cfg(folders, "flashdmd", model_lora_rank=4, run_max_steps=1, model_text_cache=True,
               data_prompts=str(tmp_path / "prompts.txt"))
    ctx = setup(cfg)
    train(cfg, tmp_path / "run", progress=False, ctx=ctx)
    fam = ctx.family
    assert fam.text_encoders_released and fam.cached_prompts > 2
    prompts = ["a boot", "the cat"]  # cached in one chunk with a longer prompt: padded beyond their own longest
    cached = fam.encode_prompts(prompts)
    direct = load_family(folders["qwenimage"]).encode_prompts(prompts)
    assert cached.prompt_embeds.shape[1] > direct.prompt_embeds.shape[1]
    x = torch.randn(2, 4, RES // 2, RES // 2, generator=torch.Generator().manual_seed(5))
    t = torch.tensor([800.0, 300.0])
    a = fam.raw_prediction(fam.denoiser, x, t, cached)
    b = fam.raw_prediction(fam.denoiser, x, t, direct)
    # two float paths through the network (tests/tolerances.py's network factor)
    assert_close(a, b, factor=network_factor(fam.denoiser))
