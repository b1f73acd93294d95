"""``--lora-format diffusers|kohya|comfyui``: the LoRA file in the key layout an ecosystem loads.

* ``diffusers`` (default): ``pytorch_lora_weights.safetensors`` from the pipeline class's ``save_lora_weights``
  (:func:`flashdmd.networks.lora.save_for_pipeline`).
* ``kohya`` (SDXL): ``lora_unet_*`` keys with ``.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha`` -- what
  A1111 / Forge / ComfyUI load --, written by diffusers' own ``convert_state_dict_to_kohya`` (which records
  alpha = rank; the run's alpha replaces it, so that alpha / rank is the trained scale). diffusers reads it back with
  ``_convert_non_diffusers_lora_to_diffusers`` (``load_lora_weights`` detects ``lora_unet_``).
* ``comfyui``: per family, the layout ComfyUI's LoRA loader maps and a diffusers reader detects:

  - SDXL: the kohya file (ComfyUI maps ``lora_unet_<diffusers name>`` keys);
  - SD3, FLUX.1: diffusers' own ``transformer.*`` keys -- ComfyUI's loader maps them for these two models
    (comfy/lora.py, "regular diffusers sd3 lora format" / "diffusers flux lora format"), and no diffusers reader
    exists for a ``diffusion_model.*`` SD3 / FLUX.1 LoRA, so none is written;
  - Qwen-Image: ``diffusion_model.<module>.lora_A/B.weight`` + ``.alpha`` (ComfyUI's Qwen-Image model has
    diffusers' module names; diffusers' ``_convert_non_diffusers_qwen_lora_to_diffusers`` strips the prefix and
    bakes alpha / rank into the weights);
  - Z-Image: ``diffusion_model.*`` with ComfyUI's fused ``attention.qkv`` and ``attention.out``, as
    ``.lora.down.weight`` / ``.lora.up.weight`` / ``.alpha`` (the form from which
    ``_convert_non_diffusers_z_image_lora_to_diffusers`` splits a fused qkv again); the three adapters of q, k, v
    become one of rank 3r: down = [A_q; A_k; A_v], up = blockdiag(B_q, B_k, B_v), alpha 3 alpha (the same
    alpha / rank), so each of q, k, v gets exactly its own B A back;
  - FLUX.2: ``diffusion_model.double_blocks.N.img_attn.qkv`` / ``img_attn.proj`` the same way, as ai-toolkit writes
    them (``.lora_A`` / ``.lora_B``, no alpha: alpha / rank is multiplied into up, since
    ``_convert_non_diffusers_flux2_lora_to_diffusers`` reads no alphas and ComfyUI then uses scale 1).

Whether ComfyUI's own loader reads these files is taken from its source (comfy/lora.py's key maps), not run: no
PyPI package ships that code for this Python.
"""
from __future__ import annotations

from pathlib import Path

import diffusers
import torch
from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya
from safetensors.torch import save_file

from flashdmd import FlashDMDError
from flashdmd.families import FAMILIES
from flashdmd.networks import lora

FORMATS = ("diffusers", "kohya", "comfyui")
DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"
FILES = {"diffusers": DIFFUSERS_FILE, "kohya": "lora_kohya.safetensors", "comfyui": "lora_comfyui.safetensors"}
# family -> the layout --lora-format comfyui writes (see the module docstring)
COMFY_LAYOUT = {"sdxl": "kohya", "sd3": "diffusers", "flux": "diffusers", "qwenimage": "diffusion_model",
                "zimage": "diffusion_model_fused", "flux2": "diffusion_model_fused",
                "flux2-klein": "diffusion_model_fused"}
KOHYA_FAMILIES = ("sdxl",)


def layout(family: str, fmt: str) -> str:
    """The key layout ``fmt`` means for ``family``: diffusers, kohya, diffusion_model or diffusion_model_fused;
    one FlashDMDError line for a pair no loader in diffusers reads."""
    if fmt not in FORMATS:
        raise FlashDMDError(f"--lora-format {fmt!r} is not one of {', '.join(FORMATS)}")
    if fmt == "kohya":
        if family not in KOHYA_FAMILIES:
            raise FlashDMDError(f"--lora-format kohya is for SDXL (lora_unet_* keys); a {family} LoRA is written for "
                                "ComfyUI with --lora-format comfyui")
        return "kohya"
    if fmt == "comfyui":
        if family not in COMFY_LAYOUT:
            raise FlashDMDError(f"--lora-format comfyui has no layout for the {family} family; use --lora-format "
                                "diffusers")
        return COMFY_LAYOUT[family]
    return "diffusers"


def write(family: str, pipeline_class: str, state: dict, folder: Path, fmt: str, rank: int,
          alpha: float | None) -> str:
    """The adapter tensors ``state`` (peft's names) as ``folder / FILES[fmt]`` in ``fmt``'s layout for ``family``;
    returns the file's name."""
    kind = layout(family, fmt)
    name = FILES[fmt]
    alpha = float(alpha or rank)
    if kind == "diffusers":
        lora.save_for_pipeline(state, getattr(diffusers, pipeline_class), FAMILIES[family].lora_layers_kwarg, folder,
                               name, rank, alpha)
        return name
    if kind == "kohya":
        tensors, meta = to_kohya(state, rank, alpha), kohya_metadata(rank, alpha)
    elif kind == "diffusion_model":
        tensors, meta = to_diffusion_model(state, alpha), {"format": "pt"}
    else:
        tensors, meta = to_diffusion_model_fused(state, alpha, FUSED[family]), {"format": "pt"}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / name), metadata=meta)
    return name


