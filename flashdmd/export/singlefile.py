"""``--single-file``: a student (a LoRA fused) as one safetensors file in its family's original layout, the file
A1111 / Forge / ComfyUI load and diffusers' ``from_single_file`` reads:

* SDXL: the whole pipeline (SGM / LDM checkpoint: ``model.diffusion_model.`` UNet, ``first_stage_model.`` VAE,
  ``conditioner.embedders.0.transformer.`` CLIP-L with transformers' names, ``conditioner.embedders.1.model.``
  OpenCLIP ViT-bigG);
* SD3 / SD3.5: the whole pipeline as SAI ships it (``model.diffusion_model.`` MMDiT joint blocks, the VAE,
  ``text_encoders.{clip_l,clip_g,t5xxl}.transformer.``; the layout has no CLIP-L projection -- loaders put the
  identity there -- so a teacher whose projection is not the identity is refused);
* Z-Image, Qwen-Image, FLUX.1, FLUX.2: the transformer alone, as ComfyUI's diffusion-model files (Qwen-Image's
  have diffusers' names; FLUX.1's are BFL's ``flux1-dev.safetensors`` names).

FLUX.1 is written at the family's width only: diffusers' ``convert_flux_transformer_checkpoint_to_diffusers`` fixes
the width at 3072 (every released FLUX.1 -- dev, schnell, Krea, Kontext -- is that wide), so a narrower student is
refused (export it as a diffusers folder); the round trip at 3072 is tested on tensors one column wide.

diffusers ships only the other direction (``diffusers.loaders.single_file_utils``: ``convert_ldm_unet_checkpoint``,
``convert_ldm_vae_checkpoint``, ``convert_ldm_clip_checkpoint``, ``convert_open_clip_checkpoint``,
``convert_sd3_transformer_checkpoint_to_diffusers``, the Z-Image / FLUX.2 converters, driven by the key tables in
``DIFFUSERS_TO_LDM_MAPPING`` and their own). This module inverts them: the direct key tables as they stand; the
block renames (``input_blocks.{i}.0`` <-> ``down_blocks.{b}.resnets.{l}``, the resnet / VAE / OpenCLIP sub-names,
joint / double / single blocks) by the inverse of the index arithmetic and string replacements those functions
apply; q / k / v concatenated back into the fused projection; (shift, scale) modulations swapped back; OpenCLIP's
``text_projection`` transposed back; the VAE attention's linear weights given back their 1x1-conv shape. Every file
is then checked by running diffusers' own converters on it: every tensor must come back under its diffusers name,
bit for bit, or the export is refused before anything is written.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from diffusers.loaders.single_file_utils import (CHECKPOINT_KEY_NAMES, DIFFUSERS_TO_LDM_MAPPING,
                                                 LDM_CLIP_PREFIX_TO_REMOVE, LDM_UNET_KEY, LDM_VAE_KEYS,
                                                 convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,
                                                 convert_flux2_transformer_checkpoint_to_diffusers,
                                                 convert_flux_transformer_checkpoint_to_diffusers,
                                                 convert_ldm_vae_checkpoint, convert_open_clip_checkpoint,
                                                 convert_sd3_t5_checkpoint_to_diffusers,
                                                 convert_sd3_transformer_checkpoint_to_diffusers,
                                                 convert_z_image_transformer_checkpoint_to_diffusers, swap_scale_shift)
from safetensors.torch import load_file
from transformers import CLIPTextConfig, CLIPTextModelWithProjection

from flashdmd import FlashDMDError, io

# the prefixes diffusers' single-file loader looks for: model.diffusion_model., first_stage_model.,
# conditioner.embedders.0.transformer., conditioner.embedders.1.model.
UNET, VAE = LDM_UNET_KEY, LDM_VAE_KEYS[0]
CLIP_L = LDM_CLIP_PREFIX_TO_REMOVE[1]
CLIP_G = CHECKPOINT_KEY_NAMES["open_clip_sdxl"].removesuffix("positional_embedding")
# family -> what the single file holds: the whole pipeline (SDXL: A1111 / ComfyUI checkpoints) or the denoiser only
# (ComfyUI's "diffusion model" files, loaded beside the base's text encoders and VAE)
FAMILIES_SINGLE_FILE = {"sdxl": "checkpoint", "sd3": "checkpoint", "zimage": "transformer", "qwenimage": "transformer",
                        "flux": "transformer", "flux2": "transformer", "flux2-klein": "transformer"}
# Z-Image: the original names -> diffusers' (convert_z_image_transformer_checkpoint_to_diffusers' rename table, in
# its order; inverted here in reverse order), q / k / v fused into attention.qkv
ZIMAGE_RENAMES = {"final_layer.": "all_final_layer.2-1.", "x_embedder.": "all_x_embedder.2-1.",
                  ".attention.out.bias": ".attention.to_out.0.bias",
                  ".attention.k_norm.weight": ".attention.norm_k.weight",
                  ".attention.q_norm.weight": ".attention.norm_q.weight",
                  ".attention.out.weight": ".attention.to_out.0.weight"}
# FLUX.2: convert_flux2_transformer_checkpoint_to_diffusers' tables (local to that function, so restated here; the
# round-trip check runs the function itself): top-level renames, then the double / single block sub-names
FLUX2_RENAMES = {"img_in": "x_embedder", "txt_in": "context_embedder",
                 "time_in.in_layer": "time_guidance_embed.timestep_embedder.linear_1",
                 "time_in.out_layer": "time_guidance_embed.timestep_embedder.linear_2",
                 "guidance_in.in_layer": "time_guidance_embed.guidance_embedder.linear_1",
                 "guidance_in.out_layer": "time_guidance_embed.guidance_embedder.linear_2",
                 "double_stream_modulation_img.lin": "double_stream_modulation_img.linear",
                 "double_stream_modulation_txt.lin": "double_stream_modulation_txt.linear",
                 "single_stream_modulation.lin": "single_stream_modulation.linear", "final_layer.linear": "proj_out"}
FLUX2_DOUBLE = {"img_attn.norm.query_norm": "attn.norm_q", "img_attn.norm.key_norm": "attn.norm_k",
                "img_attn.proj": "attn.to_out.0", "img_mlp.0": "ff.linear_in", "img_mlp.2": "ff.linear_out",
                "txt_attn.norm.query_norm": "attn.norm_added_q", "txt_attn.norm.key_norm": "attn.norm_added_k",
                "txt_attn.proj": "attn.to_add_out", "txt_mlp.0": "ff_context.linear_in",
                "txt_mlp.2": "ff_context.linear_out"}
FLUX2_SINGLE = {"linear1": "attn.to_qkv_mlp_proj", "linear2": "attn.to_out", "norm.query_norm": "attn.norm_q",
                "norm.key_norm": "attn.norm_k"}
FLUX2_QKV = {"attn.to_": "img_attn", "attn.add_": "txt_attn"}
# FLUX.1: convert_flux_transformer_checkpoint_to_diffusers' names, diffusers -> BFL (top level; per double block;
# per single block); q / k / v (and the single blocks' MLP input) are fused separately
FLUX_WIDTH = 3072  # the converter's fixed inner_dim
FLUX_TOP = {"time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
            "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
            "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
            "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
            "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
            "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
            "context_embedder": "txt_in", "x_embedder": "img_in", "proj_out": "final_layer.linear",
            "norm_out.linear": "final_layer.adaLN_modulation.1"}
FLUX_DOUBLE = {"norm1.linear": "img_mod.lin", "norm1_context.linear": "txt_mod.lin",
               "attn.norm_q": "img_attn.norm.query_norm", "attn.norm_k": "img_attn.norm.key_norm",
               "attn.norm_added_q": "txt_attn.norm.query_norm", "attn.norm_added_k": "txt_attn.norm.key_norm",
               "ff.net.0.proj": "img_mlp.0", "ff.net.2": "img_mlp.2", "ff_context.net.0.proj": "txt_mlp.0",
               "ff_context.net.2": "txt_mlp.2", "attn.to_out.0": "img_attn.proj", "attn.to_add_out": "txt_attn.proj"}
FLUX_SINGLE = {"norm.linear": "modulation.lin", "attn.norm_q": "norm.query_norm", "attn.norm_k": "norm.key_norm",
               "proj_out": "linear2"}
FLUX_FUSED = {"attn.to_q": ("img_attn.qkv", 0), "attn.to_k": ("img_attn.qkv", 1), "attn.to_v": ("img_attn.qkv", 2),
              "attn.add_q_proj": ("txt_attn.qkv", 0), "attn.add_k_proj": ("txt_attn.qkv", 1),
              "attn.add_v_proj": ("txt_attn.qkv", 2)}
FLUX_SINGLE_FUSED = {"attn.to_q": 0, "attn.to_k": 1, "attn.to_v": 2, "proj_mlp": 3}  # -> linear1, in this order
# SD3: convert_sd3_transformer_checkpoint_to_diffusers' names, diffusers -> original (per joint block; q / k / v are
# fused into qkv separately; the last block's context modulation and the final one are (shift, scale) there)
SD3_TOP = {"pos_embed.proj": "x_embedder.proj",
           "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
           "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2", "context_embedder": "context_embedder",
           "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
           "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2", "proj_out": "final_layer.linear",
           "norm_out.linear": "final_layer.adaLN_modulation.1"}
SD3_BLOCK = {"attn.norm_q": "x_block.attn.ln_q", "attn.norm_k": "x_block.attn.ln_k",
             "attn.norm_added_q": "context_block.attn.ln_q", "attn.norm_added_k": "context_block.attn.ln_k",
             "attn.to_out.0": "x_block.attn.proj", "attn.to_add_out": "context_block.attn.proj",
             "attn2.norm_q": "x_block.attn2.ln_q", "attn2.norm_k": "x_block.attn2.ln_k",
             "attn2.to_out.0": "x_block.attn2.proj", "norm1.linear": "x_block.adaLN_modulation.1",
             "norm1_context.linear": "context_block.adaLN_modulation.1", "ff.net.0.proj": "x_block.mlp.fc1",
             "ff.net.2": "x_block.mlp.fc2", "ff_context.net.0.proj": "context_block.mlp.fc1",
             "ff_context.net.2": "context_block.mlp.fc2"}
SD3_QKV = {"attn.to_": "x_block.attn", "attn.add_": "context_block.attn", "attn2.to_": "x_block.attn2"}
SD3_TEXT = {"text_encoder": "text_encoders.clip_l.transformer.", "text_encoder_2": "text_encoders.clip_g.transformer.",
            "text_encoder_3": "text_encoders.t5xxl.transformer."}
# diffusers' resnet sub-names -> the original's (inverse of update_unet_resnet_ldm_to_diffusers' replacements)
UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
               "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def read_component(folder: Path) -> dict:
    """Every tensor of a component folder's safetensors files (shards included)."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FlashDMDError(f"{folder} holds no safetensors weights; --single-file reads safetensors only")
    out = {}
    for f in files:
        out.update(load_file(str(f)))
    return out


