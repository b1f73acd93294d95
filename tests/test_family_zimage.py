"""Z-Image conformance (issue 30, item 2): the zimage adapter speaks ZImagePipeline exactly -- the chat-template
prompt encoding (Qwen3's second-to-last hidden state of the real tokens, a list of variable-length embeddings kept
padded with a mask), the list-of-frames transformer call at the reversed time with its negated velocity, the
pipeline's CFG form cond + g (cond - uncond), the fixed and the resolution-dependent shift, the latent layout and the
VAE normalisation -- shown by reproducing the pipeline's output latents with a tiny random ZImageTransformer2DModel."""
from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

import tiny_zimage as tz
from flashdmd import FlashDMDError
from flashdmd.cli import main
from flashdmd.families import load_family
from flashdmd.families.parts import masked_mean
from tolerances import U64, assert_close, assert_within_contract, fp32_bound, network_factor, within

PROMPTS = ["a photo of the cat", "in the digit seven, thin"]  # tokenised to different lengths
SIZE = 32  # pixels; the tiny VAE's factor is 2: latents 4x16x16, 64 image tokens of 2x2 patches
F = 2


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    folders = tz.session_folders(tmp_path_factory)
    fam = load_family(folders["zimage"])
    fam.use_resolution(SIZE, SIZE)
    return folders["pipe"], folders, fam


