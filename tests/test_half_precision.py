"""Half precision everywhere a GPU goes, exercised on CPU (issue 28, item 1).

A GPU run holds its frozen parts in bfloat16 (``model_frozen_dtype: auto``) or float16 and autocasts to bfloat16
(``model_mixed_precision: bf16``); torch runs all of that on CPU too. The matrix below runs the tiny SDXL, SD3 and
FLUX (and FLUX.2-klein) folders through Stage 1 (Flash-DMD and DMD2, LoRA and full fine-tune), Stage 2 (flashdmd's LRM made by
`flashdmd reward train`, LPO's LRM layout, an image judge), the evaluation backends (CLIP score, FID),
`flashdmd sample` and `flashdmd export`. Six runs, one per (family, setting), cover every pair of factors (three more
put FLUX.2-klein, Z-Image and Qwen-Image through the common GPU setting):

    family  method    weights  precision                   Stage-2 reward; evaluation
    sdxl    flashdmd  LoRA     bf16 frozen + bf16 autocast  LPO's layout; CLIP evaluation, grids; CLIP + FID eval
    sdxl    dmd2      full     fp16 frozen                  LRM trained (reward train) with a float32 teacher
    sd3     dmd2      LoRA     fp16 frozen                  CLIP judge
    sd3     flashdmd  full     bf16 frozen + bf16 autocast  LRM trained (reward train) with a float16 teacher
    flux    flashdmd  full     fp16 frozen                  CLIP judge; CLIP evaluation, grids; CLIP eval
    flux    dmd2      LoRA     bf16 frozen + bf16 autocast  CLIP judge
    flux2-klein flashdmd LoRA  bf16 frozen + bf16 autocast  CLIP judge
    zimage  flashdmd  LoRA     bf16 frozen + bf16 autocast  CLIP judge
    qwenimage flashdmd LoRA   bf16 frozen + bf16 autocast  CLIP judge

Each asserts: the run finishes with finite losses; trained weights and every optimiser state in float32, frozen parts
in the frozen dtype (the VAE in float32 under float16: force_upcast); every trainable tensor moved and no frozen one;
`flashdmd sample` in the frozen dtype writes its PNGs; `flashdmd export --dtype` loads in plain diffusers in that
dtype and reproduces flashdmd's own sampler in the same dtype within a bound derived from the dtype's round-off.
Besides: LPO's half-precision scores against its float32 ones (a bound from the unit round-off), the teacher
fingerprint of fp32 / fp16 / bf16 loads, the VAE's force_upcast rule, the refused fp16 + bf16-autocast combination,
and a dtype mismatch inside a network as a one-line CLI error.
"""
import json
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import tiny_models as tm  # noqa: E402
import tiny_zimage as tz  # noqa: E402
import tiny_qwenimage as tq  # noqa: E402
from test_lpo_lrm import write_lpo  # noqa: E402

from flashdmd import FlashDMDError  # noqa: E402
from flashdmd.cli import main  # noqa: E402
from flashdmd.families import load_family  # noqa: E402
from flashdmd.inference import load_model  # noqa: E402
from flashdmd.networks.lpo_reward import LPORewardModel  # noqa: E402
from flashdmd.networks.reward import LatentRewardModel, weights_fingerprint  # noqa: E402
from flashdmd.sample import sample_latents  # noqa: E402
from flashdmd.training.config import DistillConfig  # noqa: E402
from flashdmd.training.distill import setup, train  # noqa: E402

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
U = {BF16: 2.0 ** -8, F16: 2.0 ** -11, F32: 2.0 ** -24}  # unit round-off
PROMPTS = ["a red shoe", "a small bag", "a striped shirt", "a boot"]
SETTINGS = {"bf16": dict(model_frozen_dtype="bfloat16", model_mixed_precision="bf16"),
            "fp16": dict(model_frozen_dtype="float16", model_mixed_precision="no")}
