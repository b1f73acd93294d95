"""Conformance tests: each adapter speaks its family exactly as the real diffusers pipeline does.

Tiny random models of the real architectures (tests/tiny_models.py) are assembled into the real
StableDiffusionXLPipeline / StableDiffusion3Pipeline, saved once per module and loaded back through
``load_family``. The adapter's own deterministic sampler on the pipeline's timesteps must reproduce the
pipeline's output latents for the same seed and guidance scale.
"""
from __future__ import annotations

import copy
import shutil
from pathlib import Path

import pytest
import torch

import tiny_models as tm
from flashdmd import FlashDMDError
from flashdmd.diffusion import samplers, to_x0_eps, bcast
from flashdmd.families import Conditioning, load_family, resolve_path
from tolerances import U32, assert_close, assert_within_contract, contract_bound, magnitude, network_factor

PROMPTS = ["a photo of the cat", "in the digit seven"]
SIZE = 32  # pixels; latents are 16x16


# ----------------------------------------------------------------------------------------------------
# fixtures: build + save each tiny pipeline once


def _built(tmp_path_factory, name: str, build):
    tmp = tmp_path_factory.mktemp(name)
    pipe = build(tmp)
    pipe.set_progress_bar_config(disable=True)
    path = tm.save_pipeline(pipe, tmp / "pipe")
    return pipe, path, load_family(path)


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    return _built(tmp_path_factory, "sdxl", tm.sdxl_pipeline)


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    return _built(tmp_path_factory, "sd3", tm.sd3_pipeline)


@pytest.fixture(scope="module")
def sd3_t5(tmp_path_factory):
    return _built(tmp_path_factory, "sd3_t5", lambda tmp: tm.sd3_pipeline(tmp, with_t5=True))


@pytest.fixture(scope="module")
def sd35(tmp_path_factory):
    """SD3.5-style: RMS qk-norm and a dual-attention first block (issue 18, item 5), with T5."""
    return _built(tmp_path_factory, "sd35", lambda tmp: tm.sd3_pipeline(tmp, with_t5=True, sd35=True))


@pytest.fixture(params=["sdxl", "sd3", "sd3_t5", "sd35"])
def any_family(request):
    return request.getfixturevalue(request.param)


def clone_folder(src: Path, dst: Path, skip=()) -> Path:
    """A pipeline folder whose parts are symlinks to ``src``'s, except the names in ``skip``."""
    dst.mkdir(parents=True)
    for item in src.iterdir():
        if item.name not in skip:
            (dst / item.name).symlink_to(item.resolve())
    return dst


def run_pipeline(pipe, guidance: float, seed: int = 0) -> torch.Tensor:
    """The pipeline's output latents (output_type="latent": the raw, still scaled, model-space latents)."""
    g = torch.Generator().manual_seed(seed)
    return pipe(PROMPTS, num_inference_steps=4, height=SIZE, width=SIZE, guidance_scale=guidance,
                output_type="latent", generator=g).images


def seed_noise(fam, seed: int = 0) -> torch.Tensor:
    """The standard normal draw the pipeline makes for the same seed (randn_tensor on CPU)."""
    shape = (len(PROMPTS),) + fam.latent_shape(SIZE, SIZE)
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def adapter_sample(fam, timesteps, guidance: float, init: str = "pipeline") -> torch.Tensor:
    cond = fam.encode_prompts(PROMPTS, SIZE, SIZE)
    return fam.sample_latents(fam.denoiser, cond, seed_noise(fam), timesteps, guidance_scale=guidance, init=init)


# ----------------------------------------------------------------------------------------------------
# loading and metadata