def to_kohya(state: dict, rank: int, alpha: float) -> dict:
    """peft's adapter names -> kohya's ``lora_unet_*`` (diffusers' convert_state_dict_to_kohya), alpha set to the
    run's."""
    out = convert_state_dict_to_kohya({f"unet.{k}": v for k, v in state.items()})
    dtype = next(iter(state.values())).dtype
    return {k: (torch.tensor(alpha, dtype=dtype) if k.endswith(".alpha") else v) for k, v in out.items()}


def kohya_metadata(rank: int, alpha: float) -> dict:
    """The kohya-ss training metadata A1111 / Forge show (network module, dim, alpha); all strings."""
    return {"format": "pt", "ss_network_module": "networks.lora", "ss_network_dim": str(int(rank)),
            "ss_network_alpha": f"{alpha:g}", "ss_base_model_version": "sdxl_base_v1-0"}


def _pairs(state: dict):
    """(module name, A, B) for each adapter of peft's state dict."""
    for key in sorted(state):
        if key.endswith(".lora_A.weight"):
            module = key[: -len(".lora_A.weight")]
            yield module, state[key], state[f"{module}.lora_B.weight"]


def to_diffusion_model(state: dict, alpha: float) -> dict:
    """``diffusion_model.<module>.lora_A/B.weight`` + ``.alpha`` (the module names unchanged)."""
    out = {}
    for module, a, b in _pairs(state):
        out.update(_adapter(f"diffusion_model.{module}", a, b, alpha))
    return out


def _adapter(name: str, a, b, alpha: float) -> dict:
    return {f"{name}.lora_A.weight": a, f"{name}.lora_B.weight": b,
            f"{name}.alpha": torch.tensor(alpha, dtype=a.dtype)}


# family -> (attention module prefixes diffusers -> ComfyUI, the attention's name, fused qkv, output projection,
# key style): "dot" -- `.lora.down.weight` / `.lora.up.weight` / `.alpha` (Z-Image: the form diffusers' reader
# splits a fused qkv from); "baked" -- `.lora_A.weight` / `.lora_B.weight` with alpha / rank multiplied into up and
# no alpha (FLUX.2: ai-toolkit's form, which diffusers' reader takes without alphas and ComfyUI reads at scale 1)
FUSED = {
    "zimage": ({"layers.": "layers.", "noise_refiner.": "noise_refiner.", "context_refiner.": "context_refiner."},
               "attention", "attention.qkv", "attention.out", "dot"),
    "flux2": ({"transformer_blocks.": "double_blocks."}, "attn", "img_attn.qkv", "img_attn.proj", "baked"),
}
FUSED["flux2-klein"] = FUSED["flux2"]


def _fused_adapter(name: str, down, up, alpha: float, style: str) -> dict:
    if style == "dot":
        return {f"{name}.lora.down.weight": down, f"{name}.lora.up.weight": up,
                f"{name}.alpha": torch.tensor(alpha, dtype=down.dtype)}
    return {f"{name}.lora_A.weight": down, f"{name}.lora_B.weight": up * (alpha / down.shape[0])}


def to_diffusion_model_fused(state: dict, alpha: float, table) -> dict:
    """ComfyUI's layout with fused q / k / v: each attention's three rank-r adapters as one rank-3r adapter on the
    fused projection (down stacked, up block-diagonal, alpha tripled: the same alpha / rank), the output projection
    renamed."""
    prefixes, attn, qkv, proj, style = table
    adapters = {module: (a, b) for module, a, b in _pairs(state)}
    out = {}
    for module in sorted(adapters):
        head, _, leaf = module.rpartition(f".{attn}.")
        src = next((p for p in prefixes if head.startswith(p)), None)
        if src is None or leaf not in ("to_q", "to_k", "to_v", "to_out.0"):
            raise FlashDMDError(f"the LoRA module {module} has no place in ComfyUI's layout; export with "
                                "--lora-format diffusers")
        block = f"diffusion_model.{prefixes[src]}{head[len(src):]}"
        if leaf == "to_out.0":
            out.update(_fused_adapter(f"{block}.{proj}", *adapters[module], alpha, style))
        elif leaf == "to_q":
            parts = [adapters.get(f"{head}.{attn}.{p}") for p in ("to_q", "to_k", "to_v")]
            if any(p is None for p in parts):
                raise FlashDMDError(f"{head}.{attn} has LoRA on only some of to_q / to_k / to_v; ComfyUI's fused qkv "
                                    "needs all three: export with --lora-format diffusers")
            down, up = torch.cat([a for a, _ in parts]), torch.block_diag(*[b for _, b in parts])
            out.update(_fused_adapter(f"{block}.{qkv}", down, up, 3 * alpha, style))
    return out