CELLS = [  # (family, method, LoRA rank, setting, Stage-2 reward, evaluation backends)
    ("sdxl", "flashdmd", 2, "bf16", "lpo", ("clip", "fid")),
    ("sdxl", "dmd2", 0, "fp16", "lrm", ()),
    ("sd3", "dmd2", 2, "fp16", "judge", ()),
    ("sd3", "flashdmd", 0, "bf16", "lrm", ()),
    ("flux", "flashdmd", 0, "fp16", "judge", ("clip",)),
    ("flux", "dmd2", 2, "bf16", "judge", ()),
    ("flux2-klein", "flashdmd", 2, "bf16", "judge", ()),
    ("zimage", "flashdmd", 2, "bf16", "judge", ()),
    ("qwenimage", "flashdmd", 2, "bf16", "judge", ()),
]
RES = 32  # every family at 32 px (FLUX's default would be 256 px: 4096 tokens)


def _pairs(family, out: Path) -> Path:
    from flashdmd.rewards.pairs import write_pairs
    shape = family.latent_shape(family.default_resolution, family.default_resolution)
    records = [{"prompt": p, "a": 2 * i, "b": 2 * i + 1, "preferred": "a"} for i, p in enumerate(PROMPTS)]
    return write_pairs(out, records, torch.randn(2 * len(PROMPTS), *shape, generator=torch.Generator().manual_seed(0)))


@pytest.fixture(scope="module")
def world(tiny_run_folders, tmp_path_factory, clip_dir, inception_file):
    """The tiny teachers and SAM (session), a CLIP folder, FID weights and reference statistics, a prompt file,
    LPO's layout for SDXL, and an LRM per SDXL / SD3 made by `flashdmd reward train` -- the SDXL one with a float32
    teacher (used by a float16 run: what issue 28 found refused), the SD3 one with a float16 teacher (used by a
    bfloat16 run)."""
    from flashdmd.evaluation.backends.fid import save_stats
    tmp = tmp_path_factory.mktemp("half")
    out = dict(tiny_run_folders, clip=clip_dir, inception=inception_file, prompts=tmp / "prompts.txt",
               fid_ref=tmp / "ref.safetensors", lpo=write_lpo(tmp / "lpo"),
               zimage=tz.session_folders(tmp_path_factory)["zimage"])
    out["qwenimage"] = tq.qwenimage_folders(tmp_path_factory)["qwenimage"]
    out["prompts"].write_text("\n".join(PROMPTS) + "\n")
    save_stats(out["fid_ref"], torch.zeros(2048, dtype=torch.float64), torch.eye(2048, dtype=torch.float64), 10)
    for name, frozen in (("sdxl", "float32"), ("sd3", "float16")):
        pairs = _pairs(load_family(out[name]), tmp / f"pairs_{name}.jsonl")
        assert main(["reward", "train", "--pairs", str(pairs), "--family-model", str(out[name]), "--out",
                     str(tmp / f"lrm_{name}"), "--steps", "1", "--batch", "2", "--eval-draws", "1", "--proj-dim", "8",
                     "--hidden-dim", "8", "--frozen-dtype", frozen]) == 0
        out[f"lrm_{name}"] = tmp / f"lrm_{name}"
    return out


def _config(world, family, method, lora, setting, reward, evals) -> DistillConfig:
    kw = dict(SETTINGS[setting], data_resolution=RES, run_max_steps=1, run_batch_size=2, rl_enabled=True, rl_steps=1,
              rl_distill_ratio=0, rl_num_candidates=2, rl_step_indices=[0], student_lr=1e-3)
    if lora:
        kw.update(model_lora_rank=lora, model_lora_alpha=4.0)
    if reward == "lrm":
        kw.update(rl_reward_model=str(world[f"lrm_{family}"]))
    elif reward == "lpo":
        kw.update(rl_reward_model=str(world["lpo"]))
    else:
        kw.update(rl_judge="clip", rl_judge_model=str(world["clip"]))
    if evals:
        kw.update(eval_prompts=str(world["prompts"]), eval_every_steps=1, eval_num_images=2, eval_batch_size=2,
                  eval_clip_model=str(world["clip"]), run_sample_every_steps=1)
    return tm.run_config(world, family, method, **kw)


def _constant_head(ctx) -> tuple[str, ...]:
    """DMD2's latent head on the tiny SD3's 32-channel bottleneck: its last block normalises a 1x1 map with
    GroupNorm(32 groups, 32 channels), one value per group, which is 0 whatever came before -- so the GroupNorm shifts
    before it get exactly zero gradient (AdamW's decay moves the other tensors there; a zero bias stays zero). A real
    SD3's 1536 channels make 48 values per group. Those two biases are excused."""
    head = ctx.disc
    if ctx.cfg.disc_kind != "latent" or head.last[1].num_groups != head.last[1].num_channels:
        return ()
    return tuple(f"disc.down.{i}.1.bias" for i in range(len(head.down)))