def test_detects_family_and_reads_schedule(sdxl, sd3):
    fam = sdxl[2]
    assert (fam.name, fam.prediction_type, fam.schedule.kind) == ("sdxl", "eps", "vp")
    assert (fam.schedule.beta_start, fam.schedule.beta_end, fam.schedule.beta_schedule) == (0.00085, 0.012,
                                                                                              "scaled_linear")
    assert fam.default_student_timesteps == [999.0, 749.0, 499.0, 249.0]
    assert all(len(tok) > 100 for tok in fam.tokenizers)
    fam = sd3[2]
    assert (fam.name, fam.prediction_type, fam.schedule.kind, fam.schedule.shift) == ("sd3", "flow", "flow", 3.0)
    # float32 shift of the unshifted grid and * 1000: ~6 roundings relative to each timestep
    assert fam.default_student_timesteps == pytest.approx([1000.0, 900.0, 750.0, 500.0], rel=6 * U32)
    assert fam.text_encoders[2] is None and fam.tokenizers[2] is None
    assert fam.latent_shape(SIZE, SIZE) == (4, 16, 16) and fam.default_resolution == SIZE


def test_explicit_family_matches(sdxl, sd3):
    assert load_family(sdxl[1], family="sdxl").name == "sdxl"
    assert load_family(sd3[1], family="sd3").name == "sd3"


# ----------------------------------------------------------------------------------------------------
# text conditioning == the pipeline's encode_prompt


def test_sdxl_encode_prompts_match_pipeline(sdxl):
    pipe, _, fam = sdxl
    with torch.no_grad():  # as inside the pipeline's __call__ (SDPA kernels differ with autograd on)
        pe, npe, pooled, npooled = pipe.encode_prompt(PROMPTS, device="cpu", do_classifier_free_guidance=True)
    cond, null = fam.encode_prompts(PROMPTS, SIZE, SIZE), fam.null_conditioning(len(PROMPTS), SIZE, SIZE)
    torch.testing.assert_close(cond.prompt_embeds, pe, rtol=0, atol=0)
    torch.testing.assert_close(cond.pooled_embeds, pooled, rtol=0, atol=0)
    torch.testing.assert_close(null.prompt_embeds, npe, rtol=0, atol=0)  # force_zeros_for_empty_prompt
    torch.testing.assert_close(null.pooled_embeds, npooled, rtol=0, atol=0)
    ids = pipe._get_add_time_ids((SIZE, SIZE), (0, 0), (SIZE, SIZE), dtype=pe.dtype,
                                 text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)
    assert torch.equal(cond.add_time_ids, ids.repeat(len(PROMPTS), 1))  # small integers: exact
    assert pe.shape == (2, 77, 64) and cond.add_time_ids.shape == (2, 6)


def test_sdxl_empty_prompt_branch_without_force_zeros(sdxl):
    pipe, _, fam = sdxl
    fam = copy.copy(fam)
    fam.index = {**fam.index, "force_zeros_for_empty_prompt": False}
    fam._null_cache = None
    with torch.no_grad():
        _, npe, _, npooled = pipe.encode_prompt(PROMPTS, device="cpu", negative_prompt="")
    null = fam.null_conditioning(len(PROMPTS))
    # the null row is encoded once and repeated; the pipeline encodes [""] * B (batch-size rounding only: the text
    # encoders' float32 round-off, tests/tolerances.py)
    k = network_factor(*fam.text_encoders)
    assert_close(null.prompt_embeds, npe, factor=k)
    assert_close(null.pooled_embeds, npooled, factor=k)
    assert null.prompt_embeds.abs().sum() > 0


