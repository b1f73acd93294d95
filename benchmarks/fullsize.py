"""Full-size random-weight diffusers pipeline folders, from published config values (no hub access).

What a real run of the library sees, minus the trained weights: SDXL-base-1.0's UNet (2.567 B parameters), its two
CLIP text encoders (ViT-L/14 and OpenCLIP bigG) and its VAE at their real sizes; SD3-medium's MMDiT (2.03 B),
CLIP-L / CLIP-G with projection, the 16-channel VAE and optionally T5-v1.1-XXL (4.76 B); SAM ViT-B's image encoder
(facebook/sam-vit-base's vision config) for the Pixel-GAN; and a few random 512 px "real" images with captions.
The numbers are those of the published config.json files (stabilityai/stable-diffusion-xl-base-1.0,
stabilityai/stable-diffusion-3-medium-diffusers, facebook/sam-vit-base), written out here.

The same for the language-model-conditioned pipelines: Qwen-Image (20.43 B MMDiT, Qwen2.5-VL-7B-Instruct 8.29 B
with its vision tower, the Wan VAE), FLUX.2-dev (32.22 B, Mistral-Small-3.1-24B 24.01 B with its Pixtral tower),
FLUX.2-klein-4B / -9B (3.88 B / 9.08 B, Qwen3-4B / Qwen3-8B) and Z-Image (6.15 B, Qwen3-4B, the FLUX.1 VAE), from
Qwen/Qwen-Image, black-forest-labs/FLUX.2-dev, -klein-4B, -klein-9B and Tongyi-MAI/Z-Image(-Turbo); each constant
names its file. Their tokenizers (fullsize_tokenizers.py) are real-format Qwen2 / Mistral byte-level BPEs of ~270
tokens with the chat templates the pipelines apply; FLUX.2-dev's ``tokenizer`` is a PixtralProcessor folder, which
transformers loads only where torchvision is installed.

Tokenizers are real-format but small (tests/tiny_models.py: a 518-token CLIP BPE vocabulary, a 160-piece T5
unigram); the text encoders keep their real vocabularies (49 408 / 32 128 rows), so every embedding table is full
size, and their bos / eos ids are the small tokenizer's. Weights are each class's own from-config initialisation
(finite; the SAM encoder with initializer_range 0.02, not transformers' default 1e-10).

Each part is built, saved (safetensors, 2 GB shards so that serialising never holds a second copy of a whole
network) and freed before the next, so building SDXL in float32 peaks near one UNet (~10 GB). ``device="cuda"``
(``--device cuda``) constructs each network on the GPU, so that its default initialisation runs there, and saves
it from there (safetensors copies each tensor to the host as it writes): with ``--dtype bfloat16`` SDXL's 3.5 B
parameters are built in seconds and written as 6.9 GB instead of 14 GB (benchmarks/gpu_check.py builds its
folders so); the default stays the CPU. ``weights=False``
writes the same folder with configs, tokenizers and model_index.json only (the networks are built on the meta
device, which also gives their parameter counts): what a planner that reads configs needs, in a few seconds.

    .venv/bin/python benchmarks/fullsize.py sdxl /tmp/fs/sdxl              # ~14 GB of float32 weights, minutes
    .venv/bin/python benchmarks/fullsize.py sdxl /tmp/fs/sdxl --device cuda --dtype bfloat16   # 6.9 GB, seconds
    .venv/bin/python benchmarks/fullsize.py sdxl /tmp/fs/sdxl-cfg --no-weights
    .venv/bin/python benchmarks/fullsize.py sd3 /tmp/fs/sd3 [--t5] [--dtype bfloat16]
    .venv/bin/python benchmarks/fullsize.py flux-dev /tmp/fs/flux-dev [--no-weights]   # 11.9 B + T5-XXL
    .venv/bin/python benchmarks/fullsize.py qwen-image /tmp/fs/qwen-image --no-weights
    .venv/bin/python benchmarks/fullsize.py flux2-dev /tmp/fs/flux2-dev --no-weights
    .venv/bin/python benchmarks/fullsize.py flux2-klein-4b /tmp/fs/klein-4b --no-weights [--base]   # also -9b
    .venv/bin/python benchmarks/fullsize.py z-image /tmp/fs/z-image --no-weights [--turbo]
    .venv/bin/python benchmarks/fullsize.py sam /tmp/fs/sam
    .venv/bin/python benchmarks/fullsize.py data /tmp/fs/data              # images/ (8 PNGs + captions), prompts.txt
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

import torch  # noqa: E402

SHARD = "2GB"

# stabilityai/stable-diffusion-xl-base-1.0/unet/config.json
SDXL_UNET = dict(
    act_fn="silu", addition_embed_type="text_time", addition_embed_type_num_heads=64, addition_time_embed_dim=256,
    attention_head_dim=[5, 10, 20], block_out_channels=[320, 640, 1280], center_input_sample=False,
    class_embed_type=None, class_embeddings_concat=False, conv_in_kernel=3, conv_out_kernel=3,
    cross_attention_dim=2048, cross_attention_norm=None,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"], downsample_padding=1,
    dual_cross_attention=False, encoder_hid_dim=None, encoder_hid_dim_type=None, flip_sin_to_cos=True, freq_shift=0,
    in_channels=4, layers_per_block=2, mid_block_only_cross_attention=None, mid_block_scale_factor=1,
    mid_block_type="UNetMidBlock2DCrossAttn", norm_eps=1e-05, norm_num_groups=32, num_attention_heads=None,
    num_class_embeds=None, only_cross_attention=False, out_channels=4, projection_class_embeddings_input_dim=2816,
    resnet_out_scale_factor=1.0, resnet_skip_time_act=False, resnet_time_scale_shift="default", sample_size=128,
    time_cond_proj_dim=None, time_embedding_act_fn=None, time_embedding_dim=None, time_embedding_type="positional",
    timestep_post_act=None, transformer_layers_per_block=[1, 2, 10],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], upcast_attention=None,
    use_linear_projection=True)

# the VAE of SDXL (scaling 0.13025) and of SD3 (16 latent channels, no quant convs, scaling 1.5305, shift 0.0609)
_VAE = dict(act_fn="silu", block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
            up_block_types=["UpDecoderBlock2D"] * 4, in_channels=3, out_channels=3, layers_per_block=2,
            norm_num_groups=32, sample_size=1024)
SDXL_VAE = dict(_VAE, latent_channels=4, scaling_factor=0.13025, force_upcast=True)
SD3_VAE = dict(_VAE, latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False,
               use_post_quant_conv=False, force_upcast=True)

# stabilityai/stable-diffusion-xl-base-1.0/scheduler/scheduler_config.json
SDXL_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                      prediction_type="epsilon", steps_offset=1, timestep_spacing="leading",
                      interpolation_type="linear", use_karras_sigmas=False)

# CLIP ViT-L/14 text tower (SDXL text_encoder, SD3 text_encoder) and OpenCLIP bigG (text_encoder_2 of both)
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=77, vocab_size=49408, hidden_act="quick_gelu", projection_dim=768,
              layer_norm_eps=1e-05)
CLIP_G = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
              max_position_embeddings=77, vocab_size=49408, hidden_act="gelu", projection_dim=1280,
              layer_norm_eps=1e-05)

# stabilityai/stable-diffusion-3-medium-diffusers/transformer/config.json
SD3_TRANSFORMER = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                       num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                       pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192)

# google/t5-v1_1-xxl encoder (SD3's text_encoder_3)
T5_XXL = dict(d_model=4096, d_ff=10240, d_kv=64, num_layers=24, num_heads=64, vocab_size=32128,
              feed_forward_proj="gated-gelu", relative_attention_num_buckets=32, relative_attention_max_distance=128,
              layer_norm_epsilon=1e-06, dropout_rate=0.1, tie_word_embeddings=False, pad_token_id=0,
              eos_token_id=1, decoder_start_token_id=0)

# black-forest-labs/FLUX.1-dev: transformer/config.json (11.9 B), vae/config.json (16 channels, scaling 0.3611, shift
# 0.1159), scheduler/scheduler_config.json (dynamic shifting); text_encoder = CLIP ViT-L/14's text tower (pooled),
# text_encoder_2 = T5-v1.1-XXL
FLUX_DEV_TRANSFORMER = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                            num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                            guidance_embeds=True, axes_dims_rope=[16, 56, 56])
FLUX_VAE = dict(_VAE, latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
                use_post_quant_conv=False, force_upcast=True)
FLUX_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                      base_image_seq_len=256, max_image_seq_len=4096)

# facebook/sam-vit-base vision_config
SAM_VIT_B = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, image_size=1024, patch_size=16,
                 output_channels=256, window_size=14, global_attn_indexes=[2, 5, 8, 11], mlp_dim=3072,
                 num_channels=3, hidden_act="gelu", layer_norm_eps=1e-06, qkv_bias=True, use_abs_pos=True,
                 use_rel_pos=True, num_pos_feats=128, mlp_ratio=4.0, initializer_range=0.02)


# Qwen/Qwen-Image: transformer/config.json (20.43 B; the same values as QwenImageTransformer2DModel's defaults). Left
# out: its pooled_projection_dim (768), which this class no longer takes and which sizes nothing
QWEN_IMAGE_TRANSFORMER = dict(patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128,
                              num_attention_heads=24, joint_attention_dim=3584, guidance_embeds=False,
                              axes_dims_rope=[16, 56, 56])
# Qwen/Qwen-Image: vae/config.json (AutoencoderKLQwenImage, the Wan-2.1 VAE: its defaults are these values)
QWEN_IMAGE_VAE = dict(base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                      temperal_downsample=[False, True, True], dropout=0.0,
                      latents_mean=[-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508, 0.4134,
                                    -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921],
                      latents_std=[2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743, 3.2687, 2.1526,
                                   2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.916])
# Qwen/Qwen-Image: scheduler/scheduler_config.json (resolution-dependent exponential shift, terminal sigma 0.02)
QWEN_IMAGE_SCHEDULER = dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True, base_shift=0.5,
                            max_shift=0.9, base_image_seq_len=256, max_image_seq_len=8192, shift_terminal=0.02,
                            time_shift_type="exponential", invert_sigmas=False, stochastic_sampling=False,
                            use_karras_sigmas=False, use_exponential_sigmas=False, use_beta_sigmas=False)
# Qwen/Qwen-Image: text_encoder/config.json = Qwen/Qwen2.5-VL-7B-Instruct/config.json (language model + its
# 32-layer vision tower; Qwen2_5_VLForConditionalGeneration)
QWEN25_VL_7B = dict(
    text_config=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                     num_key_value_heads=4, hidden_act="silu", max_position_embeddings=128000, max_window_layers=28,
                     rms_norm_eps=1e-06, rope_theta=1000000.0,
                     rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]}, use_sliding_window=False,
                     sliding_window=32768, vocab_size=152064, attention_dropout=0.0, initializer_range=0.02,
                     bos_token_id=151643, eos_token_id=151645),
    vision_config=dict(depth=32, hidden_act="silu", hidden_size=1280, intermediate_size=3420, num_heads=16,
                       in_channels=3, out_hidden_size=3584, patch_size=14, spatial_merge_size=2,
                       temporal_patch_size=2, tokens_per_second=2, window_size=112,
                       fullatt_block_indexes=[7, 15, 23, 31], initializer_range=0.02),
    image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653,
    tie_word_embeddings=False)

# black-forest-labs/FLUX.2-dev: transformer/config.json (32 B: 8 double- and 48 single-stream blocks, guidance
# embedding; the same values as Flux2Transformer2DModel's defaults and BFL's Flux2Params)
FLUX2_DEV_TRANSFORMER = dict(patch_size=1, in_channels=128, out_channels=None, num_layers=8, num_single_layers=48,
                             attention_head_dim=128, num_attention_heads=48, joint_attention_dim=15360,
                             timestep_guidance_channels=256, mlp_ratio=3.0, axes_dims_rope=[32, 32, 32, 32],
                             rope_theta=2000, eps=1e-06, guidance_embeds=True)
# black-forest-labs/FLUX.2-klein-4B: transformer/config.json (5 + 20 blocks, no guidance embedding)
FLUX2_KLEIN_4B_TRANSFORMER = dict(FLUX2_DEV_TRANSFORMER, num_layers=5, num_single_layers=20, num_attention_heads=24,
                                  joint_attention_dim=7680, guidance_embeds=False)
# black-forest-labs/FLUX.2-klein-9B: transformer/config.json (8 + 24 blocks, no guidance embedding)
FLUX2_KLEIN_9B_TRANSFORMER = dict(FLUX2_DEV_TRANSFORMER, num_layers=8, num_single_layers=24, num_attention_heads=32,
                                  joint_attention_dim=12288, guidance_embeds=False)
# vae/config.json of FLUX.2-dev and of both FLUX.2-klein (AutoencoderKLFlux2: 32 latent channels, 2x2 patches,
# batch-norm latent statistics; the class defaults, plus force_upcast, which this class no longer takes: built with
# from_config, which sets it aside)
FLUX2_VAE = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
                 up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[128, 256, 512, 512], layers_per_block=2,
                 act_fn="silu", latent_channels=32, norm_num_groups=32, sample_size=1024, force_upcast=True,
                 use_quant_conv=True, use_post_quant_conv=True, mid_block_add_attention=True, batch_norm_eps=0.0001,
                 batch_norm_momentum=0.1, patch_size=[2, 2])
# black-forest-labs/FLUX.2-klein-4B: scheduler/scheduler_config.json (the pipelines pass their own empirical mu).
# not found: FLUX.2-dev's own file; these values, which diffusers' FLUX.2 conversion script also writes (it copies
# FLUX.1-dev's), are used for it and for klein-9B
FLUX2_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                       base_image_seq_len=256, max_image_seq_len=4096, shift_terminal=None,
                       time_shift_type="exponential", invert_sigmas=False, stochastic_sampling=False,
                       use_karras_sigmas=False, use_exponential_sigmas=False, use_beta_sigmas=False)
# black-forest-labs/FLUX.2-dev: text_encoder/config.json = mistralai/Mistral-Small-3.1-24B-Instruct-2503's
# (Mistral3ForConditionalGeneration: the 40-layer Mistral language model + the Pixtral vision tower)
MISTRAL_SMALL_31_24B = dict(
    text_config=dict(model_type="mistral", hidden_size=5120, intermediate_size=32768, num_hidden_layers=40,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=128, hidden_act="silu",
                     max_position_embeddings=131072, rms_norm_eps=1e-05, rope_theta=1000000000.0,
                     sliding_window=None, vocab_size=131072, attention_dropout=0.0, initializer_range=0.02),
    vision_config=dict(model_type="pixtral", hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                       num_attention_heads=16, head_dim=64, hidden_act="silu", image_size=1540, patch_size=14,
                       num_channels=3, rope_theta=10000.0, attention_dropout=0.0, initializer_range=0.02),
    image_token_index=10, multimodal_projector_bias=False, projector_hidden_act="gelu", spatial_merge_size=2,
    vision_feature_layer=-1, tie_word_embeddings=False)
# not found: tie_word_embeddings in the published file (False here, MistralConfig's default: Mistral-Small-3.1 has
# its own lm_head, which the published 24.0 B counts)

# Qwen/Qwen3-4B/config.json, as FLUX.2-klein-4B's and Tongyi-MAI/Z-Image's text_encoder/config.json carry it
QWEN3_4B = dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
                num_key_value_heads=8, head_dim=128, hidden_act="silu", max_position_embeddings=40960,
                max_window_layers=36, rms_norm_eps=1e-06, rope_theta=1000000, attention_bias=False,
                attention_dropout=0.0, sliding_window=None, use_sliding_window=False, tie_word_embeddings=True,
                vocab_size=151936, bos_token_id=151643, eos_token_id=151645, initializer_range=0.02)
# Qwen/Qwen3-8B/config.json, as FLUX.2-klein-9B's text_encoder/config.json carries it. not found: klein-9B's own
# text_encoder/config.json and model_index.json; BFL and diffusers name Qwen3-8B, whose file is this, and the index
# is taken to be klein-4B's
QWEN3_8B = dict(QWEN3_4B, hidden_size=4096, intermediate_size=12288, tie_word_embeddings=False)

# Tongyi-MAI/Z-Image (and -Turbo): transformer/config.json (6.15 B single-stream DiT). ZImageTransformer2DModel's
# defaults differ from it only in axes_lens ([1024, 512, 512]), which sizes a RoPE table, not a parameter
Z_IMAGE_TRANSFORMER = dict(all_patch_size=[2], all_f_patch_size=[1], in_channels=16, dim=3840, n_layers=30,
                           n_refiner_layers=2, n_heads=30, n_kv_heads=30, norm_eps=1e-05, qk_norm=True,
                           cap_feat_dim=2560, rope_theta=256.0, t_scale=1000.0, axes_dims=[32, 48, 48],
                           axes_lens=[1536, 512, 512])
# Tongyi-MAI/Z-Image: vae/config.json (the FLUX.1 VAE: 16 channels, scaling 0.3611, shift 0.1159)
Z_IMAGE_VAE = FLUX_VAE
# Tongyi-MAI/Z-Image: scheduler/scheduler_config.json (a static shift of 6; Z-Image-Turbo's is 3)
Z_IMAGE_SCHEDULER = dict(num_train_timesteps=1000, use_dynamic_shifting=False, shift=6.0)
Z_IMAGE_TURBO_SCHEDULER = dict(Z_IMAGE_SCHEDULER, shift=3.0)

def n_params(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


@contextlib.contextmanager
def _building(weights: bool, dtype: torch.dtype, seed: int, device: str = "cpu"):
    """Construct on the meta device (configs only) or directly in ``dtype`` on ``device`` (no float32 detour for
    16-bit dtypes; on ``cuda`` every parameter's default initialisation runs on the GPU)."""
    old = torch.get_default_dtype()
    torch.manual_seed(seed)  # seeds the CUDA generators too: a seed gives other weights there than on the CPU
    try:
        torch.set_default_dtype(dtype)
        with torch.device("meta" if not weights else device):
            yield
    finally:
        torch.set_default_dtype(old)


def _free(device: str) -> None:
    if device != "cpu" and torch.cuda.is_available():
        torch.cuda.empty_cache()


def _save_net(make, folder: Path, name: str, weights: bool, dtype: torch.dtype, seed: int, counts: dict,
              device: str = "cpu") -> tuple:
    """Build one network with ``make()`` (on ``device``), save it into ``folder/name`` (weights or config only),
    free it. Returns model_index.json's [library, class] entry."""
    with _building(weights, dtype, seed, device):
        net = make()
    counts[name] = n_params(net)
    out = folder / name
    if weights:
        net.save_pretrained(out, max_shard_size=SHARD)
    elif hasattr(net, "save_config"):  # diffusers
        net.save_config(out)
    else:  # transformers: config.json only
        net.config.architectures = [type(net).__name__]
        net.config.save_pretrained(out)
    lib = "diffusers" if type(net).__module__.startswith("diffusers") else "transformers"
    entry = [lib, type(net).__name__]
    print(f"  {name}: {type(net).__name__} {counts[name] / 1e6:,.1f} M parameters"
          + (f" -> {out} ({dtype}, built on {device})" if weights else " (config only)"), flush=True)
    del net
    _free(device)
    return entry


def _save_other(obj, folder: Path, name: str) -> list:
    obj.save_pretrained(folder / name)
    lib = "diffusers" if type(obj).__module__.startswith("diffusers") else "transformers"
    return [lib, type(obj).__name__]


def _clip_tokenizer(folder: Path):
    import tiny_models as tm
    return tm.clip_tokenizer(folder)


def _text_config(spec: dict, tok):
    from transformers import CLIPTextConfig
    return CLIPTextConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                          pad_token_id=tok.pad_token_id, **spec)


