"""`flashdmd world pretrain`: tokenizer, model configs, a --quick end-to-end run and the diffusers pipelines.

The end-to-end run trains every stage for a few steps on 64 images into a tmp dir, then loads the written
folders with StableDiffusionXLPipeline / StableDiffusion3Pipeline and samples 2 steps at 32x32.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

from flashdmd import FlashDMDError  # noqa: E402
from flashdmd.families import sd3 as sd3_family  # noqa: E402
from flashdmd.world import models as M  # noqa: E402
from flashdmd.world import pretrain, pretrain_loop  # noqa: E402
from tests.tolerances import assert_close, network_factor  # noqa: E402
from flashdmd.world.prompts import vocabulary  # noqa: E402
from flashdmd.world.tokenizer import load_tokenizer, make_tokenizer, write_tokenizer_files  # noqa: E402

ASSETS = Path(pretrain.__file__).parent / "assets"


def _args(out: Path, **kw) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    pretrain.add_arguments(parser)
    argv = ["--out", str(out)]
    for k, v in kw.items():
        flag = "--" + k.replace("_", "-")
        argv += [flag] if v is True else [flag, str(v)]
    return parser.parse_args(argv)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pretrain")
    assert pretrain.run(_args(out, only="text,vae,sdxl,sd3", quick=True, no_progress=True, no_samples=True)) == 0
    return out


def test_tokenizer_is_deterministic_real_clip_bpe(tmp_path):
    tok = make_tokenizer(tmp_path / "a")
    write_tokenizer_files(tmp_path / "b")
    for f in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
    assert type(tok).__name__ == "CLIPTokenizer" and len(tok) > 100 and tok.model_max_length == 16
    assert all(len(tok(w, add_special_tokens=False).input_ids) == 1 for w in vocabulary())
    ids = tok("a photo of a t-shirt").input_ids
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id == len(tok) - 1
    with pytest.raises(FlashDMDError):
        load_tokenizer(tmp_path / "missing")


def test_sd3_pad_count_attention_equals_pipeline_zero_t5_tokens():
    torch.manual_seed(0)
    cfg = {**M.transformer_config(), "num_layers": 2}
    from diffusers import SD3Transformer2DModel
    net = SD3Transformer2DModel(**cfg).eval()
    clip = torch.randn(2, 16, cfg["joint_attention_dim"])
    pooled, x, t = torch.randn(2, cfg["pooled_projection_dim"]), torch.randn(2, 4, 8, 8), torch.tensor([100.0, 900.0])
    counts = torch.tensor([256.0, 7.0])
    with torch.no_grad():
        ref = [net(x[i:i + 1], encoder_hidden_states=torch.cat([clip[i:i + 1], torch.zeros(1, int(c), clip.shape[-1])], 1),
                   pooled_projections=pooled[i:i + 1], timestep=t[i:i + 1]).sample for i, c in enumerate(counts)]
        sd3_family.use_counted_zero_t5(net)
        ctx, bias = sd3_family.count_zero_tokens(clip, M.image_tokens(net), counts)
        out = net(x, encoder_hidden_states=ctx, pooled_projections=pooled, timestep=t,
                  joint_attention_kwargs={"attention_mask": bias}).sample
    # mathematically equal (c zero tokens = one zero token with log c added to its attention logit), other float
    # paths (batch 2 with a bias, batch 1 with c keys): the transformer's float32 round-off, tests/tolerances.py
    assert_close(out, torch.cat(ref), factor=network_factor(net) + 4)


def test_filler_augmentation_keeps_class_and_fits_context(tmp_path):
    from flashdmd.world.prompts import class_of_prompt, prompts_for
    labels = [i % 10 for i in range(400)]
    aug = pretrain_loop.augment_prompts(prompts_for(labels, seed=3), torch.Generator().manual_seed(0), p=1.0)
    assert [class_of_prompt(p) for p in aug] == labels
    assert not set(pretrain_loop.filler_words()) & {"shirt", "boot", "pants", "shoe", "bag", "coat"}
    tok = make_tokenizer(tmp_path)
    assert max(len(tok(p).input_ids) for p in aug) <= tok.model_max_length


def test_checkpoint_round_trip(tmp_path):
    model, ema = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    ck = pretrain_loop.Checkpoint(tmp_path, "stage")
    ck.save(7, 12.5, 0.25, model, ema, opt)
    model2, ema2 = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-3)
    assert ck.load(model2, ema2, opt2) == (7, 12.5, 0.25)
    assert torch.equal(model2.weight, model.weight)  # float32 saved and read back: bitwise
    assert torch.equal(ema2.bias, ema.bias)
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])


def test_quick_pretrain_writes_log_and_folders(quick_run):
    log = json.loads((quick_run / "pretrain_log.json").read_text())
    for stage in ("text", "vae", "sdxl", "sd3"):
        assert log[stage]["done"] and log[stage]["wall_s"] >= 0 and log[stage]["final_loss"] > 0
    assert not (quick_run / "_work").exists()  # checkpoints are removed once their stage completes
    sdxl_vae = json.loads((quick_run / "world-sdxl" / "vae" / "config.json").read_text())
    sd3_vae = json.loads((quick_run / "world-sd3" / "vae" / "config.json").read_text())
    assert sdxl_vae["scaling_factor"] == sd3_vae["scaling_factor"] == log["vae"]["scaling_factor"]
    assert sdxl_vae["shift_factor"] is None and sd3_vae["shift_factor"] == log["vae"]["shift_factor"]
    assert len(load_tokenizer(quick_run / "world-sdxl" / "tokenizer")) > 100


def test_quick_folders_run_in_diffusers_pipelines(quick_run):
    from diffusers import StableDiffusion3Pipeline, StableDiffusionXLPipeline
    sdxl = StableDiffusionXLPipeline.from_pretrained(quick_run / "world-sdxl")
    sd3 = StableDiffusion3Pipeline.from_pretrained(quick_run / "world-sd3", text_encoder_3=None, tokenizer_3=None)
    assert sdxl.unet.dtype == sd3.transformer.dtype == torch.float32  # stored fp16, loads as fp32
    for pipe in (sdxl, sd3):
        pipe.set_progress_bar_config(disable=True)
        img = pipe(prompt=["a photo of a bag", "a small sneaker"], num_inference_steps=2, guidance_scale=4.0,
                   height=32, width=32, generator=torch.Generator().manual_seed(0), output_type="np").images
        assert img.shape == (2, 32, 32, 3) and torch.isfinite(torch.as_tensor(img)).all()


def test_only_rejects_unknown_stage(tmp_path):
    with pytest.raises(FlashDMDError, match="unknown stage"):
        pretrain.run(_args(tmp_path, only="vae,unet"))


def test_teacher_stage_needs_earlier_stages(tmp_path):
    with pytest.raises(FlashDMDError, match="--only text,vae"):
        pretrain.run(_args(tmp_path, only="sdxl", quick=True, no_progress=True))


@pytest.mark.skipif(not (ASSETS / "world-sdxl" / "model_index.json").is_file(), reason="world teachers not shipped yet")
def test_shipped_world_folders_fit_budget():
    files = [p for d in ("world-sdxl", "world-sd3") for p in (ASSETS / d).rglob("*") if p.is_file()]
    assert all(p.suffix != ".bin" for p in files)
    assert sum(p.stat().st_size for p in files) <= 30 * 2 ** 20


@pytest.mark.parametrize("name", ["world-sdxl", "world-sd3"])
def test_shipped_world_folders_load_through_families(name):
    if not (ASSETS / name / "model_index.json").is_file():
        pytest.skip(f"{name} not shipped yet")
    families = pytest.importorskip("flashdmd.families")
    if not hasattr(families, "load_family"):
        pytest.skip("flashdmd.families.load_family not written yet")
    fam = families.load_family(name)
    assert fam.name == name.removeprefix("world-")
    cond = fam.encode_prompts(["a photo of a bag"])
    assert cond.prompt_embeds.shape[0] == 1


@pytest.mark.parametrize("family", ["sdxl", "sd3"])
def test_shipped_reward_models_fit_their_shipped_teachers(family):
    """`rl_reward_model: world` resolves to ASSETS/lrm-<family>: it must load on the shipped teacher (load refuses
    heads whose stored teacher fingerprint differs) and give one finite score per latent."""
    import torch
    from flashdmd.networks.reward import LatentRewardModel
    from flashdmd.training.stage2 import resolve_reward_model
    lrm = LatentRewardModel.load(resolve_reward_model("world", family))
    assert lrm.family.name == family
    cond = lrm.family.encode_prompts(["a photo of a bag", "a photo of a sneaker"])
    res = lrm.family.default_resolution
    x = torch.randn((2,) + tuple(lrm.family.latent_shape(res, res)), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        s = lrm.score(x, torch.full((2,), 500.0), cond)
    assert s.shape == (2,) and torch.isfinite(s).all() and s[0] != s[1]
