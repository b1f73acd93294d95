"""Qwen-Image conformance (issue 30, item 2): the qwenimage adapter speaks QwenImagePipeline exactly -- the chat-
template prompt encoding with its mask, true CFG with the pipeline's norm rescaling, 2x2 packing, the
resolution-dependent shift with the scheduler's terminal stretch, and the video VAE's per-channel normalisation --
shown by reproducing the pipeline's output latents with a tiny random QwenImageTransformer2DModel."""
from __future__ import annotations

import json
import math

import pytest
import torch
from diffusers import QwenImagePipeline

import tiny_qwenimage as tq
from flashdmd import FlashDMDError
from flashdmd.cli import main
from flashdmd.families import load_family
from flashdmd.families.base import Family
from flashdmd.families.parts import masked_mean
from flashdmd.families.qwenimage import DROP_IDX, NEGATIVE_PROMPT, QwenImageFamily, pack, unpack
from tolerances import U64, assert_close, assert_within_contract, contract_bound, fp32_bound, network_factor, within

PROMPTS = ["a photo of the cat", "in"]  # different lengths: the second row's embeddings are padded
SIZE = 32  # pixels; the tiny VAE's factor is 2: latents 4x16x16, packed into 64 tokens of 16
F = 2


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    path = tq.qwenimage_folders(tmp_path_factory)["qwenimage"]
    pipe = QwenImagePipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    fam = load_family(path)
    fam.use_resolution(SIZE, SIZE)
    return pipe, path, fam


def run_pipeline(pipe, size=SIZE, steps=4, seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    out = pipe(PROMPTS, num_inference_steps=steps, height=size, width=size, output_type="latent", generator=g, **kw)
    return unpack(out.images, size // F, size // F)  # QwenImagePipeline returns its packed latents


def seed_noise(fam, seed=0):
    """QwenImagePipeline.prepare_latents' draw: randn (B, 1, C, h, w) on CPU -- the same numbers as (B, C, h, w)."""
    return torch.randn((len(PROMPTS),) + fam.latent_shape(SIZE, SIZE), generator=torch.Generator().manual_seed(seed))


def mu(seq: int) -> float:
    """QwenImagePipeline's calculate_shift with Qwen-Image's scheduler config (base 0.5 at 256, max 0.9 at 8192)."""
    m = (0.9 - 0.5) / (8192 - 256)
    return seq * m + 0.5 - m * 256


def test_detects_qwenimage_and_its_conventions(built):
    _, path, fam = built
    assert isinstance(fam, QwenImageFamily) and (fam.name, fam.prediction_type) == ("qwenimage", "flow")
    assert fam.vae_scale_factor == F and fam.latent_shape(SIZE, SIZE) == (4, 16, 16)
    assert fam.default_resolution == 128 * F  # QwenImagePipeline.default_sample_size
    # float64 either way: mu's few operations and exp, a few u64 each (relative)
    assert fam.schedule.shift == pytest.approx(math.exp(mu(64)), rel=16 * U64)
    assert load_family(path).schedule.shift == pytest.approx(math.exp(mu(64 * 64)), rel=16 * U64)
    export = (fam.pipeline_guidance_default, fam.pipeline_sigma_grid, fam.exported_guidance({}, path))
    assert export == (4.0, "linspace", 1.0)


def test_pack_matches_the_pipeline(built):
    pipe = built[0]
    x = torch.randn(2, 4, 6, 8)
    packed = pipe._pack_latents(x.unsqueeze(2), 2, 4, 6, 8)  # the pipeline packs its (B, 1, C, h, w) draw
    assert torch.equal(pack(x), packed)
    assert torch.equal(unpack(packed, 6, 8), pipe._unpack_latents(packed, 6 * F, 8 * F, F)[:, :, 0])


def test_encode_prompts_match_pipeline(built):
    pipe, _, fam = built
    cond = fam.encode_prompts(PROMPTS)
    with torch.no_grad():
        pe, mask = pipe.encode_prompt(PROMPTS, device="cpu", max_sequence_length=512)
    assert torch.equal(cond.prompt_embeds, pe) and torch.equal(cond.prompt_mask, mask) and not bool(mask.all())
    assert torch.equal(cond.pooled_embeds, masked_mean(pe, mask)) and cond.add_time_ids is None
    # the template's first DROP_IDX tokens are dropped: the longest row keeps len(tokens) - 34
    ids = pipe.tokenizer(pipe.prompt_template_encode.format(PROMPTS[0])).input_ids
    assert (DROP_IDX, pe.shape[1]) == (pipe.prompt_template_encode_start_idx, len(ids) - DROP_IDX)
    null = fam.null_conditioning(1)
    with torch.no_grad():
        ne, nmask = pipe.encode_prompt([NEGATIVE_PROMPT], device="cpu", max_sequence_length=512)
    assert torch.equal(null.prompt_embeds, ne) and nmask is None and bool(null.prompt_mask.all())


def test_unpadded_conditioning_reaches_the_network_without_a_mask(built):
    """QwenImagePipeline.encode_prompt drops an all-ones mask; so does the adapter's forward (a padded batch keeps
    it)."""
    _, _, fam = built
    seen = []
    h = fam.denoiser.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["encoder_hidden_states_mask"]),
                                               with_kwargs=True)
    try:
        x = torch.randn(1, 4, 16, 16)
        fam.predict(fam.denoiser, x, torch.tensor([500.0]), fam.encode_prompts(PROMPTS[:1]))
        fam.predict(fam.denoiser, torch.cat([x, x]), torch.tensor([500.0, 500.0]), fam.encode_prompts(PROMPTS))
    finally:
        h.remove()
    assert seen[0] is None and seen[1] is not None and not bool(seen[1].all())


