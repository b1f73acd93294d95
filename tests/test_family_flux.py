"""FLUX.1 conformance (issue 18, item 1): the flux adapter speaks FluxPipeline exactly -- prompt encoding (CLIP-L
pooled + T5), 2x2 packing with position ids, the resolution-dependent (dynamic) shift, the guidance embedding of a
dev-style model and the true CFG of a schnell-style one, VAE scaling and shift -- shown by reproducing the
pipeline's output latents with tiny random FluxTransformer2DModels."""
from __future__ import annotations

import math

import pytest
import torch

import tiny_models as tm
from flashdmd import FlashDMDError
from flashdmd.families import load_family
from flashdmd.families.flux import image_ids, pack, unpack
from tolerances import U64, assert_close, assert_within_contract, fp32_bound, network_factor, within

PROMPTS = ["a photo of the cat", "in the digit seven"]
SIZE = 32  # pixels; the tiny VAE's factor is 2: latents 4x16x16, packed into 64 tokens of 16
F = 2


def _built(tmp_path_factory, name, guidance_embeds):
    tmp = tmp_path_factory.mktemp(name)
    pipe = tm.flux_pipeline(tmp, guidance_embeds=guidance_embeds)
    pipe.set_progress_bar_config(disable=True)
    path = tm.save_pipeline(pipe, tmp / "pipe")
    fam = load_family(path)
    fam.use_resolution(SIZE, SIZE)
    return pipe, path, fam


@pytest.fixture(scope="module")
def dev(tmp_path_factory):
    return _built(tmp_path_factory, "flux_dev", True)


@pytest.fixture(scope="module")
def schnell(tmp_path_factory):
    return _built(tmp_path_factory, "flux_schnell", False)