def _finish(folder: Path, part: Path, index: dict, counts: dict) -> Path:
    import diffusers
    index = {"_diffusers_version": diffusers.__version__, **index}
    (part / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    (part / "parameter_counts.json").write_text(json.dumps(counts, indent=2) + "\n")
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(part, folder)
    print(f"  total {sum(counts.values()) / 1e9:.3f} B parameters -> {folder}", flush=True)
    return folder


def _start(folder: Path) -> Path:
    folder = Path(folder)
    part = folder.parent / (folder.name + ".partial")
    if part.exists():
        shutil.rmtree(part)
    part.mkdir(parents=True)
    return part


def write_sdxl(folder: str | Path, weights: bool = True, dtype: torch.dtype = torch.float32, seed: int = 0,
               device: str = "cpu") -> Path:
    """A StableDiffusionXLPipeline folder with SDXL-base-1.0's architecture and random weights (see the module
    docstring), built on ``device``. Returns the folder; ``folder/parameter_counts.json`` holds each part's
    parameter count."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    folder = Path(folder)
    part = _start(folder)
    print(f"SDXL-base-1.0 architecture, random weights ({'weights' if weights else 'configs only'})", flush=True)
    tok = _clip_tokenizer(part / "_vocab")
    counts: dict[str, int] = {}
    index = {"_class_name": "StableDiffusionXLPipeline", "feature_extractor": [None, None],
             "image_encoder": [None, None], "force_zeros_for_empty_prompt": True}
    index["unet"] = _save_net(lambda: UNet2DConditionModel(**SDXL_UNET), part, "unet", weights, dtype, seed, counts,
                              device)
    index["text_encoder"] = _save_net(lambda: CLIPTextModel(_text_config(CLIP_L, tok)), part, "text_encoder",
                                      weights, dtype, seed + 1, counts, device)
    index["text_encoder_2"] = _save_net(lambda: CLIPTextModelWithProjection(_text_config(CLIP_G, tok)), part,
                                        "text_encoder_2", weights, dtype, seed + 2, counts, device)
    index["vae"] = _save_net(lambda: AutoencoderKL(**SDXL_VAE), part, "vae", weights, dtype, seed + 3, counts, device)
    index["tokenizer"] = _save_other(tok, part, "tokenizer")
    index["tokenizer_2"] = _save_other(tok, part, "tokenizer_2")
    index["scheduler"] = _save_other(EulerDiscreteScheduler(**SDXL_SCHEDULER), part, "scheduler")
    shutil.rmtree(part / "_vocab")
    return _finish(folder, part, index, counts)


def write_sd3_medium(folder: str | Path, weights: bool = True, dtype: torch.dtype = torch.float32, t5: bool = False,
                     seed: int = 0, device: str = "cpu") -> Path:
    """A StableDiffusion3Pipeline folder with SD3-medium's architecture and random weights; T5-v1.1-XXL
    (text_encoder_3 + tokenizer_3) only with ``t5`` (the library runs SD3 without it: zeros in its place)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection, T5Config, T5EncoderModel

    import tiny_models as tm

    folder = Path(folder)
    part = _start(folder)
    print(f"SD3-medium architecture, random weights ({'weights' if weights else 'configs only'}, "
          f"{'with' if t5 else 'without'} T5)", flush=True)
    tok = _clip_tokenizer(part / "_vocab")
    counts: dict[str, int] = {}
    index = {"_class_name": "StableDiffusion3Pipeline", "feature_extractor": [None, None],
             "image_encoder": [None, None]}
    index["transformer"] = _save_net(lambda: SD3Transformer2DModel(**SD3_TRANSFORMER), part, "transformer", weights,
                                     dtype, seed, counts, device)
    index["text_encoder"] = _save_net(lambda: CLIPTextModelWithProjection(_text_config(CLIP_L, tok)), part,
                                      "text_encoder", weights, dtype, seed + 1, counts, device)
    index["text_encoder_2"] = _save_net(lambda: CLIPTextModelWithProjection(_text_config(CLIP_G, tok)), part,
                                        "text_encoder_2", weights, dtype, seed + 2, counts, device)
    if t5:
        index["text_encoder_3"] = _save_net(lambda: T5EncoderModel(T5Config(**T5_XXL)), part, "text_encoder_3",
                                            weights, dtype, seed + 4, counts, device)
        index["tokenizer_3"] = _save_other(tm.t5_tokenizer(), part, "tokenizer_3")
    else:
        index["text_encoder_3"] = [None, None]
        index["tokenizer_3"] = [None, None]
    index["vae"] = _save_net(lambda: AutoencoderKL(**SD3_VAE), part, "vae", weights, dtype, seed + 3, counts, device)
    index["tokenizer"] = _save_other(tok, part, "tokenizer")
    index["tokenizer_2"] = _save_other(tok, part, "tokenizer_2")
    index["scheduler"] = _save_other(FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0), part,
                                     "scheduler")
    shutil.rmtree(part / "_vocab")
    return _finish(folder, part, index, counts)