def run_pipeline(pipe, size=SIZE, steps=4, seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    return pipe(list(PROMPTS), num_inference_steps=steps, height=size, width=size, output_type="latent",
                generator=g, **kw).images


def seed_noise(fam, size=SIZE, seed=0):
    """ZImagePipeline.prepare_latents' draw: randn (B, C, h, w) in float32 on the CPU."""
    return torch.randn((len(PROMPTS),) + fam.latent_shape(size, size), generator=torch.Generator().manual_seed(seed))


def test_detects_zimage_and_its_conventions(built):
    pipe, folders, fam = built
    assert (fam.name, fam.prediction_type, fam.schedule.kind) == ("zimage", "flow", "flow")
    assert fam.vae_scale_factor == F and fam.latent_shape(SIZE, SIZE) == (4, 16, 16)
    assert fam.default_resolution == 128 * F  # ZImagePipeline's 1024 px = 128 rows of its 8x VAE
    # the latent layout: what prepare_latents draws for this size, as flashdmd's latent maps
    lat = pipe.prepare_latents(2, pipe.transformer.in_channels, SIZE, SIZE, torch.float32, "cpu",
                               torch.Generator().manual_seed(0))
    assert torch.equal(lat, seed_noise(fam))
    assert fam.pipeline_guidance_default == 5.0 and type(fam).exported_guidance({}, folders["zimage"]) == 0.0


def test_encode_prompts_match_pipeline(built):
    """Each row's unmasked tokens are the pipeline's list entry, bit for bit; padding is zeros; the null conditioning
    is the pipeline's negative ("" through the chat template); pooled is the masked mean."""
    pipe, _, fam = built
    cond = fam.encode_prompts(PROMPTS, SIZE, SIZE)
    with torch.no_grad():
        pos, neg = pipe.encode_prompt(list(PROMPTS), device="cpu", do_classifier_free_guidance=True)
    lengths = [len(p) for p in pos]
    assert lengths[0] != lengths[1] and cond.prompt_embeds.shape[1] == max(lengths)
    assert cond.prompt_mask.sum(1).tolist() == lengths
    for i, want in enumerate(pos):
        assert torch.equal(cond.prompt_embeds[i][cond.prompt_mask[i]], want)
        assert not cond.prompt_embeds[i][~cond.prompt_mask[i]].any()
    assert torch.equal(cond.pooled_embeds, masked_mean(cond.prompt_embeds, cond.prompt_mask))
    null = fam.null_conditioning(1)
    assert torch.equal(null.prompt_embeds[0][null.prompt_mask[0]], neg[0])


def test_the_text_cache_keeps_each_prompts_tokens(built):
    """model_text_cache: rows cached from chunks of different token lengths come back padded to the longest, with
    masks that select exactly the tokens encoded before (the same batches, bitwise); the encoder can then go."""
    _, folders, _ = built
    fam = load_family(folders["zimage"])
    fresh = fam.encode_prompts(PROMPTS)
    longer = "the thin cat in the digit seven, then the cat in the other digit"
    fam.cache_prompts(list(PROMPTS) + [longer], batch=2)
    fam.release_text_encoders()
    cached = fam.encode_prompts(PROMPTS)
    assert cached.prompt_embeds.shape[1] > fresh.prompt_embeds.shape[1]  # padded to the longer chunk
    assert torch.equal(cached.prompt_mask.sum(1), fresh.prompt_mask.sum(1))
    for i in range(len(PROMPTS)):
        assert torch.equal(cached.prompt_embeds[i][cached.prompt_mask[i]], fresh.prompt_embeds[i][fresh.prompt_mask[i]])
    assert fam.null_conditioning(2).prompt_mask.shape[0] == 2
    # the padding never reaches the network: the same token lists, the same prediction
    x, t = torch.randn(2, 4, 16, 16), torch.tensor([800.0, 300.0])
    assert torch.equal(fam.raw_prediction(fam.denoiser, x, t, cached), fam.raw_prediction(fam.denoiser, x, t, fresh))


def _pipeline_timesteps(pipe, size):
    seen = []
    real_step = pipe.scheduler.step

    def spy(noise_pred, t, latents, **kw):
        seen.append(float(t))
        return real_step(noise_pred, t, latents, **kw)
    pipe.scheduler.step = spy
    try:
        run_pipeline(pipe, size=size, guidance_scale=0.0)
    finally:
        pipe.scheduler.step = real_step
    return seen


@pytest.mark.parametrize("dynamic", [False, True])
def test_scheduler_timesteps_and_shift_at_two_resolutions(built, dynamic):
    """Z-Image's scheduler has a fixed shift (6): the pipeline's mu is ignored, the same timesteps at every size. With
    use_dynamic_shifting the shift is exp(mu(image tokens)) and the timesteps move with the size. Either way
    scheduler_timesteps after use_resolution are the pipeline's own (the same float ops: equal)."""
    from diffusers import ZImagePipeline
    pipe, folders, _ = built
    if dynamic:
        pipe = ZImagePipeline.from_pretrained(folders["dynamic"])
        pipe.set_progress_bar_config(disable=True)
    fam = load_family(folders["dynamic" if dynamic else "zimage"])
    got = {}
    for size in (SIZE, 2 * SIZE):
        fam.use_resolution(size, size)
        got[size] = fam.scheduler_timesteps(4)
        assert got[size] == _pipeline_timesteps(pipe, size)
        tokens = (size // F // 2) ** 2
        m = (1.15 - 0.5) / (4096 - 256)
        # float64 either way: mu's few operations and exp, a few u64 each (relative)
        want = math.exp(tokens * m + 0.5 - m * 256) if dynamic else tz.SHIFT
        assert fam.schedule.shift == pytest.approx(want, rel=16 * U64)
        # the student's steps are the same shifted sigmas (1, .75, .5, .25) in float64: float32 timesteps near
        # 1000 (the shift, a division, ~6 roundings, and * 1000) on the pipeline's side
        assert all(within(abs(a - b), fp32_bound(1000.0, 12)) for a, b in zip(fam.default_student_timesteps, got[size]))
    assert (got[SIZE] != got[2 * SIZE]) == dynamic


@pytest.mark.parametrize("g", [5.0, 0.0, 2.0])
def test_sampling_reproduces_the_pipeline(built, g):
    """ZImagePipeline's guidance_scale g (cond + g (cond - uncond); default 5, 0 = no CFG) is flashdmd's w = g + 1."""
    pipe, _, fam = built
    want = run_pipeline(pipe, guidance_scale=g)
    cond = fam.encode_prompts(PROMPTS, SIZE, SIZE)
    got = fam.sample_latents(fam.denoiser, cond, seed_noise(fam), fam.scheduler_timesteps(4), guidance_scale=g + 1)
    assert_within_contract(got, want)
    if g:  # the guidance is really in play: without it the pipeline's latents are out of reach
        plain = fam.sample_latents(fam.denoiser, cond, seed_noise(fam), fam.scheduler_timesteps(4))
        assert (plain - want).abs().max() > 1e-2


@pytest.mark.parametrize("norm,trunc", [(1.0, 1.0), (0.0, 0.1), (1.5, 0.1)])
def test_the_pipelines_cfg_options_are_reproduced(built, norm, trunc, monkeypatch):
    """cfg_normalization (a row's guided prediction capped at c times its conditional norm) and cfg_truncation (rows
    past (1000 - t) / 1000 > truncation unguided; with shift 6 the 4 steps are at 0, .05, .14, .33) as the pipeline
    runs them: off by default, reproduced when set on the family."""
    pipe, _, fam = built
    want = run_pipeline(pipe, guidance_scale=5.0, cfg_normalization=norm, cfg_truncation=trunc)
    cond = fam.encode_prompts(PROMPTS, SIZE, SIZE)
    plain = fam.sample_latents(fam.denoiser, cond, seed_noise(fam), fam.scheduler_timesteps(4), guidance_scale=6.0)
    monkeypatch.setattr(fam, "cfg_normalization", norm)
    monkeypatch.setattr(fam, "cfg_truncation", trunc)
    got = fam.sample_latents(fam.denoiser, cond, seed_noise(fam), fam.scheduler_timesteps(4), guidance_scale=6.0)
    assert_within_contract(got, want)
    assert (plain - want).abs().max() > 1e-2  # the options changed the pipeline's latents: they are in play


def test_the_network_sees_frames_reversed_time_and_text_lists(built):
    """_forward feeds a list of (C, 1, h, w) frames, t' = (1000 - t) / 1000 and each row's real tokens, and returns
    the negated output: the flow velocity eps - x0."""
    _, _, fam = built
    net, seen = fam.denoiser, {}
    h = net.register_forward_pre_hook(lambda m, a, kw: seen.update(x=a[0], t=a[1], caps=a[2]), with_kwargs=True)
    cond = fam.encode_prompts(PROMPTS, SIZE, SIZE)
    x, t = torch.randn(2, 4, 16, 16), torch.tensor([700.0, 250.0])
    try:
        u = fam.raw_prediction(net, x, t, cond)
    finally:
        h.remove()
    assert [f.shape for f in seen["x"]] == [(4, 1, 16, 16)] * 2
    assert torch.equal(seen["t"], torch.tensor([0.3, 0.75]))
    assert [len(c) for c in seen["caps"]] == cond.prompt_mask.sum(1).tolist()
    with torch.no_grad():
        out = net(seen["x"], seen["t"], seen["caps"], return_dict=False)[0]
    assert torch.equal(u, -torch.stack(out).squeeze(2))


def test_vae_scaling_and_shift_match_the_pipeline_decode(built):
    """Latents = (z - shift) * scale both ways, and the pipeline's own decode of its final latents is ours, mapped
    to [0, 1] as its postprocess does."""
    pipe, _, fam = built
    vae = fam.vae
    assert (vae.config.scaling_factor, vae.config.shift_factor) == (0.3611, 0.1159)
    pixels = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1)) * 2 - 1
    z = vae.encode(pixels).latent_dist.mode()
    assert torch.equal(fam.encode_images(pixels), (z - 0.1159) * 0.3611)  # the same pass, the same two operations
    final = {}

    def keep_latents(_pipe, _i, _t, kwargs):
        final["latents"] = kwargs["latents"]
        return {}
    image = pipe(list(PROMPTS), num_inference_steps=2, height=SIZE, width=SIZE, output_type="pt", guidance_scale=0.0,
                 generator=torch.Generator().manual_seed(0), callback_on_step_end=keep_latents).images
    ours = (fam.decode_latents(final["latents"]) / 2 + 0.5).clamp(0, 1)
    # the same unscaling (2 roundings) and decoder (its round-off, tests/tolerances.py), [0, 1] mapping (2 more)
    k = network_factor(vae.decoder, vae.post_quant_conv or torch.nn.Identity()) + 4
    assert_close(ours, image, factor=k, mag=1.0)


