"""Memory settings: frozen parts in a lower precision (model_frozen_dtype) while trainable weights and optimiser
states stay in model_dtype, cached prompt embeddings without resident text encoders (model_text_cache), and gradient
checkpointing through the VAE decoder and the Pixel-GAN backbone (model_gradient_checkpointing)."""
import gc
import math
import sys
import weakref
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import tiny_models as tm  # noqa: E402

from flashdmd import FlashDMDError  # noqa: E402
from flashdmd.families import load_family  # noqa: E402
from flashdmd.families.base import Family  # noqa: E402
from flashdmd.networks.reward import LatentRewardModel  # noqa: E402
from flashdmd.training import steps  # noqa: E402
from flashdmd.training.config import DistillConfig  # noqa: E402
from flashdmd.training.distill import setup, train  # noqa: E402
from flashdmd.training.roles import frozen_dtype  # noqa: E402

BF16, F32 = torch.bfloat16, torch.float32
PROMPTS = ["a photo of a cat", "the dog", "a drawing of the number seven", "three cats", "handwritten digit"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tiny")
    out = dict(tm.run_folders(tmp), prompts=tmp / "prompts.txt", lrm=tmp / "lrm-sdxl")
    out["prompts"].write_text("\n".join(PROMPTS) + "\n")
    torch.manual_seed(0)
    LatentRewardModel(load_family(out["sdxl"]), proj_dim=16, hidden_dim=16).save(out["lrm"])
    return out


def _cfg(folders, family, method, **kw):
    base = dict(run_max_steps=2, student_timesteps=[999, 499] if family == "sdxl" else None,
                **({"fake_score_ttur": 2} if method == "dmd2" else {}))
    return tm.run_config(folders, family, method, **{**base, **kw})


def _losses(result) -> list[dict]:
    return [{k: v for k, v in h.items() if not k.startswith("time/")} for h in result["history"]]


def _frozen_parts(ctx) -> dict:
    parts = {"teacher": ctx.teacher, "vae": ctx.family.vae}
    parts.update({f"text_encoder_{i}": e for i, e in enumerate(ctx.family.text_encoders) if e is not None})
    if ctx.cfg.disc_kind == "pixel":
        parts["disc_backbone"] = ctx.disc.backbone
    return parts


def test_config_and_resolution_of_the_frozen_dtype():
    with pytest.raises(FlashDMDError, match="model_frozen_dtype must be one of") as e:
        DistillConfig(model_frozen_dtype="half")
    assert "\n" not in str(e.value)
    cfg = DistillConfig()
    assert cfg.model_frozen_dtype == "auto" and cfg.model_text_cache is False
    assert frozen_dtype(cfg, "cpu") == F32 and frozen_dtype(cfg, "cuda") == BF16
    assert frozen_dtype(DistillConfig(model_dtype="float64"), "cuda") == torch.float64  # exact-check runs stay exact
    assert frozen_dtype(DistillConfig(model_frozen_dtype="float16"), "cpu") == torch.float16


@pytest.mark.parametrize("family,method", [("sdxl", "flashdmd"), ("sd3", "dmd2")])
def test_bf16_frozen_parts_around_fp32_lora_on_a_shared_base(folders, family, method, tmp_path):
    cfg = _cfg(folders, family, method, model_lora_rank=2, model_frozen_dtype="bfloat16")
    ctx = setup(cfg)
    frozen = _frozen_parts(ctx)
    for name, part in frozen.items():
        assert {p.dtype for p in part.parameters()} == {BF16}, name
    teacher = dict(ctx.teacher.named_parameters())
    trainable = {}
    for role in ("student", "fake_score", "disc"):
        for n, p in getattr(ctx, role).named_parameters():
            if p.requires_grad:
                assert p.dtype == F32, f"{role}.{n}"
                trainable[f"{role}.{n}"] = p
            elif role != "disc":  # the shared base: the teacher's own bf16 tensors
                assert p is teacher[n.replace(".base_layer", "")], n
    assert any("lora" in k for k in trainable) and any(k.startswith("disc.") for k in trainable)
    before_frozen = {f"{k}.{n}": p.detach().clone() for k, m in frozen.items() for n, p in m.named_parameters()}
    before_trained = {k: p.detach().clone() for k, p in trainable.items()}

    result = train(cfg, tmp_path / "run", progress=False, ctx=ctx)
    history = _losses(result)
    assert len(history) == 2
    assert all(math.isfinite(v) for h in history for k, v in h.items() if k.startswith(("loss/", "dm_loss", "gan_")))
    states = [t for opt in ctx.opt.values() for s in opt.state.values() for t in s.values() if torch.is_tensor(t)]
    assert states and {t.dtype for t in states} == {F32}
    unchanged = [k for k, p in trainable.items() if torch.equal(p, before_trained[k])]
    assert not unchanged, unchanged[:3]
    after_frozen = {f"{k}.{n}": p for k, m in frozen.items() for n, p in m.named_parameters()}
    assert all(torch.equal(after_frozen[k], v) for k, v in before_frozen.items())


def test_full_finetune_starts_from_the_folders_weights_in_fp32_next_to_a_bf16_teacher(folders, tmp_path):
    cfg = _cfg(folders, "sdxl", "flashdmd", model_frozen_dtype="bfloat16", run_max_steps=1)
    ctx = setup(cfg)
    reference = load_family(folders["sdxl"]).denoiser.state_dict()  # the folder's weights at float32
    teacher_ptrs = {p.data_ptr() for p in ctx.teacher.parameters()}
    for role in ("student", "fake_score"):
        net = getattr(ctx, role)
        state = net.state_dict()
        assert state.keys() == reference.keys()
        assert all(torch.equal(state[k], reference[k]) and state[k].dtype == reference[k].dtype
                   for k in reference), role
        assert all(p.requires_grad and p.dtype == F32 and p.data_ptr() not in teacher_ptrs for p in net.parameters())
    assert {p.dtype for p in ctx.teacher.parameters()} == {BF16}
    assert all(torch.equal(p.float(), reference[n].to(BF16).float()) for n, p in ctx.teacher.named_parameters())
    train(cfg, tmp_path / "run", progress=False, ctx=ctx)
    assert {t.dtype for o in ctx.opt.values() for s in o.state.values() for t in s.values()} == {F32}


def test_stage2_with_bf16_frozen_parts_shares_the_base_with_reference_and_reward_model(folders, tmp_path):
    cfg = _cfg(folders, "sdxl", "flashdmd", model_lora_rank=2, model_frozen_dtype="bfloat16", disc_kind="none",
               run_max_steps=1, rl_enabled=True, rl_reward_model=str(folders["lrm"]), rl_steps=2, rl_distill_ratio=1,
               rl_num_candidates=2, rl_step_indices=[0])
    ctx = setup(cfg)
    result = train(cfg, tmp_path / "run", progress=False, ctx=ctx)
    assert any("rl/loss" in h and math.isfinite(h["rl/loss"]) for h in result["history"])
    teacher = dict(ctx.teacher.named_parameters())
    assert ctx.reward.backbone is ctx.teacher
    for n, p in ctx.reference.named_parameters():
        if "lora_" in n:
            assert p.dtype == F32, n
        else:
            assert p is teacher[n.replace(".base_layer", "")] and p.dtype == BF16, n
    assert {t.dtype for s in ctx.opt["rl"].state.values() for t in s.values()} == {F32}


def test_text_cache_trains_without_text_encoders_and_gives_the_same_losses(folders, tmp_path, monkeypatch):
    kw = dict(data_prompts=str(folders["prompts"]), disc_backbone="world", disc_backbone_path=None, run_max_steps=2,
              eval_prompts=str(folders["prompts"]), eval_every_steps=2, eval_num_images=4, run_sample_every_steps=2)
    encoders = []
    release = Family.release_text_encoders

    def recording_release(self):
        encoders.extend(weakref.ref(e) for e in self.text_encoders if e is not None)
        release(self)
    monkeypatch.setattr(Family, "release_text_encoders", recording_release)
    runs = {}
    for cached in (False, True):
        cfg = _cfg(folders, "sdxl", "flashdmd", model_text_cache=cached, **kw)
        ctx = setup(cfg)
        if cached:
            gc.collect()
            assert ctx.family.text_encoders == [] and ctx.family.tokenizers == [] and len(encoders) == 2
            assert all(ref() is None for ref in encoders), "a text encoder is still reachable"
            assert ctx.family.cached_prompts == len(PROMPTS) + 1  # the prompts and ""
        runs[cached] = (train(cfg, tmp_path / f"run_{cached}", progress=False, ctx=ctx), ctx)
    (cached_run, ctx), (plain_run, _) = runs[True], runs[False]
    assert len(cached_run["history"]) == 2
    assert _losses(cached_run) == _losses(plain_run)  # the same embeddings: every loss and gradient norm, exactly
    assert [e["step"] for e in cached_run["evals"]] == [0, 2]  # evaluations (eval_prompts) and grids still encode
    assert (tmp_path / "run_True" / "samples" / "step_000002.png").is_file()
    with pytest.raises(FlashDMDError, match="'a prompt never seen' is not in the text cache") as e:
        ctx.family.encode_prompts(["the dog", "a prompt never seen"])
    assert "\n" not in str(e.value)


def test_text_cache_needs_a_prompt_source_that_lists_its_prompts(folders):
    cfg = _cfg(folders, "sdxl", "flashdmd", model_text_cache=True, data_prompts="world", disc_backbone="world",
               disc_backbone_path=None)
    with pytest.raises(FlashDMDError, match="model_text_cache: the training prompts .* cannot be listed") as e:
        setup(cfg)
    assert "\n" not in str(e.value)


def test_family_text_cache_equals_encoding_and_frees_the_encoders(folders):
    fam = load_family(folders["sd3"])
    direct = fam.encode_prompts(PROMPTS[:2], 32, 32)
    null = fam.null_conditioning(2)
    fam.cache_prompts(PROMPTS + PROMPTS[:2], batch=2)
    refs = [weakref.ref(e) for e in fam.text_encoders if e is not None]
    fam.release_text_encoders()
    gc.collect()
    assert refs and all(r() is None for r in refs)
    cached = fam.encode_prompts(PROMPTS[:2], 32, 32)
    assert torch.equal(cached.prompt_embeds, direct.prompt_embeds) and torch.equal(cached.pooled_embeds,
                                                                                   direct.pooled_embeds)
    assert torch.equal(fam.null_conditioning(2).prompt_embeds, null.prompt_embeds)
    with pytest.raises(FlashDMDError, match="not in the text cache"):
        fam.encode_prompts("unknown")


class _SavedBytes:
    """Bytes autograd keeps for backward: tensors saved by the graph (saved_tensors_hooks) plus the inputs a
    non-reentrant checkpoint holds to recompute its block (it saves nothing else); distinct storages counted once."""

    def __init__(self, monkeypatch):
        self.storages = {}
        original = torch.utils.checkpoint.checkpoint

        def counting(fn, *args, **kwargs):
            for a in args:
                if torch.is_tensor(a):
                    self._add(a)
            return original(fn, *args, **kwargs)
        monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counting)

    def _add(self, t):
        self.storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()

    def pack(self, t):
        self._add(t)
        return t

    @property
    def total(self) -> int:
        return sum(self.storages.values())