def run_pipeline(pipe, steps=4, seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    out = pipe(PROMPTS, num_inference_steps=steps, height=SIZE, width=SIZE, output_type="latent", generator=g,
               max_sequence_length=512, **kw).images
    return unpack(out, SIZE // F, SIZE // F)  # FluxPipeline returns its packed latents


def seed_noise(fam, seed=0):
    """FluxPipeline.prepare_latents' draw: randn (B, C, h, w) on CPU, then packed."""
    return torch.randn((len(PROMPTS),) + fam.latent_shape(SIZE, SIZE), generator=torch.Generator().manual_seed(seed))


def test_detects_flux_and_its_conventions(dev):
    _, _, fam = dev
    assert (fam.name, fam.prediction_type, fam.schedule.kind) == ("flux", "flow", "flow")
    assert fam.vae_scale_factor == F and fam.latent_shape(SIZE, SIZE) == (4, 16, 16)
    assert fam.default_resolution == 128 * F  # FluxPipeline's default_sample_size
    # mu at 64 image tokens, FluxPipeline's calculate_shift; the exponential time shift is the flow shift exp(mu)
    m = (1.15 - 0.5) / (4096 - 256)
    # float64 either way: mu's few operations and exp, a few u64 each (relative)
    assert fam.schedule.shift == pytest.approx(math.exp(64 * m + 0.5 - m * 256), rel=16 * U64)
    at_default = load_family(dev[1])  # before use_resolution: the default resolution's 4096 tokens, max_shift
    assert at_default.schedule.shift == pytest.approx(math.exp(1.15), rel=16 * U64)


def test_pack_and_ids_match_the_pipeline(dev):
    pipe = dev[0]
    x = torch.randn(2, 4, 6, 8)
    torch.testing.assert_close(pack(x), pipe._pack_latents(x, 2, 4, 6, 8), rtol=0, atol=0)
    torch.testing.assert_close(unpack(pack(x), 6, 8), x, rtol=0, atol=0)
    torch.testing.assert_close(image_ids(6, 8, "cpu", torch.float32),
                               pipe._prepare_latent_image_ids(2, 3, 4, "cpu", torch.float32), rtol=0, atol=0)


def test_encode_prompts_match_pipeline(dev):
    pipe, _, fam = dev
    cond = fam.encode_prompts(PROMPTS, SIZE, SIZE)
    with torch.no_grad():
        pe, pooled, _ = pipe.encode_prompt(PROMPTS, prompt_2=None, device="cpu", max_sequence_length=512)
    torch.testing.assert_close(cond.prompt_embeds, pe, rtol=0, atol=0)
    torch.testing.assert_close(cond.pooled_embeds, pooled, rtol=0, atol=0)
    assert cond.add_time_ids is None


def test_scheduler_timesteps_are_the_pipelines(dev):
    pipe, _, fam = dev
    seen = []
    real_step = pipe.scheduler.step

    def spy(noise_pred, t, latents, **kw):
        seen.append(float(t))
        return real_step(noise_pred, t, latents, **kw)
    pipe.scheduler.step = spy
    try:
        run_pipeline(pipe, guidance_scale=3.5)
    finally:
        pipe.scheduler.step = real_step
    # float32 timesteps near 1000: the time shift (exp, a division, ~6 roundings) and * 1000 on each side
    ours = fam.scheduler_timesteps(4)
    assert all(within(abs(a - b), fp32_bound(1000.0, 12)) for a, b in zip(ours, seen)) and len(ours) == len(seen)


@pytest.mark.parametrize("guidance", [3.5, 1.0, 6.0])
def test_dev_sampling_reproduces_the_pipeline(dev, guidance):
    """Guidance-distilled: guidance is the embedding (one forward), for any value; 1.0 is a value too here."""
    pipe, _, fam = dev
    want = run_pipeline(pipe, guidance_scale=guidance)
    cond = fam.encode_prompts(PROMPTS, SIZE, SIZE)
    old = fam.embedded_guidance
    try:
        fam.embedded_guidance = guidance  # guidance_scale 1 asks for the fixed embedded value: make it this one
        got = fam.sample_latents(fam.denoiser, cond, seed_noise(fam), fam.scheduler_timesteps(4), guidance_scale=guidance)
    finally:
        fam.embedded_guidance = old
    assert_within_contract(got, want)


def test_dev_embedded_guidance_is_an_input_not_a_cfg_pair(dev):
    _, _, fam = dev
    calls = []
    net = fam.denoiser
    h = net.register_forward_pre_hook(lambda m, a, kw: calls.append((kw["hidden_states"].shape[0],
                                                                     float(kw["guidance"][0]))), with_kwargs=True)
    try:
        x, cond = torch.randn(2, 4, 16, 16), fam.encode_prompts(PROMPTS, SIZE, SIZE)
        fam.predict(net, x, torch.tensor([700.0, 300.0]), cond, guidance_scale=4.0)
        fam.predict(net, x, torch.tensor([700.0, 300.0]), cond)  # no guidance asked: the fixed value
    finally:
        h.remove()
    assert calls == [(2, 4.0), (2, fam.embedded_guidance)]


@pytest.mark.parametrize("cfg", [1.0, 4.0])
def test_schnell_sampling_reproduces_the_pipeline_with_true_cfg(schnell, cfg):
    pipe, _, fam = schnell
    kw = {"negative_prompt": [""] * len(PROMPTS), "true_cfg_scale": cfg} if cfg > 1 else {}
    want = run_pipeline(pipe, guidance_scale=0.0, **kw)
    cond = fam.encode_prompts(PROMPTS, SIZE, SIZE)
    got = fam.sample_latents(fam.denoiser, cond, seed_noise(fam), fam.scheduler_timesteps(4), guidance_scale=cfg)
    assert_within_contract(got, want)


def test_vae_scaling_and_shift_match_the_pipeline_decode(dev):
    """Latents = (z - shift) * scale both ways, and the pipeline's own decode of its final (packed) latents is ours
    of the unpacked ones, mapped to [0, 1] as its postprocess does."""
    pipe, _, fam = dev
    vae = fam.vae
    assert (vae.config.scaling_factor, vae.config.shift_factor) == (0.3611, 0.1159)
    pixels = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1)) * 2 - 1
    z = vae.encode(pixels).latent_dist.mode()
    assert torch.equal(fam.encode_images(pixels), (z - 0.1159) * 0.3611)  # the same pass, the same two operations
    final = {}

    def keep_latents(_pipe, _i, _t, kwargs):
        final["latents"] = kwargs["latents"]
        return {}
    image = pipe(PROMPTS, num_inference_steps=2, height=SIZE, width=SIZE, output_type="pt", max_sequence_length=512,
                 generator=torch.Generator().manual_seed(0), callback_on_step_end=keep_latents).images
    ours = (fam.decode_latents(unpack(final["latents"], SIZE // F, SIZE // F)) / 2 + 0.5).clamp(0, 1)
    # the same unscaling (2 roundings) and decoder (its round-off, tests/tolerances.py), [0, 1] mapping (2 more)
    k = network_factor(vae.decoder, vae.post_quant_conv or torch.nn.Identity()) + 4
    assert_close(ours, image, factor=k, mag=1.0)


def test_feature_taps_are_token_grids(dev):
    _, _, fam = dev
    x, cond = torch.randn(2, 4, 16, 16), fam.encode_prompts(PROMPTS, SIZE, SIZE)
    feats = fam.features(fam.denoiser, x, torch.tensor([500.0, 500.0]), cond)
    assert len(feats) == 3 and all(f.shape == (2, 16, 8, 8) for f in feats)


def test_resolution_must_pack(dev):
    _, _, fam = dev
    with pytest.raises(FlashDMDError, match="not a multiple of 4"):
        fam.use_resolution(34, 34)
