"""FLUX.2 conformance (issue 30, item 2), for both pipelines: the flux2 adapter speaks Flux2Pipeline (FLUX.2-dev:
Mistral-3 stacked hidden states, guidance embedding) and the flux2-klein adapter Flux2KleinPipeline (Qwen3 stacked
hidden states, true CFG) exactly -- prompt encoding, 2x2 patchify + batch-norm normalisation of the VAE latents,
token packing with 4-axis position ids, the resolution- and step-dependent empirical shift -- shown by reproducing
each pipeline's output latents with tiny random models of the real classes (tests/tiny_flux2.py)."""
from __future__ import annotations

import math

import pytest
import torch
from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu

import tiny_flux2 as tf
from flashdmd import FlashDMDError
from flashdmd.families import load_family
from flashdmd.families.flux2 import image_ids, pack, patchify, text_ids, unpack, unpatchify
from flashdmd.families.parts import masked_mean
from tolerances import U64, assert_close, assert_within_contract, fp32_bound, network_factor, within

PROMPTS = ["a photo of the cat", "in the digit seven"]
SIZE = 32  # pixels; the tiny VAE's factor is 2, x2 patchify: latents 16x8x8 = 64 tokens
F = 4


def _built(tmp_path_factory, kind):
    tmp = tmp_path_factory.mktemp(f"flux2_{kind}")
    pipe = getattr(tf, f"{kind}_pipeline")(tmp)
    pipe.set_progress_bar_config(disable=True)
    path = tf.saved(pipe, tmp / "pipe")
    fam = load_family(path)
    fam.use_resolution(SIZE, SIZE)
    return pipe, path, fam


@pytest.fixture(scope="module")
def klein(tmp_path_factory):
    return _built(tmp_path_factory, "klein")


@pytest.fixture(scope="module")
def dev(tmp_path_factory):
    return _built(tmp_path_factory, "dev")


@pytest.fixture(params=["klein", "dev"])
def both(request):
    return request.param, request.getfixturevalue(request.param)


def run_pipeline(kind, pipe, steps=4, seed=0, size=SIZE, **kw):
    """The pipeline's output latents in flashdmd's layout (B, 128, h, w): klein returns the VAE's z (de-normalised,
    unpatchified), dev its packed normalised tokens."""
    g = torch.Generator().manual_seed(seed)
    out = pipe(prompt=PROMPTS, num_inference_steps=steps, height=size, width=size, output_type="latent", generator=g,
               **kw).images
    if kind == "dev":
        return unpack(out, size // F, size // F)
    mean, std = _bn(pipe.vae)
    return (patchify(out) - mean) / std


def _bn(vae):
    return (vae.bn.running_mean.view(1, -1, 1, 1),
            torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps))


def seed_noise(fam, seed=0, size=SIZE):
    """The pipelines' prepare_latents draw: randn (B, 128, h, w) on the CPU -- flashdmd's latent layout."""
    return torch.randn((len(PROMPTS),) + fam.latent_shape(size, size), generator=torch.Generator().manual_seed(seed))


def test_detects_each_pipeline_and_its_conventions(klein, dev):
    for (_, path, fam), name in ((klein, "flux2-klein"), (dev, "flux2")):
        assert (fam.name, fam.prediction_type, fam.schedule.kind) == (name, "flow", "flow")
        assert fam.vae_scale_factor == F and fam.latent_shape(SIZE, SIZE) == (16, 8, 8)
        assert fam.default_resolution == 128 * F // 2  # the pipelines' default_sample_size x the VAE's factor
        # the 4-step shift at 64 image tokens: exp(the pipeline's own compute_empirical_mu), float64 either way
        assert fam.schedule.shift == pytest.approx(math.exp(compute_empirical_mu(64, 4)), rel=16 * U64)
        at_default = load_family(path)  # before use_resolution: the default resolution's (64x64 latents) 4096 tokens
        assert at_default.schedule.shift == pytest.approx(math.exp(compute_empirical_mu(4096, 4)), rel=16 * U64)
    assert dev[2].guidance_embedded(dev[2].denoiser) and not klein[2].denoiser.config.guidance_embeds