def _frozen_parts(ctx) -> dict:
    parts = {"teacher": ctx.teacher}
    parts.update({f"text_encoder_{i}": e for i, e in enumerate(ctx.family.text_encoders) if e is not None})
    if ctx.cfg.disc_kind == "pixel":
        parts["Pixel-GAN backbone"] = ctx.disc.backbone
    return parts


def _dtypes(module) -> set:
    return {p.dtype for p in module.parameters()}


@pytest.mark.parametrize("family,method,lora,setting,reward,evals", CELLS,
                         ids=[f"{c[0]}-{c[1]}-{'lora' if c[2] else 'full'}-{c[3]}-{c[4]}" for c in CELLS])
def test_half_precision_run_samples_and_exports(world, family, method, lora, setting, reward, evals, tmp_path,
                                                small_fid_input):
    cfg = _config(world, family, method, lora, setting, reward, evals)
    frozen = getattr(torch, cfg.model_frozen_dtype)
    ctx = setup(cfg)
    assert ctx.accelerator.mixed_precision == cfg.model_mixed_precision
    for name, part in _frozen_parts(ctx).items():
        # T5 keeps its feed-forward output projections in float32 under float16 (transformers'
        # _keep_in_fp32_modules, as in any diffusers pipeline loaded in float16)
        kept = {F32} if "T5" in type(part).__name__ and frozen == F16 else set()
        assert _dtypes(part) - kept == {frozen}, name
    # SDXL's (and these tiny) VAEs set force_upcast: in float16 the VAE is held in float32, as diffusers decodes it
    assert _dtypes(ctx.family.vae) == {F32 if frozen == F16 else frozen}
    before = tm.snapshot_roles(ctx)
    # whether the student's layers ran under bf16 autocast: inside the training steps' autocast and, through the
    # forward accelerate wraps, in evaluations and sample grids too -- as on a GPU
    autocast = []
    first_layer = next(m for m in ctx.accelerator.unwrap_model(ctx.student).modules()
                       if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)))
    hook = first_layer.register_forward_pre_hook(
        lambda *_: autocast.append(torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == BF16))

    result = train(cfg, tmp_path / "run", progress=False, ctx=ctx)
    hook.remove()

    history = result["history"]
    assert result["rl_steps"] == 1 and any("rl/loss" in h for h in history)
    losses = {k: v for h in history for k, v in h.items() if k.startswith(("loss/", "dm_loss", "gan_", "rl/"))}
    assert losses and all(math.isfinite(v) for v in losses.values()), losses
    tm.assert_roles_trained(ctx, before, lora=bool(lora), exempt=_constant_head(ctx))
    assert autocast and all(autocast) if cfg.model_mixed_precision == "bf16" else not any(autocast)
    for role in ("student", "fake_score", "disc"):
        assert {p.dtype for p in getattr(ctx, role).parameters() if p.requires_grad} == {F32}, role
    states = [t for o in ctx.opt.values() for s in o.state.values() for t in s.values() if t.is_floating_point()]
    assert {t.dtype for t in states} == {F32} and "rl" in ctx.opt and ctx.opt["rl"].state
    if reward == "lrm":
        assert isinstance(ctx.reward, LatentRewardModel) and ctx.reward.backbone is ctx.teacher
    elif reward == "lpo":
        assert isinstance(ctx.reward, LPORewardModel) and _dtypes(ctx.reward) == {frozen}
    if evals:  # evaluations and sample grids during the run (its student in the run's dtypes), `flashdmd eval --dtype`
        assert [e["step"] for e in result["evals"]][:2] == [0, 1]
        assert (tmp_path / "run" / "samples" / "step_000001.png").is_file()
        assert all(math.isfinite(e["clip_score"]) for e in result["evals"])
        fid = ["--fid-inception", str(world["inception"]), "--fid-ref", str(world["fid_ref"])] if "fid" in evals else []
        assert main(["eval", "--model", str(tmp_path / "run"), "--prompts", str(world["prompts"]), "--clip",
                     str(world["clip"]), "--num-images", "2", "--dtype", setting, "--json",
                     str(tmp_path / "eval.json")] + fid) == 0
        metrics = json.loads((tmp_path / "eval.json").read_text())
        assert all(math.isfinite(metrics[k]) for k in ("clip_score", *(["fid"] if fid else [])))

    # `flashdmd sample` with the networks in the run's frozen dtype
    assert main(["sample", "--model", str(tmp_path / "run"), "--prompt", PROMPTS[0], "--out", str(tmp_path / "png"),
                 "--dtype", setting]) == 0
    assert (tmp_path / "png" / "0000_seed0.png").is_file()

    # `flashdmd export --dtype`: plain diffusers in that dtype reproduces flashdmd's sampler in that dtype
    out = tmp_path / "exported"
    assert main(["export", "--run", str(tmp_path / "run"), "--out", str(out), "--dtype", setting]
                + (["--lora"] if lora and family == "sd3" else [])) == 0
    got, record = _pipeline_latents(out, PROMPTS[:2], seed=3)
    model = load_model(str(tmp_path / "run"), dtype=frozen)
    assert {p.dtype for p in model.net.parameters()} == {frozen}
    want = sample_latents(model, PROMPTS[:2], torch.Generator().manual_seed(3))
    # ZImagePipeline keeps its latents in float32 whatever the transformer's dtype (its prepare_latents and scheduler
    # step): fewer roundings on its side than the bound below counts
    assert want.dtype == frozen and got.dtype == (F32 if family == "zimage" else frozen) and torch.isfinite(want).all()
    err = (got.float() - want.float()).abs().max().item()
    scale = want.float().abs().max().item()
    print(f"{family} {setting}: export max |diff| {err:.3g} = {err / (U[frozen] * scale):.2f} u * max|x|")
    assert err <= EXPORT_FACTOR * U[frozen] * scale, (err, scale)