@pytest.mark.parametrize("size", [SIZE, 2 * SIZE])
def test_scheduler_timesteps_and_shift_are_the_pipelines(built, size):
    """Two resolutions, two shifts; the grid includes the scheduler's shift_terminal stretch (last sigma 0.02)."""
    pipe, path, _ = built
    fam = load_family(path)
    fam.use_resolution(size, size)
    seen = []
    real_step = pipe.scheduler.step

    def spy(noise_pred, t, latents, **kw):
        seen.append(float(t))
        return real_step(noise_pred, t, latents, **kw)
    pipe.scheduler.step = spy
    try:
        run_pipeline(pipe, size=size)
    finally:
        pipe.scheduler.step = real_step
    tokens = (size // F // 2) ** 2
    assert fam.schedule.shift == pytest.approx(math.exp(mu(tokens)), rel=16 * U64)
    # float32 timesteps near 1000: the time shift (exp, a division, ~6 roundings), the stretch (~4), * 1000
    ours = fam.scheduler_timesteps(4)
    assert len(ours) == len(seen) and all(within(abs(a - b), fp32_bound(1000.0, 16)) for a, b in zip(ours, seen))
    assert ours[-1] == pytest.approx(1000 * tq.QWEN_SCHEDULER["shift_terminal"], abs=fp32_bound(1000.0, 16))


@pytest.mark.parametrize("cfg", [4.0, 2.5, 1.0])
def test_sampling_reproduces_the_pipeline(built, cfg):
    """4.0: the pipeline's default true_cfg_scale with the model card's negative prompt; 2.5: another; 1.0: no CFG."""
    pipe, _, fam = built
    kw = {"negative_prompt": [NEGATIVE_PROMPT] * len(PROMPTS), "true_cfg_scale": cfg} if cfg > 1 else {}
    want = run_pipeline(pipe, **kw)
    cond = fam.encode_prompts(PROMPTS)
    got = fam.sample_latents(fam.denoiser, cond, seed_noise(fam), fam.scheduler_timesteps(4), guidance_scale=cfg)
    assert_within_contract(got, want)


def test_true_cfg_is_rescaled_as_the_pipeline_does(built):
    """The guided velocity is uncond + w (cond - uncond) rescaled per packed token to |cond|: the same operations as
    QwenImagePipeline (bitwise on the same predictions), and far from plain CFG."""
    _, _, fam = built
    x, t = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(3)), torch.tensor([700.0, 300.0])
    cond, null = fam.encode_prompts(PROMPTS), fam.null_conditioning(2)
    ours = fam.raw_prediction(fam.denoiser, x, t, cond, 4.0)
    plain = Family.raw_prediction(fam, fam.denoiser, x, t, cond, 4.0)  # the protocol's CFG, no rescaling
    neg, pos = fam.raw_prediction(fam.denoiser, x, t, null, 1.0), fam.raw_prediction(fam.denoiser, x, t, cond, 1.0)
    neg_t, pos_t = pack(neg), pack(pos)
    comb = neg_t + 4.0 * (pos_t - neg_t)
    want = unpack(comb * (torch.norm(pos_t, dim=-1, keepdim=True) / torch.norm(comb, dim=-1, keepdim=True)), 16, 16)
    # the batched [uncond; cond] forward vs two separate ones: the network's round-off, times (|w| + |w - 1|) = 7 and
    # the rescaling's norm ratio (a few more roundings)
    assert_close(ours, want, factor=7 * network_factor(fam.denoiser) + 8)
    assert (ours - plain).abs().max() > contract_bound(plain)