def write_flux_dev(folder: str | Path, weights: bool = True, dtype: torch.dtype = torch.float32, seed: int = 0,
                   device: str = "cpu") -> Path:
    """A FluxPipeline folder with FLUX.1-dev's architecture (guidance-embedded transformer, CLIP-L, T5-v1.1-XXL,
    16-channel VAE, dynamically shifted flow-matching scheduler) and random weights."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5Config, T5EncoderModel

    import tiny_models as tm

    folder = Path(folder)
    part = _start(folder)
    print(f"FLUX.1-dev architecture, random weights ({'weights' if weights else 'configs only'})", flush=True)
    tok = _clip_tokenizer(part / "_vocab")
    counts: dict[str, int] = {}
    index = {"_class_name": "FluxPipeline", "feature_extractor": [None, None], "image_encoder": [None, None]}
    index["transformer"] = _save_net(lambda: FluxTransformer2DModel(**FLUX_DEV_TRANSFORMER), part, "transformer",
                                     weights, dtype, seed, counts, device)
    index["text_encoder"] = _save_net(lambda: CLIPTextModel(_text_config(CLIP_L, tok)), part, "text_encoder", weights,
                                      dtype, seed + 1, counts, device)
    index["text_encoder_2"] = _save_net(lambda: T5EncoderModel(T5Config(**T5_XXL)), part, "text_encoder_2", weights,
                                        dtype, seed + 2, counts, device)
    index["vae"] = _save_net(lambda: AutoencoderKL(**FLUX_VAE), part, "vae", weights, dtype, seed + 3, counts, device)
    index["tokenizer"] = _save_other(tok, part, "tokenizer")
    index["tokenizer_2"] = _save_other(tm.t5_tokenizer(), part, "tokenizer_2")
    index["scheduler"] = _save_other(FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER), part, "scheduler")
    shutil.rmtree(part / "_vocab")
    return _finish(folder, part, index, counts)


def _qwen_tokenizer(part: Path, name: str, cls_name: str = "Qwen2Tokenizer") -> list:
    import fullsize_tokenizers as ft
    ft.qwen2_tokenizer().save_pretrained(part / name)
    return ["transformers", cls_name]


def write_qwen_image(folder: str | Path, weights: bool = True, dtype: torch.dtype = torch.float32, seed: int = 0,
                     device: str = "cpu") -> Path:
    """A QwenImagePipeline folder with Qwen-Image's architecture (20.4 B MMDiT, Qwen2.5-VL-7B-Instruct text encoder
    with its vision tower, the 16-channel Wan VAE, exponentially shifted flow-matching scheduler), random weights."""
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    folder = Path(folder)
    part = _start(folder)
    print(f"Qwen-Image architecture, random weights ({'weights' if weights else 'configs only'})", flush=True)
    counts: dict[str, int] = {}
    index = {"_class_name": "QwenImagePipeline"}
    index["transformer"] = _save_net(lambda: QwenImageTransformer2DModel(**QWEN_IMAGE_TRANSFORMER), part,
                                     "transformer", weights, dtype, seed, counts, device)
    index["text_encoder"] = _save_net(lambda: Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**QWEN25_VL_7B)),
                                      part, "text_encoder", weights, dtype, seed + 1, counts, device)
    index["vae"] = _save_net(lambda: AutoencoderKLQwenImage(**QWEN_IMAGE_VAE), part, "vae", weights, dtype, seed + 3,
                             counts, device)
    index["tokenizer"] = _qwen_tokenizer(part, "tokenizer")
    index["scheduler"] = _save_other(FlowMatchEulerDiscreteScheduler(**QWEN_IMAGE_SCHEDULER), part, "scheduler")
    return _finish(folder, part, index, counts)


def write_flux2_dev(folder: str | Path, weights: bool = True, dtype: torch.dtype = torch.float32, seed: int = 0,
                    device: str = "cpu") -> Path:
    """A Flux2Pipeline folder with FLUX.2-dev's architecture (32 B guidance-embedded transformer, Mistral-Small-3.1
    24 B with its Pixtral vision tower, 32-channel VAE), random weights; ``tokenizer`` is a PixtralProcessor, as the
    release has it."""
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Transformer2DModel
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    import fullsize_tokenizers as ft

    folder = Path(folder)
    part = _start(folder)
    print(f"FLUX.2-dev architecture, random weights ({'weights' if weights else 'configs only'})", flush=True)
    counts: dict[str, int] = {}
    index = {"_class_name": "Flux2Pipeline"}
    index["transformer"] = _save_net(lambda: Flux2Transformer2DModel(**FLUX2_DEV_TRANSFORMER), part, "transformer",
                                     weights, dtype, seed, counts, device)
    index["text_encoder"] = _save_net(lambda: Mistral3ForConditionalGeneration(Mistral3Config(**MISTRAL_SMALL_31_24B)),
                                      part, "text_encoder", weights, dtype, seed + 1, counts, device)
    index["vae"] = _save_net(lambda: AutoencoderKLFlux2.from_config(FLUX2_VAE), part, "vae", weights, dtype, seed + 3, counts,
                             device)
    index["tokenizer"] = ft.write_pixtral_processor(part / "tokenizer")
    index["scheduler"] = _save_other(FlowMatchEulerDiscreteScheduler(**FLUX2_SCHEDULER), part, "scheduler")
    return _finish(folder, part, index, counts)


def write_flux2_klein(folder: str | Path, size: str = "4b", weights: bool = True, dtype: torch.dtype = torch.float32,
                      base: bool = False, seed: int = 0, device: str = "cpu") -> Path:
    """A Flux2KleinPipeline folder with FLUX.2-klein-4B's (``size`` "4b": Qwen3-4B) or -9B's ("9b": Qwen3-8B)
    architecture, random weights; model_index.json says ``is_distilled`` true as the step-distilled releases do,
    false with ``base`` (FLUX.2-klein-base-4B / -9B: the same architecture, undistilled)."""
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Transformer2DModel
    from transformers import Qwen3Config, Qwen3ForCausalLM

    spec, lm = {"4b": (FLUX2_KLEIN_4B_TRANSFORMER, QWEN3_4B), "9b": (FLUX2_KLEIN_9B_TRANSFORMER, QWEN3_8B)}[size]
    folder = Path(folder)
    part = _start(folder)
    print(f"FLUX.2-klein-{'base-' if base else ''}{size.upper()} architecture, random weights "
          f"({'weights' if weights else 'configs only'})", flush=True)
    counts: dict[str, int] = {}
    index = {"_class_name": "Flux2KleinPipeline", "is_distilled": not base}
    index["transformer"] = _save_net(lambda: Flux2Transformer2DModel(**spec), part, "transformer", weights, dtype,
                                     seed, counts, device)
    index["text_encoder"] = _save_net(lambda: Qwen3ForCausalLM(Qwen3Config(**lm)), part, "text_encoder", weights,
                                      dtype, seed + 1, counts, device)
    index["vae"] = _save_net(lambda: AutoencoderKLFlux2.from_config(FLUX2_VAE), part, "vae", weights, dtype, seed + 3, counts,
                             device)
    index["tokenizer"] = _qwen_tokenizer(part, "tokenizer", "Qwen2TokenizerFast")
    index["scheduler"] = _save_other(FlowMatchEulerDiscreteScheduler(**FLUX2_SCHEDULER), part, "scheduler")
    return _finish(folder, part, index, counts)


def write_z_image(folder: str | Path, weights: bool = True, dtype: torch.dtype = torch.float32, turbo: bool = False,
                  seed: int = 0, device: str = "cpu") -> Path:
    """A ZImagePipeline folder with Z-Image's architecture (6.15 B single-stream DiT, Qwen3-4B loaded as Qwen3Model,
    the FLUX.1 VAE), random weights; the scheduler is Z-Image's (shift 6), Z-Image-Turbo's (shift 3) with ``turbo``
    (the two releases share every network config)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    folder = Path(folder)
    part = _start(folder)
    print(f"Z-Image{'-Turbo' if turbo else ''} architecture, random weights "
          f"({'weights' if weights else 'configs only'})", flush=True)
    counts: dict[str, int] = {}
    index = {"_class_name": "ZImagePipeline"}
    index["transformer"] = _save_net(lambda: ZImageTransformer2DModel(**Z_IMAGE_TRANSFORMER), part, "transformer",
                                     weights, dtype, seed, counts, device)
    index["text_encoder"] = _save_net(lambda: Qwen3Model(Qwen3Config(**QWEN3_4B)), part, "text_encoder", weights,
                                      dtype, seed + 1, counts, device)
    index["vae"] = _save_net(lambda: AutoencoderKL(**Z_IMAGE_VAE), part, "vae", weights, dtype, seed + 3, counts,
                             device)
    index["tokenizer"] = _qwen_tokenizer(part, "tokenizer")
    index["scheduler"] = _save_other(FlowMatchEulerDiscreteScheduler(**(Z_IMAGE_TURBO_SCHEDULER if turbo else
                                                                        Z_IMAGE_SCHEDULER)), part, "scheduler")
    return _finish(folder, part, index, counts)