def test_patchify_pack_and_ids_match_the_pipeline(klein):
    pipe = klein[0]
    z = torch.randn(2, 4, 6, 8)
    torch.testing.assert_close(patchify(z), pipe._patchify_latents(z), rtol=0, atol=0)
    torch.testing.assert_close(unpatchify(patchify(z)), z, rtol=0, atol=0)
    torch.testing.assert_close(unpatchify(patchify(z)), pipe._unpatchify_latents(pipe._patchify_latents(z)), rtol=0,
                               atol=0)
    x = torch.randn(2, 16, 3, 4)
    torch.testing.assert_close(pack(x), pipe._pack_latents(x), rtol=0, atol=0)
    torch.testing.assert_close(unpack(pack(x), 3, 4), x, rtol=0, atol=0)
    ids = pipe._prepare_latent_ids(x)
    torch.testing.assert_close(image_ids(2, 3, 4, "cpu"), ids, rtol=0, atol=0)
    torch.testing.assert_close(pipe._unpack_latents_with_ids(pack(x), ids, 3, 4), x, rtol=0, atol=0)
    e = torch.randn(2, 5, 7)
    torch.testing.assert_close(text_ids(2, 5, "cpu"), pipe._prepare_text_ids(e), rtol=0, atol=0)


def test_encode_prompts_match_the_pipeline(both):
    kind, (pipe, _, fam) = both
    cond = fam.encode_prompts(PROMPTS, SIZE, SIZE)
    with torch.no_grad():
        pe, _ = pipe.encode_prompt(PROMPTS, device="cpu")
    torch.testing.assert_close(cond.prompt_embeds, pe, rtol=0, atol=0)
    assert cond.prompt_embeds.shape == (2, 512, 48) and cond.add_time_ids is None
    ids, mask = fam._text_inputs(PROMPTS)
    assert torch.equal(cond.prompt_mask, mask) and 0 < int(mask.sum(1).min()) < int(mask.sum(1).max()) < 512
    assert torch.equal(cond.pooled_embeds, masked_mean(pe, mask))
    null = fam.null_conditioning(2)
    with torch.no_grad():
        ne, _ = pipe.encode_prompt(["", ""], device="cpu")
    torch.testing.assert_close(null.prompt_embeds, ne, rtol=0, atol=0)


def test_dev_folder_with_its_published_pixtral_processor_loads_without_torchvision(dev, tmp_path):
    """FLUX.2-dev ships its tokenizer as a PixtralProcessor, which transformers builds only with torchvision; without
    it the family loads the folder's tokenizer and the processor's chat template (chat_template.jinja) and encodes
    exactly as the tokenizer does; a folder with no template is one line naming torchvision."""
    import importlib.util
    import json
    import shutil
    _, path, fam = dev
    folder = tmp_path / "dev"
    shutil.copytree(path, folder)
    index = json.loads((folder / "model_index.json").read_text())
    index["tokenizer"] = ["transformers", "PixtralProcessor"]
    (folder / "model_index.json").write_text(json.dumps(index))
    config = json.loads((folder / "tokenizer" / "tokenizer_config.json").read_text())
    template = config.pop("chat_template", None) or fam.tokenizers[0].chat_template
    (folder / "tokenizer" / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "tokenizer" / "chat_template.jinja").write_text(template)
    (folder / "tokenizer" / "processor_config.json").write_text(json.dumps({"processor_class": "PixtralProcessor"}))
    if importlib.util.find_spec("torchvision") is not None:
        pytest.skip("torchvision is installed: transformers builds the PixtralProcessor itself")
    other = load_family(folder)
    other.use_resolution(SIZE, SIZE)
    assert torch.equal(other.encode_prompts(PROMPTS, SIZE, SIZE).prompt_embeds,
                       fam.encode_prompts(PROMPTS, SIZE, SIZE).prompt_embeds)
    (folder / "tokenizer" / "chat_template.jinja").unlink()
    with pytest.raises(FlashDMDError, match="torchvision") as err:
        load_family(folder)
    assert "\n" not in str(err.value)