# The exported pipeline and flashdmd's sampler run the same network weights on the same noise in the same dtype; they
# differ only in where the arithmetic between two network calls rounds to the half dtype (diffusers' scheduler step
# keeps the latents in the half dtype, flashdmd's x0 / renoise mixes them with float32 schedule tensors). Per step
# that is at most 4 roundings on each side (the network output's cast, the x0 conversion, the re-noised sum, the
# latent's cast): the two latents differ by <= 8 u |x| after a step, and over K = 4 steps these add up to 8 K = 32
# u max|x| as long as a network call does not amplify a relative difference of its input (normalised blocks, and the
# step x' = alpha x0 + sigma eps that keeps |x| at the noise's scale). Measured: <= 4.6 u max|x| over the six cells.
EXPORT_FACTOR = 32


def _pipeline_latents(folder: Path, prompts, seed: int):
    """Plain diffusers: the exported folder loaded with its recorded kwargs (its dtype), called as its README says."""
    from diffusers import DiffusionPipeline

    from flashdmd.export import load_kwargs
    record = json.loads((folder / "flashdmd_export.json").read_text())
    pipe = DiffusionPipeline.from_pretrained(folder, **load_kwargs(record))
    pipe.set_progress_bar_config(disable=True)
    if (folder / "pytorch_lora_weights.safetensors").is_file():
        pipe.load_lora_weights(folder)
    name = type(pipe).__name__
    kwargs = dict(record["pipeline_kwargs"], output_type="latent", guidance_scale=record["guidance_scale"],
                  height=RES, width=RES)
    if name == "FluxPipeline":
        kwargs["max_sequence_length"] = 512
    # SD3's and FLUX's pipelines do not hand their generator to scheduler.step: the global generator is the stream
    gen = torch.Generator().manual_seed(seed) if name == "StableDiffusionXLPipeline" else torch.manual_seed(seed)
    lat = pipe(prompt=prompts, generator=gen, **kwargs).images
    if name in ("FluxPipeline", "QwenImagePipeline"):  # packed latents
        from flashdmd.families.flux import unpack
        lat = unpack(lat, RES // 2, RES // 2)
    if name == "Flux2KleinPipeline":  # its latent output is the VAE's z: back to flashdmd's normalised patches
        from flashdmd.families.flux2 import patchify
        bn, eps = pipe.vae.bn, pipe.vae.config.batch_norm_eps
        lat = ((patchify(lat.float()) - bn.running_mean.float().view(1, -1, 1, 1))
               / torch.sqrt(bn.running_var.float().view(1, -1, 1, 1) + eps)).to(lat.dtype)
    return lat, record


# ---------------------------------------------------------------------------------------------------
# LPO's layout in half precision


def _lpo_parts(model, x, t, prompts):
    """(score, V = the projected visual features, T = the pooled text embedding), all float32, of one score call."""
    seen = {}
    hook = model.visual_projection.register_forward_hook(lambda _m, _a, out: seen.__setitem__("V", out.float()))
    try:
        s = model.score(x, t, prompts=prompts)
    finally:
        hook.remove()
    return s, seen["V"], model.encode_text(list(prompts))[1].float()


def _rel(a, b) -> float:
    """max over rows of |a - b| / |b| (float64)."""
    a, b = a.double(), b.double()
    return ((a - b).norm(dim=-1) / b.norm(dim=-1)).max().item()


# Round-off budget of LPO's two networks in half precision, in units of the dtype's u (the relative error of one
# rounding). n independent, unbiased roundings on a path leave a relative error of about sqrt(n) u (Higham's
# statistical estimate; the worst case n u is never approached by round-off). The 5-layer CLIP text encoder's path
# to its projected pooled output has n ~ 58 roundings (about 11 per layer: norm, attention scores, softmax, mixing,
# out-projection, residual, norm, fc1, gelu, fc2, residual; plus the final norm and the projection): 7.6 u -> K_T = 8.
# The UNet's path from the latent to the mid block (conv_in, 3 down blocks of 2 resnets of ~8 roundings, 4 cross-
# attention transformers of ~22, 2 downsamplers, the mid block's 2 resnets and transformer) has n ~ 180: 13.4 u ->
# K_V = 16; LPO's feature CFG f_u + w (f_c - f_u) weighs two branches whose errors are mostly common (the same
# latent through the same layers), which leaves that scale. Measured here: eps_T <= 4.1 u, eps_V <= 7.2 u (2.2 u
# without the CFG), bf16 and fp16 alike.
K_T, K_V = 8, 16


@pytest.mark.parametrize("dtype", [BF16, F16], ids=["bf16", "fp16"])
def test_lpo_half_precision_scores_agree_with_float32_within_the_round_off_bound(world, dtype):
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(4, 4, 16, 16, generator=g), torch.tensor([999.0, 749.0, 500.0, 100.0])
    prompts = ["a red shoe", "a bag on a table", "", "the cat"]
    ref = LPORewardModel.load(world["lpo"], load_family(world["sdxl"]))
    half = LPORewardModel.load(world["lpo"], load_family(world["sdxl"], frozen_dtype=dtype))
    assert _dtypes(half) == {dtype} and half.visual_projection.weight.dtype == dtype  # the fix: not a float32 Linear
    (s32, v32, t32), (s, v, txt) = _lpo_parts(ref, x, t, prompts), _lpo_parts(half, x, t, prompts)
    u, scale = U[dtype], ref.logit_scale.exp().item()
    eps_v, eps_t = _rel(v, v32), _rel(txt, t32)
    assert eps_t <= K_T * u and eps_v <= K_V * u, (eps_t / u, eps_v / u)
    # s = exp(ls) cos(V, T); normalising a vector with relative error eps moves it by at most 2 eps, so the cosine
    # moves by at most 2 (eps_V + eps_T): exact for the measured errors, plus float32's rounding of the two cosines
    # (normalisations and a length-P dot product each, P = 32: <= 4 P u_32 in all) ...
    err = (s.double() - s32.double()).abs().max().item()
    assert err <= scale * (2 * (eps_v + eps_t) + 4 * v.shape[-1] * U[F32])
    # ... and with the budgets: |s_half - s_32| <= 2 (K_V + K_T) u exp(ls) = 48 u exp(ls)
    assert err <= 2 * (K_V + K_T) * u * scale, err / (u * scale)


# ---------------------------------------------------------------------------------------------------
# the teacher fingerprint, the VAE's force_upcast, refused settings


def test_an_lrm_loads_under_every_frozen_dtype_and_refuses_other_teacher_files(world, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file
    teacher = world["sdxl"]
    torch.manual_seed(0)
    LatentRewardModel(load_family(teacher), proj_dim=8, hidden_dim=8).save(tmp_path / "lrm")
    stored = json.loads((tmp_path / "lrm" / "lrm.json").read_text())["teacher_fingerprint"]
    for dtype in (F32, BF16, F16):
        fam = load_family(teacher, frozen_dtype=dtype)
        assert LatentRewardModel.load(tmp_path / "lrm", fam).teacher_fingerprint() == stored
    assert weights_fingerprint(teacher / "unet") == stored
    # the same weights stored in another file layout (one value changed by one float32 ulp): refused
    other = tmp_path / "other"
    shutil.copytree(teacher, other)
    f = other / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(f))
    key = sorted(state)[0]
    state[key] = state[key].clone()
    state[key].view(-1)[0] = torch.nextafter(state[key].view(-1)[0], torch.tensor(float("inf")))
    save_file(state, str(f), metadata={"format": "pt"})
    with pytest.raises(FlashDMDError, match="was trained on other .* weights .* retrain it") as e:
        LatentRewardModel.load(tmp_path / "lrm", load_family(other, frozen_dtype=F16))
    assert "\n" not in str(e.value)


def test_the_vae_follows_force_upcast_under_float16(world, tmp_path):
    import shutil
    teacher = world["sdxl"]
    assert json.loads((teacher / "vae" / "config.json").read_text())["force_upcast"] is True
    assert load_family(teacher, frozen_dtype=F16).vae.dtype == F32  # diffusers decodes such a VAE in float32
    assert load_family(teacher, frozen_dtype=BF16).vae.dtype == BF16  # bfloat16 has float32's range
    plain = tmp_path / "plain"
    shutil.copytree(teacher, plain)
    cfg = json.loads((plain / "vae" / "config.json").read_text())
    (plain / "vae" / "config.json").write_text(json.dumps({**cfg, "force_upcast": False}))
    fam = load_family(plain, frozen_dtype=F16)
    assert fam.vae.dtype == F16 and fam.denoiser.dtype == F16
    px = fam.decode_latents(torch.zeros(1, 4, 16, 16))
    assert px.dtype == F32 and torch.isfinite(px).all()  # the caller's dtype back


def test_bf16_autocast_with_float16_frozen_weights_is_refused():
    with pytest.raises(FlashDMDError, match="model_mixed_precision bf16 .* float16") as e:
        DistillConfig(model_mixed_precision="bf16", model_frozen_dtype="float16")
    assert "\n" not in str(e.value)
    DistillConfig(model_mixed_precision="bf16", model_frozen_dtype="bfloat16")  # what auto gives on a GPU


# ---------------------------------------------------------------------------------------------------
# a dtype mismatch inside a network: one line that names the part


def test_a_dtype_mismatch_inside_a_role_names_the_role(world):
    from flashdmd.training import steps
    ctx = setup(tm.run_config(world, "sdxl", "flashdmd", disc_kind="none", run_max_steps=1))
    ctx.fake_score.conv_in.to(BF16)  # a part left in another dtype
    x0 = torch.randn(2, 4, 16, 16)
    with pytest.raises(FlashDMDError) as e:
        steps.fake_score_loss(ctx, x0, ctx.family.encode_prompts(PROMPTS[:2]))
    msg = str(e.value)
    assert msg.startswith("fake score: dtype mismatch inside the network (input float32, weights ") and "\n" not in msg
    assert "weights bfloat16 + float32)" in msg and "same dtype" in msg  # torch's own words follow


def test_a_dtype_mismatch_is_a_one_line_cli_error(world, tmp_path, capsys, monkeypatch):
    """`flashdmd sample` of a teacher whose VAE decoder has one layer in bfloat16: exit 2, one line naming the part."""
    from flashdmd.families import base
    real_load = base.load_component

    def half_wrong(path, index, name, dtype, required=True):
        part = real_load(path, index, name, dtype, required)
        if name == "vae":
            part.decoder.conv_out.to(BF16)
        return part
    monkeypatch.setattr(base, "load_component", half_wrong)
    capsys.readouterr()
    rc = main(["sample", "--model", str(world["sdxl"]), "--prompt", "a red shoe", "--steps", "1", "--out",
               str(tmp_path / "png")])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: VAE decoder: dtype mismatch inside the network (input float32, weights "
                               "float32 + bfloat16): "), lines[0]