def write_sam_vit_base(folder: str | Path, seed: int = 0, dtype: torch.dtype = torch.float32,
                       device: str = "cpu") -> Path:
    """A transformers SamVisionModel folder with facebook/sam-vit-base's vision config, random weights (init
    range 0.02), safetensors: what ``disc_backbone: sam`` + ``disc_backbone_path`` load."""
    from transformers import SamVisionConfig, SamVisionModel

    folder = Path(folder)
    part = _start(folder)
    with _building(True, dtype, seed, device):
        model = SamVisionModel(SamVisionConfig(**SAM_VIT_B))
    n = n_params(model)
    model.save_pretrained(part, max_shard_size=SHARD)
    del model
    _free(device)
    (part / "parameter_counts.json").write_text(json.dumps({"sam_vision": n}, indent=2) + "\n")
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(part, folder)
    print(f"SAM ViT-B image encoder (SamVisionModel): {n / 1e6:,.1f} M parameters -> {folder}", flush=True)
    return folder


CAPTIONS = ["a photo of a cat on a red sofa", "a watercolor painting of a lighthouse at dusk",
            "a bowl of ramen with a soft boiled egg", "an astronaut riding a horse on the moon",
            "a snowy mountain village at night", "a close-up of a sunflower in the rain",
            "a vintage car parked in front of a diner", "a fox sleeping in an autumn forest"]