@pytest.mark.parametrize("which", ["sd3", "sd3_t5"])
def test_sd3_encode_prompts_match_pipeline(which, request):
    pipe, _, fam = request.getfixturevalue(which)
    with torch.no_grad():  # as inside the pipeline's __call__ (SDPA kernels differ with autograd on)
        pe, npe, pooled, npooled = pipe.encode_prompt(PROMPTS, None, None, device="cpu")
    cond, null = fam.encode_prompts(PROMPTS), fam.null_conditioning(len(PROMPTS))
    torch.testing.assert_close(cond.prompt_embeds, pe, rtol=0, atol=0)
    torch.testing.assert_close(cond.pooled_embeds, pooled, rtol=0, atol=0)
    # "" encoded once, then repeated: batch-size rounding of the text encoders
    k = network_factor(*[e for e in fam.text_encoders if e is not None])
    assert_close(null.prompt_embeds, npe, factor=k)
    assert_close(null.pooled_embeds, npooled, factor=k)
    assert cond.add_time_ids is None and pe.shape == (2, 77 + 256, 96)
    assert (pe[:, 77:].abs().sum() == 0) == (which == "sd3")  # T5 absent -> zeros, like the pipeline


# ----------------------------------------------------------------------------------------------------
# sampling == the pipeline's output latents (same seed, same guidance)


@pytest.mark.parametrize("guidance", [1.0, 5.0])
def test_sampling_reproduces_pipeline(any_family, guidance):
    pipe, _, fam = any_family
    expected = run_pipeline(pipe, guidance)
    timesteps = pipe.scheduler.timesteps.tolist()
    got = adapter_sample(fam, timesteps, guidance)
    assert_within_contract(got, expected)


def test_sdxl_trailing_spacing_uses_sigma_initial_latent(sdxl):
    """Euler with trailing spacing starts at init_noise_sigma = sigma_max: x_VP = sigma_VP(t0) * z."""
    pipe, _, fam = sdxl
    trailing = type(pipe)(**{**pipe.components, "scheduler": tm.sdxl_scheduler("trailing")})
    trailing.set_progress_bar_config(disable=True)
    expected = run_pipeline(trailing, 5.0)
    timesteps = trailing.scheduler.timesteps.tolist()
    assert timesteps == fam.default_student_timesteps  # the student's steps are SDXL's trailing steps
    assert_within_contract(adapter_sample(fam, timesteps, 5.0, init="sigma"), expected)
    # the other rule does not reproduce it: outside the contract (the rules differ by 1 - sigma_VP(999) = 0.3 %)
    assert (adapter_sample(fam, timesteps, 5.0, init="noise") - expected).abs().max() > contract_bound(expected)
    fam_trailing = copy.copy(fam)
    fam_trailing.scheduler = trailing.scheduler
    assert_within_contract(adapter_sample(fam_trailing, timesteps, 5.0), expected)


def test_initial_latent_rule(sdxl, sd3):
    noise = torch.randn(2, 4, 16, 16)
    assert torch.equal(sdxl[2].initial_latents(noise, 751.0), noise)  # leading spacing (SDXL's config)
    assert torch.equal(sd3[2].initial_latents(noise, 1000.0), noise)  # flow: pure noise at sigma = 1
    _, sigma = sdxl[2].schedule.alpha_sigma(torch.tensor([999.0]))
    assert_close(sdxl[2].initial_latents(noise, 999.0, init="sigma"), sigma * noise, factor=1)  # one product
    with pytest.raises(FlashDMDError, match="initial latent rule"):
        sdxl[2].initial_latents(noise, 999.0, init="bogus")


def test_sdxl_v_prediction_reproduces_pipeline(sdxl, tmp_path):
    pipe, path, _ = sdxl
    sched = tm.sdxl_scheduler()
    sched.register_to_config(prediction_type="v_prediction")
    folder = clone_folder(path, tmp_path / "vpred", skip=("scheduler",))
    sched.save_pretrained(folder / "scheduler")
    fam = load_family(folder)
    assert fam.prediction_type == "v"
    vpipe = type(pipe)(**{**pipe.components, "scheduler": sched})
    vpipe.set_progress_bar_config(disable=True)
    expected = run_pipeline(vpipe, 5.0)
    got = adapter_sample(fam, vpipe.scheduler.timesteps.tolist(), 5.0)
    assert_within_contract(got, expected)


# ----------------------------------------------------------------------------------------------------
# predict(): raw network call, CFG batching, x0/eps consistency