def unet_to_original(sd: dict, config: dict) -> dict:
    """diffusers UNet2DConditionModel keys -> ``model.diffusion_model.*``."""
    per = int(config["layers_per_block"]) + 1
    direct = {**DIFFUSERS_TO_LDM_MAPPING["unet"]["layers"]}
    if config.get("addition_embed_type") == "text_time":
        direct.update(DIFFUSERS_TO_LDM_MAPPING["unet"]["addition_embed_type"])
    if config.get("class_embed_type") in ("timestep", "projection"):
        direct.update(DIFFUSERS_TO_LDM_MAPPING["unet"]["class_embed_type"])
    up_attn = {int(k.split(".")[1]) for k in sd if k.startswith("up_blocks.") and ".attentions." in k}
    out = {}
    for key, t in sd.items():
        out[UNET + _unet_key(key, direct, per, up_attn)] = t
    return out


def _unet_key(key: str, direct: dict, per: int, up_attn: set) -> str:
    if key in direct:
        return direct[key]
    m = re.match(r"(down|up)_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key)
    if m:
        side, b, kind, layer, rest = m[1], int(m[2]), m[3], int(m[4]), m[5]
        idx = 1 + b * per + layer if side == "down" else b * per + layer
        blocks = "input_blocks" if side == "down" else "output_blocks"
        return f"{blocks}.{idx}.0.{_resnet(rest)}" if kind == "resnets" else f"{blocks}.{idx}.1.{rest}"
    m = re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key)
    if m:
        return f"input_blocks.{(int(m[1]) + 1) * per}.0.op.{m[2]}"
    m = re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key)
    if m:
        b = int(m[1])
        return f"output_blocks.{b * per + per - 1}.{2 if b in up_attn else 1}.conv.{m[2]}"
    m = re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", key)
    if m:
        return f"middle_block.{2 * int(m[2])}.{_resnet(m[3])}" if m[1] == "resnets" else f"middle_block.1.{m[3]}"
    raise FlashDMDError(f"the UNet key {key} has no place in the original SDXL layout; export a diffusers folder "
                        "instead of --single-file")