def write_data(folder: str | Path, n: int = 8, size: int = 512, seed: int = 0) -> tuple[Path, Path]:
    """``folder/images``: ``n`` random ``size`` x ``size`` PNGs (smooth noise plus grain) with a metadata.jsonl of
    captions; ``folder/prompts.txt``: the captions, one per line. Returns (images folder, prompts file)."""
    import numpy as np
    from PIL import Image

    folder = Path(folder)
    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        rng = np.random.default_rng(seed + i)
        coarse = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((size, size), Image.BICUBIC)
        grain = rng.integers(-12, 13, (size, size, 3), dtype=np.int16)
        arr = np.clip(np.asarray(coarse, dtype=np.int16) + grain, 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(images / f"{i:03d}.png")
        rows.append({"file_name": f"{i:03d}.png", "text": CAPTIONS[i % len(CAPTIONS)]})
    (images / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    prompts = folder / "prompts.txt"
    prompts.write_text("".join(c + "\n" for c in CAPTIONS))
    print(f"{n} random {size} px PNGs with captions -> {images}; prompts -> {prompts}", flush=True)
    return images, prompts


WRITERS = {"sdxl": write_sdxl, "sd3": write_sd3_medium, "flux-dev": write_flux_dev, "qwen-image": write_qwen_image,
           "flux2-dev": write_flux2_dev, "flux2-klein-4b": lambda *a, **k: write_flux2_klein(*a, size="4b", **k),
           "flux2-klein-9b": lambda *a, **k: write_flux2_klein(*a, size="9b", **k), "z-image": write_z_image}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=list(WRITERS) + ["sam", "data"])
    p.add_argument("folder")
    p.add_argument("--no-weights", action="store_true", help="configs, tokenizers and model_index.json only")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--t5", action="store_true", help="sd3: include T5-v1.1-XXL (4.76 B parameters)")
    p.add_argument("--base", action="store_true", help="flux2-klein: the undistilled release (is_distilled false)")
    p.add_argument("--turbo", action="store_true", help="z-image: Z-Image-Turbo's scheduler (shift 3)")
    p.add_argument("--threads", type=int, default=None, help="torch threads while initialising (default: torch's)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="where the networks are built and initialised (cuda: seconds instead of minutes)")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    dtype = getattr(torch, a.dtype)
    extra = {"sd3": {"t5": a.t5}, "flux2-klein-4b": {"base": a.base}, "flux2-klein-9b": {"base": a.base},
             "z-image": {"turbo": a.turbo}}.get(a.what, {})
    if a.what in WRITERS:
        WRITERS[a.what](a.folder, weights=not a.no_weights, dtype=dtype, device=a.device, **extra)
    elif a.what == "sam":
        write_sam_vit_base(a.folder, dtype=dtype, device=a.device)
    else:
        write_data(a.folder)


if __name__ == "__main__":
    main()