def direct_call(fam, x, t, cond):
    """The network called by hand, outside the adapter."""
    if fam.name == "sdxl":
        added = {"text_embeds": cond.pooled_embeds, "time_ids": cond.add_time_ids}
        return fam.denoiser(x, t, encoder_hidden_states=cond.prompt_embeds, added_cond_kwargs=added).sample
    return fam.denoiser(hidden_states=x, timestep=t, encoder_hidden_states=cond.prompt_embeds,
                        pooled_projections=cond.pooled_embeds).sample


@torch.no_grad()
def test_predict_guidance_and_consistency(any_family, monkeypatch):
    _, _, fam = any_family
    # the pipeline's call, bitwise (the counted zero T5 tokens: tests/test_sd3_zero_t5.py)
    monkeypatch.setattr(fam, "zero_t5", "padded", raising=False)
    torch.manual_seed(0)
    x = torch.randn((2,) + fam.latent_shape(SIZE, SIZE))
    t = torch.tensor([fam.schedule.t_max * 0.95, fam.schedule.t_max * 0.3])
    cond, null = fam.encode_prompts(PROMPTS), fam.null_conditioning(2)
    a, s = (bcast(v, x) for v in fam.schedule.alpha_sigma(t))
    raw_c, raw_u = direct_call(fam, x, t, cond), direct_call(fam, x, t, null)
    x0, eps = fam.predict(fam.denoiser, x, t, cond, guidance_scale=1.0)
    ref = to_x0_eps(raw_c, fam.prediction_type, x, a, s)
    assert torch.equal(x0, ref[0]) and torch.equal(eps, ref[1])  # the same forward and conversion: bitwise
    # x = a x0 + s eps in float32: the conversion (x - s eps) / a (flow: (x - s u) / (a + s), then eps = u + x0)
    # and this sum round up to 6 times on values up to |a x0| + |s x0| + |s eps|
    mag = magnitude(a * x0) + magnitude(s * x0) + magnitude(s * eps)
    assert_close(a * x0 + s * eps, x, factor=6, mag=mag)
    # CFG: one batched [uncond; cond] forward == two separate forwards combined: batch-size rounding of the network
    # (network_factor), which u + w (c - u) multiplies by up to |w| + |w - 1| = 7
    combined = raw_u + 4.0 * (raw_c - raw_u)
    k = 7 * network_factor(fam.denoiser) + 3
    assert_close(fam.raw_prediction(fam.denoiser, x, t, cond, 4.0), combined, factor=k, mag=magnitude(raw_u, raw_c))
    x0, eps = fam.predict(fam.denoiser, x, t, cond, guidance_scale=4.0)
    ref = to_x0_eps(combined, fam.prediction_type, x, a, s)
    # ... and x0 = (x - sigma eps) / alpha multiplies that by sigma / alpha at high noise
    assert_close(x0, ref[0], factor=k, mag=magnitude(raw_u, raw_c) * float((s / a).max()) + magnitude(x / a))
    assert_close(a * x0 + s * eps, x, factor=6, mag=magnitude(a * x0) + magnitude(s * x0) + magnitude(s * eps))