@pytest.mark.parametrize("backbone", ["sam", "world"])
def test_checkpointing_the_vae_decoder_and_pixel_backbone_keeps_gradients_and_saves_memory(folders, backbone,
                                                                                           monkeypatch):
    """The generator's low-noise branch (decode x0 with the VAE, run the Pixel-GAN, generator GAN loss) with and
    without model_gradient_checkpointing: equal gradients for x0 and the heads, fewer bytes held for backward."""
    out = {}
    for gc_on in (False, True):
        kw = dict(disc_backbone=backbone, disc_backbone_path=str(folders["sam"]) if backbone == "sam" else None)
        ctx = setup(_cfg(folders, "sdxl", "flashdmd", model_gradient_checkpointing=gc_on, **kw))
        assert ctx.family.vae.decoder.gradient_checkpointing is gc_on
        x0 = torch.randn((2,) + tuple(ctx.family.latent_shape(32, 32)), generator=torch.Generator().manual_seed(0))
        x0.requires_grad_(True)
        cond = ctx.family.encode_prompts(["a cat", "a dog"], 32, 32)
        saved = _SavedBytes(monkeypatch)
        with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
            loss = steps.gan_generator_loss(ctx, x0, cond).mean()
        loss.backward()
        monkeypatch.undo()
        heads = {n: p.grad.clone() for n, p in ctx.disc.named_parameters() if p.requires_grad}
        out[gc_on] = (loss.detach(), x0.grad.clone(), heads, saved.total)
    (l0, g0, h0, b0), (l1, g1, h1, b1) = out[False], out[True]
    assert torch.equal(l0, l1)
    assert torch.equal(g0, g1)  # CPU recomputation is bit-exact
    assert h0.keys() == h1.keys() and all(torch.equal(h0[k], h1[k]) for k in h0)
    assert b1 < 0.7 * b0, (b0, b1)