def test_vae_normalisation_matches_the_pipeline(built):
    """latents = (z - latents_mean) / latents_std on the one-frame 5-D latent (the img2img pipeline's encode), and
    the pipeline's own decode of its final (packed) latents is ours of the unpacked ones, mapped to [0, 1]."""
    pipe, _, fam = built
    vae = fam.vae
    pixels = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1)) * 2 - 1
    z = vae.encode(pixels.unsqueeze(2)).latent_dist.mode()
    mean = torch.tensor(vae.config.latents_mean).view(1, 4, 1, 1, 1)
    inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, 4, 1, 1, 1)
    assert torch.equal(fam.encode_images(pixels), ((z - mean) * inv_std)[:, :, 0])  # the same pass and operations
    final = {}

    def keep_latents(_pipe, _i, _t, kwargs):
        final["latents"] = kwargs["latents"]
        return {}
    image = pipe(PROMPTS, num_inference_steps=2, height=SIZE, width=SIZE, output_type="pt",
                 generator=torch.Generator().manual_seed(0), callback_on_step_end=keep_latents).images
    ours = (fam.decode_latents(unpack(final["latents"], SIZE // F, SIZE // F)) / 2 + 0.5).clamp(0, 1)
    # the same unscaling (2 roundings) and decoder (its round-off, tests/tolerances.py), [0, 1] mapping (2 more)
    assert_close(ours, image, factor=network_factor(vae.decoder, vae.post_quant_conv) + 4, mag=1.0)


def test_feature_taps_are_token_grids(built):
    _, _, fam = built
    x, cond = torch.randn(2, 4, 16, 16), fam.encode_prompts(PROMPTS)
    feats = fam.features(fam.denoiser, x, torch.tensor([500.0, 500.0]), cond)
    assert len(feats) == 2 and all(f.shape == (2, 16, 8, 8) for f in feats)


def test_resolution_must_pack(built):
    _, _, fam = built
    with pytest.raises(FlashDMDError, match="not a multiple of 4"):
        fam.use_resolution(34, 34)


def test_info_names_the_family_resolution_and_latent_shape(built, capsys):
    assert main(["info", "--model", str(built[1])]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["family"], info["resolution"], info["latent_shape"]) == ("qwenimage", 128 * F, [4, 128, 128])
    assert info["default_student_timesteps"][0] == 1000.0  # sigma 1 through the shift stays the schedule's top