def test_denoiser_fn_drives_the_shared_sampler(sd3):
    _, _, fam = sd3
    cond = fam.encode_prompts(PROMPTS)
    noise = seed_noise(fam)
    direct = samplers.sample(fam.denoiser_fn(fam.denoiser, cond), noise, fam.default_student_timesteps, fam.schedule)
    torch.testing.assert_close(fam.sample_latents(fam.denoiser, cond, noise), direct, rtol=0, atol=0)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    s1 = fam.sample_latents(fam.denoiser, cond, noise, stochastic=True, generator=g1)
    s2 = fam.sample_latents(fam.denoiser, cond, noise, stochastic=True, generator=g2)
    torch.testing.assert_close(s1, s2, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------------
# VAE: scaling (and shift for SD3), and the pipeline's decode path


@pytest.mark.parametrize("which", ["sdxl", "sd3"])
@torch.no_grad()
def test_vae_scaling_and_pipeline_decode(which, request):
    pipe, _, fam = request.getfixturevalue(which)
    vae, scale, shift = fam.vae, fam.vae.config.scaling_factor, fam.vae.config.shift_factor or 0.0
    assert (scale, shift) == ((0.13025, 0.0) if fam.name == "sdxl" else (1.5305, 0.0609))
    pixels = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1)) * 2 - 1
    z = vae.encode(pixels).latent_dist.mode()
    latents = fam.encode_images(pixels)
    assert torch.equal(latents, (z - shift) * scale)  # the same encoder pass and the same two operations
    # decode_latents recovers z as latents / scale + shift (2 roundings of z), then runs the decoder: its round-off
    k = network_factor(vae.decoder, vae.post_quant_conv or torch.nn.Identity()) + 2
    want = vae.decode(z).sample
    assert_close(fam.decode_latents(latents), want, factor=k)
    sampled = fam.encode_images(pixels, sample=True, generator=torch.Generator().manual_seed(0))
    assert sampled.shape == latents.shape and not torch.equal(sampled, latents)
    # the pipeline's own decode of its final latents == ours, mapped to [0, 1] as its postprocess does
    final = {}

    def keep_latents(_pipe, _i, _t, kwargs):
        final["latents"] = kwargs["latents"]
        return {}

    g = torch.Generator().manual_seed(0)
    image = pipe(PROMPTS, num_inference_steps=2, height=SIZE, width=SIZE, guidance_scale=1.0, output_type="pt",
                 generator=g, callback_on_step_end=keep_latents).images
    ours = (fam.decode_latents(final["latents"]) / 2 + 0.5).clamp(0, 1)
    # the pipeline unscales the latents with the same two operations; the mapping to [0, 1] rounds twice more
    assert_close(ours, image, factor=k + 2, mag=1.0)


# ----------------------------------------------------------------------------------------------------
# feature taps


def test_feature_taps(sdxl, sd3):
    for fam, n, shapes in [(sdxl[2], 3, [(2, 32, 8, 8), (2, 64, 8, 8), (2, 64, 8, 8)]),
                           (sd3[2], 2, [(2, 32, 16, 16)] * 2)]:
        x = torch.randn((2,) + fam.latent_shape(SIZE, SIZE), requires_grad=True)
        feats = fam.features(fam.denoiser, x, torch.tensor([500.0, 200.0]), fam.encode_prompts(PROMPTS))
        assert [tuple(f.shape) for f in feats] == shapes and len(feats) == n
        sum(f.square().mean() for f in feats).backward()
        assert x.grad is not None and x.grad.abs().sum() > 0
        assert not any(m._forward_hooks for m in fam.denoiser.modules())


