"""Full-size random-weight diffusers pipeline folders, from published config values (no hub access).

What a real run of the library sees, minus the trained weights: SDXL-base-1.0's UNet (2.567 B parameters), its two
CLIP text encoders (ViT-L/14 and OpenCLIP bigG) and its VAE at their real sizes; SD3-medium's MMDiT (2.03 B),
CLIP-L / CLIP-G with projection, the 16-channel VAE and optionally T5-v1.1-XXL (4.76 B); SAM ViT-B's image encoder
(facebook/sam-vit-base's vision config) for the Pixel-GAN; and a few random 512 px "real" images with captions.
The numbers are those of the published config.json files (stabilityai/stable-diffusion-xl-base-1.0,
stabilityai/stable-diffusion-3-medium-diffusers, facebook/sam-vit-base), written out here.

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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["sdxl", "sd3", "flux-dev", "sam", "data"])
    p.add_argument("folder")
    p.add_argument("--no-weights", action="store_true", help="configs, tokenizers and model_index.json only")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--t5", action="store_true", help="sd3: include T5-v1.1-XXL (4.76 B parameters)")
    p.add_argument("--threads", type=int, default=None, help="torch threads while initialising (default: torch's)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="where the networks are built and initialised (cuda: seconds instead of minutes)")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    dtype = getattr(torch, a.dtype)
    if a.what == "sdxl":
        write_sdxl(a.folder, weights=not a.no_weights, dtype=dtype, device=a.device)
    elif a.what == "sd3":
        write_sd3_medium(a.folder, weights=not a.no_weights, dtype=dtype, t5=a.t5, device=a.device)
    elif a.what == "flux-dev":
        write_flux_dev(a.folder, weights=not a.no_weights, dtype=dtype, device=a.device)
    elif a.what == "sam":
        write_sam_vit_base(a.folder, dtype=dtype, device=a.device)
    else:
        write_data(a.folder)


if __name__ == "__main__":
    main()