def _spy_timesteps(kind, pipe, size, steps, **kw):
    seen = []
    real_step = pipe.scheduler.step

    def spy(noise_pred, t, latents, **k):
        seen.append(float(t))
        return real_step(noise_pred, t, latents, **k)
    pipe.scheduler.step = spy
    try:
        run_pipeline(kind, pipe, steps=steps, size=size, **kw)
    finally:
        pipe.scheduler.step = real_step
    return seen


@pytest.mark.parametrize("size", [SIZE, 64])
def test_scheduler_timesteps_are_the_pipelines_at_two_resolutions(klein, size):
    pipe, _, fam = klein
    try:
        fam.use_resolution(size, size)
        for steps in (4, 6):
            seen = _spy_timesteps("klein", pipe, size, steps, guidance_scale=1.0)
            # float32 timesteps near 1000: the time shift (exp, a division, ~6 roundings) and * 1000 on each side
            ours = fam.scheduler_timesteps(steps)
            assert len(ours) == len(seen) and all(within(abs(a - b), fp32_bound(1000.0, 12)) for a, b in zip(ours, seen))
        # the student's 4 steps are the pipeline's 4-step grid at this resolution
        assert all(within(abs(a - b), fp32_bound(1000.0, 12))
                   for a, b in zip(fam.default_student_timesteps, fam.scheduler_timesteps(4)))
    finally:
        fam.use_resolution(SIZE, SIZE)
    assert fam.schedule.shift != pytest.approx(math.exp(compute_empirical_mu(16 * 16, 4)), rel=16 * U64)


@pytest.mark.parametrize("guidance", [4.0, 1.0, 2.5])
def test_klein_sampling_reproduces_the_pipeline_with_true_cfg(klein, guidance):
    """4.0: the pipeline's default (a CFG pair against ""), 1.0: no CFG, 2.5: another scale."""
    pipe, _, fam = klein
    want = run_pipeline("klein", pipe, guidance_scale=guidance)
    cond = fam.encode_prompts(PROMPTS, SIZE, SIZE)
    got = fam.sample_latents(fam.denoiser, cond, seed_noise(fam), fam.scheduler_timesteps(4), guidance_scale=guidance)
    assert_within_contract(got, want)


def test_step_distilled_klein_ignores_guidance_as_its_pipeline_does(klein):
    pipe, _, fam = klein
    pipe.register_to_config(is_distilled=True)
    fam.index["is_distilled"] = True
    try:
        want = run_pipeline("klein", pipe, guidance_scale=4.0)
        cond = fam.encode_prompts(PROMPTS, SIZE, SIZE)
        got = fam.sample_latents(fam.denoiser, cond, seed_noise(fam), fam.scheduler_timesteps(4), guidance_scale=4.0)
        plain = fam.sample_latents(fam.denoiser, cond, seed_noise(fam), fam.scheduler_timesteps(4))
    finally:
        pipe.register_to_config(is_distilled=False)
        fam.index["is_distilled"] = False
    assert_within_contract(got, want)
    assert torch.equal(got, plain)


@pytest.mark.parametrize("guidance", [4.0, 2.5])
def test_dev_sampling_reproduces_the_pipeline_with_the_guidance_embedding(dev, guidance):
    pipe, _, fam = dev
    want = run_pipeline("dev", pipe, guidance_scale=guidance)
    cond = fam.encode_prompts(PROMPTS, SIZE, SIZE)
    got = fam.sample_latents(fam.denoiser, cond, seed_noise(fam), fam.scheduler_timesteps(4), guidance_scale=guidance)
    assert_within_contract(got, want)
    if guidance == 4.0:  # no guidance asked: the fixed embedded value, the pipeline's default 4.0
        got1 = fam.sample_latents(fam.denoiser, cond, seed_noise(fam), fam.scheduler_timesteps(4))
        assert fam.embedded_guidance == 4.0 and torch.equal(got1, got)