def test_sd3_feature_map_is_the_token_grid(sd3):
    _, _, fam = sd3
    x, t, cond = torch.randn(2, 4, 16, 16), torch.tensor([700.0, 700.0]), fam.encode_prompts(PROMPTS)
    captured = []
    handle = fam.denoiser.transformer_blocks[0].register_forward_hook(lambda m, i, o: captured.append(o[1]))
    try:
        feats = fam.features(fam.denoiser, x, t, cond)
    finally:
        handle.remove()
    tokens = captured[0]  # (B, h*w, C), row-major over (h, w)
    torch.testing.assert_close(feats[0][:, :, 3, 5], tokens[:, 3 * 16 + 5, :], rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------------
# Conditioning


def test_conditioning_batch_ops(sdxl, sd3):
    cond = sdxl[2].encode_prompts(PROMPTS)
    assert len(cond) == 2 and len(cond[0]) == 1 and len(cond[-1]) == 1 and len(cond[0:2]) == 2
    both = Conditioning.cat([cond[1], cond[0]])
    torch.testing.assert_close(both.prompt_embeds, cond.prompt_embeds.flip(0), rtol=0, atol=0)
    torch.testing.assert_close(both.add_time_ids, cond.add_time_ids, rtol=0, atol=0)
    half = cond.to("cpu", torch.float64)
    assert half.prompt_embeds.dtype == torch.float64 and half.add_time_ids.dtype == torch.float64
    flow = sd3[2].encode_prompts(PROMPTS)
    assert flow.add_time_ids is None and flow[torch.tensor([1])].add_time_ids is None
    assert len(Conditioning.cat([flow, flow])) == 4
    with pytest.raises(FlashDMDError, match="add_time_ids"):
        Conditioning.cat([cond, flow])


# ----------------------------------------------------------------------------------------------------
# bad input -> FlashDMDError naming the path and what is missing


def test_not_a_diffusers_folder(tmp_path):
    (tmp_path / "weights.pt").write_bytes(b"\0")
    with pytest.raises(FlashDMDError, match="model_index.json is missing") as err:
        load_family(tmp_path)
    assert str(tmp_path) in str(err.value) and "\n" not in str(err.value)


def test_missing_folder_and_world_names(tmp_path):
    with pytest.raises(FlashDMDError, match="does not exist"):
        load_family(tmp_path / "nope")
    assert resolve_path("world-sd3").parts[-3:] == ("world", "assets", "world-sd3")
    if not resolve_path("world-sdxl").exists():
        with pytest.raises(FlashDMDError, match="world-sdxl"):
            load_family("world-sdxl")


def test_family_mismatch_and_unknown(sd3, tmp_path):
    with pytest.raises(FlashDMDError, match="StableDiffusion3Pipeline") as err:
        load_family(sd3[1], family="sdxl")
    assert str(sd3[1]) in str(err.value)
    with pytest.raises(FlashDMDError, match="unknown family"):
        load_family(sd3[1], family="kandinsky")
    with pytest.raises(FlashDMDError, match="needs a FluxPipeline"):
        load_family(sd3[1], family="flux")
    (tmp_path / "model_index.json").write_text('{"_class_name": "KandinskyV22Pipeline"}')
    with pytest.raises(FlashDMDError, match="KandinskyV22Pipeline pipeline; supported: .*FluxPipeline") as err:
        load_family(tmp_path)
    from flashdmd.families import PIPELINE_FAMILIES
    line = str(err.value)
    assert "\n" not in line and all(f"{cls} ({name})" in line for cls, name in PIPELINE_FAMILIES.items())


def test_missing_subfolder(sdxl, tmp_path):
    folder = clone_folder(sdxl[1], tmp_path / "p", skip=("text_encoder_2",))
    with pytest.raises(FlashDMDError, match="text_encoder_2") as err:
        load_family(folder)
    assert str(folder) in str(err.value)


def test_missing_weight_file(sd3, tmp_path):
    folder = clone_folder(sd3[1], tmp_path / "p", skip=("transformer",))
    (folder / "transformer").mkdir()
    shutil.copy(sd3[1] / "transformer" / "config.json", folder / "transformer")
    with pytest.raises(FlashDMDError, match="no weight file") as err:
        load_family(folder)
    assert str(folder / "transformer") in str(err.value)


def test_empty_tokenizer_is_refused(sdxl, tmp_path):
    folder = clone_folder(sdxl[1], tmp_path / "p", skip=("tokenizer_2",))
    (folder / "tokenizer_2").mkdir()
    shutil.copy(sdxl[1] / "tokenizer_2" / "tokenizer_config.json", folder / "tokenizer_2")
    with pytest.raises(FlashDMDError, match="tokenizer") as err:
        load_family(folder)
    assert str(folder / "tokenizer_2") in str(err.value)


def test_sd35_style_transformer_loads_through_the_sd3_family(sd35):
    """SD3.5's qk-norm and dual-attention (MMDiT-X) blocks need nothing of the adapter: the sd3 family loads them
    (sampling and encoding are checked against the pipeline above with the other families) and taps their blocks."""
    _, _, fam = sd35
    cfg = fam.denoiser.config
    assert fam.name == "sd3" and cfg.qk_norm == "rms_norm" and list(cfg.dual_attention_layers) == [0]
    assert fam.denoiser.transformer_blocks[0].attn2 is not None
    x = torch.randn(2, 4, 16, 16)
    feats = fam.features(fam.denoiser, x, torch.tensor([500.0, 500.0]), fam.encode_prompts(PROMPTS, SIZE, SIZE))
    assert len(feats) == 2 and all(f.shape[-2:] == (16, 16) for f in feats)


def test_masked_conditioning_pads_caches_and_pools():
    """Families whose token embeddings are padded (prompt_mask): cat pads to the longest with zeros and mask 0; the
    text cache answers rows of chunks of different lengths so; masked_mean averages the real tokens only."""
    from flashdmd.families import masked_mean
    from flashdmd.families.parts import TextCache
    g = torch.Generator().manual_seed(0)
    a = Conditioning(torch.randn(2, 3, 4, generator=g), torch.randn(2, 4, generator=g), None,
                     torch.tensor([[1, 1, 0], [1, 1, 1]]))
    b = Conditioning(torch.randn(1, 5, 4, generator=g), torch.randn(1, 4, generator=g), None, torch.ones(1, 5, dtype=torch.long))
    ab = Conditioning.cat([a, b])
    assert ab.prompt_embeds.shape == (3, 5, 4) and ab.prompt_mask.tolist() == [[1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1] * 5]
    assert torch.equal(ab.prompt_embeds[:2, :3], a.prompt_embeds) and not ab.prompt_embeds[:2, 3:].any()
    cache = TextCache()
    cache.add(["x", "y"], a.prompt_embeds, a.pooled_embeds, a.prompt_mask)
    cache.add(["z"], b.prompt_embeds, b.pooled_embeds, b.prompt_mask)
    embeds, pooled, mask = cache.lookup(["z", "x"], "cpu")
    assert torch.equal(embeds, ab.prompt_embeds[[2, 0]]) and torch.equal(mask, ab.prompt_mask[[2, 0]])
    assert torch.equal(pooled, ab.pooled_embeds[[2, 0]])
    want = a.prompt_embeds[0, :2].double().mean(0)
    assert torch.allclose(masked_mean(ab.prompt_embeds, ab.prompt_mask)[0].double(), want, rtol=0, atol=4 * 2 ** -24)
    with pytest.raises(FlashDMDError, match="prompt_mask"):
        Conditioning.cat([a, Conditioning(b.prompt_embeds, b.pooled_embeds)])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_plan_networks_take_the_dtypes_from_pretrained_gives(sd3_t5, dtype):
    """`flashdmd plan` builds each network on the meta device from its config: every parameter must get the dtype the
    real load gives it, or the plan miscounts bytes. T5 keeps its ``wo`` projections in float32 when loaded in
    float16 (transformers' _keep_in_fp32_modules); the diffusers VAE and transformer cast whole."""
    import json

    from flashdmd.families.parts import load_component, meta_component
    path = sd3_t5[1]
    index = json.loads((path / "model_index.json").read_text())
    for part in ("text_encoder_3", "vae", "transformer"):
        real = {n: p.dtype for n, p in load_component(path, index, part, dtype).named_parameters()}
        meta = {n: p.dtype for n, p in meta_component(path, index, part, dtype).named_parameters()}
        assert meta == real, part
    t5 = meta_component(path, index, "text_encoder_3", dtype)
    kept = [n for n, p in t5.named_parameters() if p.dtype != dtype]
    assert bool(kept) == (dtype == torch.float16) and all(".wo." in n for n in kept)
