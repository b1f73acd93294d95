"""model_offload frozen / base on the CPU: every move of a diffusers ModuleGroup is made a real copy and every read of an
offloaded tensor recorded (tests/offload_sim.py) -- what a GPU would meet as a device mismatch. A run offloading its
frozen parts or streaming its base reads no offloaded tensor, onloads its parts in the phases that use them and leaves
none resident after, and trains to the bit what the same run without offloading trains; a module copy that misses its
hooks is caught reading offloaded weights (the check can fail)."""
import math
import sys
from pathlib import Path

import pytest
import torch
from torchao.quantization import Int8Tensor

sys.path.insert(0, str(Path(__file__).parent))
import tiny_models as tm  # noqa: E402
from offload_sim import simulated  # noqa: E402

from flashdmd import FlashDMDError  # noqa: E402
from flashdmd.families import load_family  # noqa: E402
from flashdmd.networks.offload import GROUP_HOOK  # noqa: E402
from flashdmd.networks.reward import LatentRewardModel  # noqa: E402
from flashdmd.training import residency  # noqa: E402
from flashdmd.training.distill import setup, train  # noqa: E402

CKPT = dict(model_lora_rank=2, model_gradient_checkpointing=True, run_max_steps=2)


@pytest.fixture(scope="module")
def folders(tiny_run_folders, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("offload")
    (tmp / "prompts.txt").write_text("a red square\na blue circle\na green triangle\n")
    lrm = tmp / "lrm-sd3"
    torch.manual_seed(0)
    LatentRewardModel(load_family(tiny_run_folders["sd3"]), proj_dim=8, hidden_dim=8).save(lrm)
    return {**tiny_run_folders, "prompts": tmp / "prompts.txt", "lrm": lrm}


def _trained(ctx) -> dict:
    return {f"{r}.{n}": p.detach().clone() for r in ("student", "fake_score", "disc") if getattr(ctx, r) is not None
            for n, p in getattr(ctx, r).named_parameters() if p.requires_grad}


def _run(folders, tmp_path, monkeypatch, family, method, mode, **kw):
    cfg = tm.run_config(folders, family, method, model_offload=mode, **{**CKPT, **kw})
    with simulated(monkeypatch) as res:
        ctx = setup(cfg)
        with res:
            result = train(cfg, tmp_path / mode, progress=False, ctx=ctx)
    return ctx, res, result


@pytest.mark.parametrize("family,method,mode", [("sd3", "flashdmd", "frozen"), ("sd3", "flashdmd", "base"),
                                                ("sd3", "dmd2", "base")])
def test_offloaded_run_reads_nothing_offloaded_and_trains_the_same_bits(folders, tmp_path, monkeypatch, family,
                                                                        method, mode):
    kw = dict(model_text_cache=False)
    ref, _, _ = _run(folders, tmp_path, monkeypatch, family, method, "none", **kw)
    ctx, res, _ = _run(folders, tmp_path, monkeypatch, family, method, mode, **kw)
    assert res.violations == []
    want, got = _trained(ref), _trained(ctx)
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    encoders = {type(e).__name__ for e in ctx.family.text_encoders if e is not None}
    # no text cache: the text encoders come for each iteration's encoding; nothing stays once its phase ended
    assert all(res.onloads.get(n, 0) >= 2 for n in encoders)
    assert res.onloads.get(type(ctx.family.vae).__name__, 0) >= 2   # a phase that decodes or encodes images
    assert not ctx.setup.offload.parts.resident
    if mode == "base":  # every block forward (and recomputation) onloads its block
        n_blocks = len(ctx.setup.offload.groups)
        streamed = sum(v for k, v in res.onloads.items() if k in ctx.family.offload_blocks)
        assert n_blocks > 0 and streamed > 0 and streamed % n_blocks == 0
    else:
        assert not ctx.setup.offload.groups
        assert not any(k in ctx.family.offload_blocks for k in res.onloads)


def test_flux_streams_both_block_kinds_reading_nothing_offloaded(folders, tmp_path, monkeypatch):
    ctx, res, _ = _run(folders, tmp_path, monkeypatch, "flux", "flashdmd", "base", model_text_cache=False,
                       run_max_steps=1)
    assert res.violations == []
    assert all(res.onloads.get(k, 0) > 0 for k in ctx.family.offload_blocks)


def test_the_check_sees_a_copy_that_misses_its_hooks(folders, tmp_path, monkeypatch):
    """The residency check can fail: a fake score whose blocks lost their hooks (what a plain deep copy of a hooked
    module gives: offload.deepcopy_hooked exists to prevent it) reads its blocks' weights offloaded."""
    with pytest.raises(FlashDMDError, match="model_gradient_checkpointing"):
        tm.run_config(folders, "sd3", "flashdmd", model_offload="base", model_lora_rank=2)
    cfg = tm.run_config(folders, "sd3", "flashdmd", model_offload="base", **{**CKPT, "run_max_steps": 1})
    with simulated(monkeypatch) as res:
        ctx = setup(cfg)
        for m in ctx.fake_score.modules():
            if getattr(m, "_diffusers_hook", None) is not None:
                m._diffusers_hook.remove_hook(GROUP_HOOK, recurse=False)
        with res:
            train(cfg, tmp_path / "run", progress=False, ctx=ctx)
    assert any("mm" in v for v in res.violations)


def test_stage2_evaluation_and_text_cache_with_a_streamed_base(folders, tmp_path, monkeypatch):
    order = []
    settle = residency.settle
    monkeypatch.setattr(residency, "settle", lambda off, fam: (order.append(fam.text_encoders_released),
                                                               settle(off, fam))[1])
    ctx, res, result = _run(
        folders, tmp_path, monkeypatch, "sd3", "flashdmd", "base", model_text_cache=True,
        data_prompts=str(folders["prompts"]), eval_prompts=str(folders["prompts"]), eval_every_steps=2,
        eval_num_images=2, run_sample_every_steps=2, rl_enabled=True, rl_reward_model=str(folders["lrm"]),
        rl_steps=2, rl_distill_ratio=1, rl_num_candidates=2, rl_step_indices=[0], run_max_steps=1)
    assert order == [True]   # the denoiser reached the device after the text encoders were released
    assert res.violations == []
    assert any("rl/loss" in h and math.isfinite(h["rl/loss"]) for h in result["history"])
    assert ctx.reward.backbone is ctx.teacher   # the LRM reads the streamed teacher itself
    assert not any(n.startswith("text_encoder") for n in ctx.setup.offload.parts.groups)   # gone with the cache


def test_int8_base_streams_and_its_int8_tensors_never_change(folders, tmp_path):
    cfg = tm.run_config(folders, "sd3", "flashdmd", model_offload="base", model_frozen_quant="int8", **CKPT)
    ctx = setup(cfg)
    q = {n: m.weight for n, m in ctx.teacher.named_modules() if isinstance(getattr(m, "weight", None), Int8Tensor)}
    in_groups = {id(t) for g in ctx.setup.offload.groups for t in g.parameters}
    assert q and any(id(w) in in_groups for w in q.values())
    before, q_before = _trained(ctx), {n: w.qdata.clone() for n, w in q.items()}
    train(cfg, tmp_path / "run", progress=False, ctx=ctx)
    after = _trained(ctx)
    assert any("lora_B" in k and not torch.equal(before[k], after[k]) for k in before)
    assert all(torch.equal(w.qdata, q_before[n]) for n, w in q.items())


def test_a_unet_base_cannot_be_streamed(folders):
    cfg = tm.run_config(folders, "sdxl", "flashdmd", model_offload="base", **CKPT)
    with pytest.raises(FlashDMDError, match="model_offload base: the sdxl denoiser"):
        setup(cfg)


def test_offload_is_one_process(folders):
    cfg = tm.run_config(folders, "sd3", "flashdmd", model_offload="frozen", **CKPT)
    for sharded, processes in ((True, 1), (False, 2)):
        with pytest.raises(FlashDMDError, match="model_offload frozen runs in one process"):
            residency.check(cfg, sharded, processes)
    residency.check(cfg, False, 1)