def _resnet(rest: str) -> str:
    module, _, leaf = rest.rpartition(".")
    return f"{UNET_RESNET.get(module, module)}.{leaf}"


def vae_to_original(sd: dict, config: dict) -> dict:
    """diffusers AutoencoderKL keys -> ``first_stage_model.*`` (attention projections as 1x1 convs)."""
    direct = DIFFUSERS_TO_LDM_MAPPING["vae"]
    n_up = len(config["up_block_types"])
    out = {}
    for key, t in sd.items():
        if key in direct:
            new = direct[key]
        elif m := re.match(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
            new = f"encoder.down.{m[1]}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
        elif m := re.match(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
            new = f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
            new = f"decoder.up.{n_up - 1 - int(m[1])}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
            new = f"decoder.up.{n_up - 1 - int(m[1])}.upsample.conv.{m[2]}"
        elif m := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", key):
            new = f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
        elif m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)", key):
            new = f"{m[1]}.mid.attn_1.{VAE_ATTN.get(m[2], m[2])}.{m[3]}"
            if m[3] == "weight" and m[2] != "group_norm" and t.ndim == 2:
                t = t[:, :, None, None]
        else:
            raise FlashDMDError(f"the VAE key {key} has no place in the original SDXL layout; export a diffusers "
                                "folder instead of --single-file")
        out[VAE + new] = t
    return out


def clip_l_to_original(sd: dict) -> dict:
    """transformers CLIPTextModel keys (flattened or not) -> ``conditioner.embedders.0.transformer.text_model.*``."""
    return {CLIP_L + (k if k.startswith("text_model.") else f"text_model.{k}"): t for k, t in sd.items()}


def clip_g_to_original(sd: dict) -> dict:
    """transformers CLIPTextModelWithProjection keys -> OpenCLIP's (``conditioner.embedders.1.model.*``): q / k / v
    concatenated into ``in_proj``, ``text_projection`` transposed."""
    direct = DIFFUSERS_TO_LDM_MAPPING["openclip"]["layers"]
    out, qkv = {}, {}
    for key, t in sd.items():
        if key in direct:
            out[CLIP_G + direct[key]] = t.T.contiguous() if key == "text_projection.weight" else t
            continue
        m = re.match(r"text_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", key)
        if not m:
            raise FlashDMDError(f"the text encoder 2 key {key} has no place in OpenCLIP's layout; export a diffusers "
                                "folder instead of --single-file")
        layer, module, leaf = m[1], m[2], m[3]
        if p := re.fullmatch(r"self_attn\.([qkv])_proj", module):
            qkv.setdefault((layer, leaf), {})[p[1]] = t
            continue
        module = (module.replace("layer_norm1", "ln_1").replace("layer_norm2", "ln_2").replace("mlp.fc1", "mlp.c_fc")
                  .replace("mlp.fc2", "mlp.c_proj").replace("self_attn.", "attn."))
        out[f"{CLIP_G}transformer.resblocks.{layer}.{module}.{leaf}"] = t
    for (layer, leaf), parts in qkv.items():
        out[f"{CLIP_G}transformer.resblocks.{layer}.attn.in_proj_{leaf}"] = torch.cat([parts[c] for c in "qkv"])
    return out


def sdxl_checkpoint(folder: Path) -> dict:
    """The exported SDXL pipeline folder's weights as one original-layout state dict, checked by
    :func:`check_round_trip`."""
    parts = {name: read_component(folder / name) for name in ("unet", "vae", "text_encoder", "text_encoder_2")}
    configs = {name: io.read_json(folder / name / "config.json") for name in ("unet", "vae")}
    ckpt = {**unet_to_original(parts["unet"], configs["unet"]), **vae_to_original(parts["vae"], configs["vae"]),
            **clip_l_to_original(parts["text_encoder"]), **clip_g_to_original(parts["text_encoder_2"])}
    check_round_trip(ckpt, parts, configs, folder)
    return ckpt


def check_round_trip(ckpt: dict, parts: dict, configs: dict, folder: Path) -> None:
    """diffusers' own original -> diffusers converters on ``ckpt`` give every component's tensors back, bit for
    bit, under their diffusers names; one FlashDMDError line naming the first difference otherwise."""
    g_config = CLIPTextConfig.from_pretrained(folder / "text_encoder_2")
    with torch.device("meta"):
        g_model = CLIPTextModelWithProjection(g_config)
    back = {"unet": convert_ldm_unet_checkpoint(ckpt, configs["unet"]),
            "vae": convert_ldm_vae_checkpoint(ckpt, configs["vae"]),
            "text_encoder": {k if k in parts["text_encoder"] else k.removeprefix("text_model."): v
                             for k, v in convert_ldm_clip_checkpoint(ckpt).items()},
            "text_encoder_2": convert_open_clip_checkpoint(g_model, ckpt, prefix=CLIP_G)}
    for name, want in parts.items():
        _check_same(name, want, back[name])


def zimage_to_original(sd: dict) -> dict:
    """Z-Image transformer: diffusers' names -> the original (ComfyUI) ones, q / k / v fused into attention.qkv."""
    out, qkv = {}, {}
    for key, t in sd.items():
        if m := re.fullmatch(r"(.+\.attention)\.to_([qkv])\.weight", key):
            qkv.setdefault(m[1], {})[m[2]] = t
            continue
        new = key
        for old, diff in reversed(ZIMAGE_RENAMES.items()):
            new = new.replace(diff, old)
        out[new] = t
    for attn, parts in qkv.items():
        out[f"{attn}.qkv.weight"] = torch.cat([parts[c] for c in "qkv"])
    return out


def flux2_to_original(sd: dict) -> dict:
    """FLUX.2 transformer: diffusers' names -> BFL's (double_blocks / single_blocks, fused qkv, norms' ``scale``,
    the final modulation's (shift, scale) order)."""
    inv_double, inv_single = {v: k for k, v in FLUX2_DOUBLE.items()}, {v: k for k, v in FLUX2_SINGLE.items()}
    out, qkv = {}, {}
    for key, t in sd.items():
        if key.startswith("norm_out.linear."):
            out[f"final_layer.adaLN_modulation.1.{key.rsplit('.', 1)[1]}"] = swap_scale_shift(t, 0)
        elif m := re.fullmatch(r"transformer_blocks\.(\d+)\.(attn\.(?:to_|add_))([qkv])(?:_proj)?\.(\w+)", key):
            qkv.setdefault((m[1], FLUX2_QKV[m[2]], m[4]), {})[m[3]] = t
        elif m := re.fullmatch(r"transformer_blocks\.(\d+)\.(.+)\.(\w+)", key):
            out[_flux2_param(f"double_blocks.{m[1]}.{inv_double[m[2]]}", m[3])] = t
        elif m := re.fullmatch(r"single_transformer_blocks\.(\d+)\.(.+)\.(\w+)", key):
            out[_flux2_param(f"single_blocks.{m[1]}.{inv_single[m[2]]}", m[3])] = t
        else:
            new = key
            for old, diff in reversed(FLUX2_RENAMES.items()):
                new = new.replace(diff, old)
            out[new] = t
    for (block, attn, param), parts in qkv.items():
        out[f"double_blocks.{block}.{attn}.qkv.{param}"] = torch.cat([parts[c] for c in "qkv"])
    return out


def precheck(family: str, teacher: Path) -> None:
    """Before anything is exported: refuse what the family's layout cannot hold (a FLUX.1 other than 3072 wide)."""
    if family == "flux":
        config = io.read_json(teacher / "transformer" / "config.json")
        _flux_width(config["num_attention_heads"] * config["attention_head_dim"])


def _flux_width(width: int) -> None:
    if width != FLUX_WIDTH:
        raise FlashDMDError(f"--single-file: this FLUX.1 transformer is {width} wide and diffusers' FLUX.1 single-file "
                            f"reader only reads the released {FLUX_WIDTH}-wide layout; export a diffusers folder "
                            "(drop --single-file)")


def flux_to_original(sd: dict) -> dict:
    """FLUX.1 transformer: diffusers' names -> BFL's (``flux1-dev.safetensors``: double_blocks / single_blocks, fused
    qkv and linear1, norms' ``scale``, the final modulation's (shift, scale) order). Refuses a width other than the
    3072 diffusers' reader is fixed to."""
    _flux_width(sd["x_embedder.weight"].shape[0])
    out, fused = {}, {}
    for key, t in sd.items():
        module, _, param = key.rpartition(".")
        if module in FLUX_TOP:
            out[f"{FLUX_TOP[module]}.{param}"] = swap_scale_shift(t, 0) if module == "norm_out.linear" else t
        elif (m := re.fullmatch(r"transformer_blocks\.(\d+)\.(.+)", module)) and m[2] in FLUX_FUSED:
            name, i = FLUX_FUSED[m[2]]
            fused.setdefault(f"double_blocks.{m[1]}.{name}.{param}", {})[i] = t
        elif m := re.fullmatch(r"transformer_blocks\.(\d+)\.(.+)", module):
            out[_flux2_param(f"double_blocks.{m[1]}.{FLUX_DOUBLE[m[2]]}", param)] = t
        elif (m := re.fullmatch(r"single_transformer_blocks\.(\d+)\.(.+)", module)) and m[2] in FLUX_SINGLE_FUSED:
            fused.setdefault(f"single_blocks.{m[1]}.linear1.{param}", {})[FLUX_SINGLE_FUSED[m[2]]] = t
        elif m := re.fullmatch(r"single_transformer_blocks\.(\d+)\.(.+)", module):
            out[_flux2_param(f"single_blocks.{m[1]}.{FLUX_SINGLE[m[2]]}", param)] = t
        else:
            raise KeyError(module)
    for name, parts in fused.items():
        out[name] = torch.cat([parts[i] for i in sorted(parts)])
    return out


def _flux2_param(module: str, param: str) -> str:
    return f"{module}.{'scale' if module.endswith('_norm') and param == 'weight' else param}"


# family -> (diffusers transformer state dict -> the original layout, diffusers' reader of that layout)
TRANSFORMER_LAYOUTS = {"zimage": (zimage_to_original, convert_z_image_transformer_checkpoint_to_diffusers),
                       "qwenimage": (dict, dict),  # ComfyUI's Qwen-Image files have diffusers' names
                       "flux": (flux_to_original, convert_flux_transformer_checkpoint_to_diffusers),
                       "flux2": (flux2_to_original, convert_flux2_transformer_checkpoint_to_diffusers),
                       "flux2-klein": (flux2_to_original, convert_flux2_transformer_checkpoint_to_diffusers)}


def transformer_checkpoint(family: str, folder: Path) -> dict:
    """The exported folder's transformer in ``family``'s original (ComfyUI diffusion-model) layout, checked against
    diffusers' reader of that layout: every tensor back under its diffusers name, bit for bit."""
    sd = read_component(folder / "transformer")
    to_original, reader = TRANSFORMER_LAYOUTS[family]
    try:
        out = to_original(sd)
    except KeyError as e:
        raise FlashDMDError(f"--single-file: the {family} transformer's module {e} has no place in the original "
                            "layout; export a diffusers folder instead") from None
    _check_same("transformer", sd, reader(dict(out)))
    return out


def _check_same(name: str, want: dict, got: dict) -> None:
    missing = sorted(set(want) - set(got)) + sorted(set(got) - set(want))
    if missing:
        raise FlashDMDError(f"--single-file: diffusers' converter does not read {name}'s {missing[0]} back from the "
                            "original layout; export a diffusers folder instead")
    for k, t in want.items():
        if got[k].shape != t.shape or not torch.equal(got[k], t):
            raise FlashDMDError(f"--single-file: {name}'s {k} does not survive diffusers' conversion unchanged; "
                                "export a diffusers folder instead")


def denoiser(family: str) -> str:
    """The subfolder of ``family``'s denoiser (unet / transformer)."""
    return "unet" if family == "sdxl" else "transformer"


def checkpoint(family: str, folder: Path) -> dict:
    """The single file's tensors for ``family``'s exported folder (see FAMILIES_SINGLE_FILE)."""
    if family in ("sdxl", "sd3"):
        return sdxl_checkpoint(folder) if family == "sdxl" else sd3_checkpoint(folder)
    return transformer_checkpoint(family, folder)


def sd3_transformer_to_original(sd: dict) -> dict:
    """SD3 / SD3.5 MMDiT: diffusers' names -> ``model.diffusion_model.*`` (joint_blocks, fused qkv)."""
    last = max(int(k.split(".")[1]) for k in sd if k.startswith("transformer_blocks."))
    out, qkv = {}, {}
    for key, t in sd.items():
        module, _, param = key.rpartition(".")
        if key == "pos_embed.pos_embed":
            out[UNET + "pos_embed"] = t
        elif module in SD3_TOP:
            swap = module == "norm_out.linear"
            out[f"{UNET}{SD3_TOP[module]}.{param}"] = swap_scale_shift(t, 0) if swap else t
        elif m := re.fullmatch(r"transformer_blocks\.(\d+)\.(attn2?\.(?:to_|add_))([qkv])(?:_proj)?", module):
            qkv.setdefault((m[1], SD3_QKV[m[2]], param), {})[m[3]] = t
        elif (m := re.fullmatch(r"transformer_blocks\.(\d+)\.(.+)", module)) and m[2] in SD3_BLOCK:
            swap = m[2] == "norm1_context.linear" and int(m[1]) == last
            out[f"{UNET}joint_blocks.{m[1]}.{SD3_BLOCK[m[2]]}.{param}"] = swap_scale_shift(t, 0) if swap else t
        else:
            raise FlashDMDError(f"the SD3 transformer key {key} has no place in the original layout; export a "
                                "diffusers folder instead of --single-file")
    for (block, attn, param), parts in qkv.items():
        out[f"{UNET}joint_blocks.{block}.{attn}.qkv.{param}"] = torch.cat([parts[c] for c in "qkv"])
    return out


def sd3_checkpoint(folder: Path) -> dict:
    """The exported SD3 pipeline folder as SAI's single file: the MMDiT, the VAE, the CLIPs and T5 (when the folder
    has it) under ``text_encoders.*.transformer.``, checked by diffusers' readers of that layout."""
    texts = [n for n in SD3_TEXT if (folder / n).is_dir()]
    parts = {name: read_component(folder / name) for name in ("transformer", "vae", *texts)}
    vae_config = io.read_json(folder / "vae" / "config.json")
    ckpt = {**sd3_transformer_to_original(parts["transformer"]), **vae_to_original(parts["vae"], vae_config)}
    for name in texts:
        ckpt.update({SD3_TEXT[name] + k: t for k, t in parts[name].items()
                     if not (name == "text_encoder" and k == "text_projection.weight")})
    _check_same("transformer", parts["transformer"], convert_sd3_transformer_checkpoint_to_diffusers(dict(ckpt)))
    _check_same("vae", parts["vae"], convert_ldm_vae_checkpoint(ckpt, vae_config))
    for name in texts:
        want = dict(parts[name])
        if name == "text_encoder_3":
            got = convert_sd3_t5_checkpoint_to_diffusers(ckpt)
        else:
            got = convert_ldm_clip_checkpoint(ckpt, SD3_TEXT[name])
        if name == "text_encoder":  # the layout has no CLIP-L projection: diffusers' loader puts the identity there
            proj = want.pop("text_projection.weight", None)
            if proj is not None and not torch.equal(proj, torch.eye(proj.shape[0], dtype=proj.dtype)):
                raise FlashDMDError("--single-file: SD3's single-file layout has no CLIP-L text projection (loaders "
                                    "use the identity) and this teacher's is not the identity; export a diffusers "
                                    "folder")
        _check_same(name, want, got)
    return ckpt


def metadata(record: dict, scheduler_config: dict) -> dict:
    """The file's header: modelspec keys (what A1111 / Forge / ComfyUI show) and flashdmd's sampler."""
    k = record["num_inference_steps"]
    spec = {"modelspec.architecture": "stable-diffusion-xl-v1-base",
            "modelspec.implementation": "https://github.com/Stability-AI/generative-models"} \
        if record["family"] == "sdxl" else {}
    return {"format": "pt", "modelspec.sai_model_spec": "1.0.0", **spec,
            "modelspec.title": f"flashdmd {k}-step student", "modelspec.description":
                f"{k}-step student distilled by flashdmd ({record.get('method')}); sample with {record['scheduler']} "
                f"at timesteps {record['student_timesteps']} and guidance_scale {record['guidance_scale']}",
            "flashdmd.scheduler": record["scheduler"], "flashdmd.scheduler_config": json.dumps(scheduler_config),
            "flashdmd.pipeline_kwargs": json.dumps(record["pipeline_kwargs"]),
            "flashdmd.guidance_scale": str(record["guidance_scale"])}