def test_dev_guidance_is_an_input_not_a_cfg_pair(dev):
    _, _, fam = dev
    calls = []
    h = fam.denoiser.register_forward_pre_hook(lambda m, a, kw: calls.append((kw["hidden_states"].shape[0],
                                                                             float(kw["guidance"][0]))),
                                               with_kwargs=True)
    try:
        x, cond = torch.randn(2, 16, 8, 8), fam.encode_prompts(PROMPTS, SIZE, SIZE)
        fam.predict(fam.denoiser, x, torch.tensor([700.0, 300.0]), cond, guidance_scale=3.0)
        fam.predict(fam.denoiser, x, torch.tensor([700.0, 300.0]), cond)
    finally:
        h.remove()
    assert calls == [(2, 3.0), (2, fam.embedded_guidance)]


def test_vae_normalisation_matches_the_pipeline(both):
    """Encoding: the pipeline's _encode_vae_image (mode, patchify, batch-norm statistics), the same ops; decoding:
    the pipeline's own decode of its final latents is ours of the same latents, mapped to [0, 1] as its postprocess."""
    kind, (pipe, _, fam) = both
    pixels = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        want = pipe._encode_vae_image(pixels, generator=None)
    assert torch.equal(fam.encode_images(pixels), want)
    mean, std = _bn(fam.vae)
    assert float((mean.abs()).min()) > 0 and float((std - 1).abs().max()) > 0.1  # the statistics are not trivial
    final = {}

    def keep_latents(_pipe, _i, _t, kwargs):
        final["latents"] = kwargs["latents"]
        return {}
    image = pipe(prompt=PROMPTS, num_inference_steps=2, height=SIZE, width=SIZE, output_type="pt",
                 generator=torch.Generator().manual_seed(0), callback_on_step_end=keep_latents,
                 guidance_scale=1.0).images
    ours = (fam.decode_latents(unpack(final["latents"], SIZE // F, SIZE // F)) / 2 + 0.5).clamp(0, 1)
    # the same de-normalisation (2 roundings) and decoder (its round-off, tests/tolerances.py), [0, 1] mapping (2)
    vae = fam.vae
    k = network_factor(vae.decoder, vae.post_quant_conv or torch.nn.Identity()) + 4
    assert_close(ours, image, factor=k, mag=1.0)


def test_feature_taps_are_token_grids(klein):
    _, _, fam = klein
    x, cond = torch.randn(2, 16, 8, 8), fam.encode_prompts(PROMPTS, SIZE, SIZE)
    feats = fam.features(fam.denoiser, x, torch.tensor([500.0, 500.0]), cond)
    assert len(feats) == 3 and all(f.shape == (2, 16, 8, 8) for f in feats)


def test_resolution_must_patchify(klein):
    _, _, fam = klein
    with pytest.raises(FlashDMDError, match="not a multiple of the VAE factor 4"):
        fam.use_resolution(34, 34)


def test_info_says_family_resolution_and_latent_shape(klein, dev, capsys):
    """`flashdmd info`: the pipeline's 1024 px default (128 latent cells of the 8x VAE) is 256 px with the tiny
    2x VAE; its latents are the normalised 2x2 patches, 16 channels at 256 / 4 = 64 cells a side."""
    import json

    from flashdmd.cli import main
    for (_, path, _), name in ((klein, "flux2-klein"), (dev, "flux2")):
        capsys.readouterr()
        assert main(["info", "--model", str(path)]) == 0
        out = json.loads(capsys.readouterr().out)
        assert (out["family"], out["resolution"], out["latent_shape"]) == (name, 256, [16, 64, 64])
        assert out["denoiser"] == "Flux2Transformer2DModel"