def test_feature_taps_are_image_token_grids(built):
    _, _, fam = built
    x, cond = torch.randn(2, 4, 16, 16), fam.encode_prompts(PROMPTS, SIZE, SIZE)
    feats = fam.features(fam.denoiser, x, torch.tensor([500.0, 500.0]), cond)
    assert len(feats) == 2 and all(f.shape == (2, 32, 8, 8) for f in feats)


def test_resolution_must_patch(built):
    _, _, fam = built
    with pytest.raises(FlashDMDError, match="not a multiple of 4"):
        fam.use_resolution(34, 34)


def test_info_says_family_resolution_and_latent_shape(built, capsys, tmp_path):
    _, folders, _ = built
    assert main(["info", "--model", str(folders["zimage"])]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["family"], info["resolution"], info["latent_shape"]) == ("zimage", 256, [4, 128, 128])
    # a pipeline of another kind: one line naming the supported ones, Z-Image among them
    other = shutil.copytree(folders["zimage"], tmp_path / "other", ignore=shutil.ignore_patterns("*.safetensors"))
    index = json.loads((other / "model_index.json").read_text())
    (other / "model_index.json").write_text(json.dumps({**index, "_class_name": "LuminaPipeline"}))
    with pytest.raises(FlashDMDError, match=r"supported: .*ZImagePipeline \(zimage\)"):
        load_family(other)
