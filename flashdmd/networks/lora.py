"""LoRA adapters on a denoiser: attach, save, load, merge -- the one place flashdmd calls peft.

A network is a diffusers model (``PeftAdapterMixin``: ``add_adapter``, ``fuse_lora``, ``unload_lora``); its
adapters sit on the attention projections (:data:`flashdmd.families.LORA_TARGETS`, named alike in every family's
denoiser) with scale ``alpha / rank``. A run's student adapters are one safetensors file of peft's
``get_peft_model_state_dict`` (no adapter name in the keys) -- what the run folder holds
(:mod:`flashdmd.runfolder`), what `flashdmd export` turns into diffusers' ``pytorch_lora_weights.safetensors`` or
fuses into the teacher's weights.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import torch
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from flashdmd import FlashDMDError
from flashdmd.families import LORA_TARGETS


def lora_config(rank: int, alpha: float | None = None, init: bool | str = True) -> LoraConfig:
    """peft's config of flashdmd's adapters: rank ``rank``, ``alpha`` (default: the rank, scale 1) on
    :data:`LORA_TARGETS`; ``init`` as peft's ``init_lora_weights`` (True: lora_B zero, lora_A kaiming;
    "gaussian": lora_A normal -- training's choice; either way the adapter starts as the identity)."""
    return LoraConfig(r=rank, lora_alpha=alpha or rank, init_lora_weights=init, target_modules=list(LORA_TARGETS))


def metadata(rank: int, alpha: float | None = None) -> dict:
    """The adapter's shape as diffusers' ``save_lora_weights(..., *_lora_adapter_metadata=)`` records it."""
    return {"r": int(rank), "lora_alpha": alpha or int(rank), "target_modules": list(LORA_TARGETS)}


def attach(net: nn.Module, rank: int, alpha: float | None = None, dtype: torch.dtype | None = None,
           init: bool | str = "gaussian") -> nn.Module:
    """Freeze ``net`` and add trainable adapters (see :func:`lora_config`) in ``dtype`` (None: peft's choice, the base
    layer's dtype; with a lower-precision frozen base they are cast up here -- the gaussian init is then rounded once
    to the base's precision; lora_B starts at zero either way). FlashDMDError when ``net`` has none of the targets."""
    net.requires_grad_(False)
    with warnings.catch_warnings():  # a quantised base (flashdmd.networks.quant): peft warns that it cannot merge
        warnings.filterwarnings("ignore", message=".*without `get_apply_tensor_subclass`")  # flashdmd never does
        net.add_adapter(lora_config(rank, alpha, init))
    trainable = [p for p in net.parameters() if p.requires_grad]
    if not trainable:
        raise FlashDMDError(f"LoRA found none of {LORA_TARGETS} in {type(net).__name__}")
    if dtype is not None:
        for p in trainable:
            if p.dtype != dtype:
                p.data = p.data.to(dtype)
    return net


def adapter_state(net: nn.Module) -> dict[str, Tensor]:
    """The adapters' tensors by peft's saved names (contiguous, as safetensors wants them)."""
    return {k: v.contiguous() for k, v in get_peft_model_state_dict(net).items()}


def save(net: nn.Module, path: str | Path) -> None:
    """The adapters of ``net`` into the safetensors file ``path`` (callers write it inside an atomic folder or
    file: :func:`flashdmd.io.write_folder`)."""
    save_file(adapter_state(net), str(path))


def read(path: str | Path) -> dict[str, Tensor]:
    """The adapter tensors of a saved file; one FlashDMDError line when it is missing or unreadable."""
    path = Path(path)
    if not path.is_file():
        raise FlashDMDError(f"{path} is missing: the LoRA run has not saved a student yet")
    try:
        return load_file(str(path))
    except (OSError, SafetensorError) as e:
        raise FlashDMDError(f"{path} cannot be read: {e}") from None


def load(net: nn.Module, rank: int, alpha: float | None, path: str | Path) -> nn.Module:
    """``net`` with adapters of ``rank`` / ``alpha`` attached and set to the saved file ``path``; FlashDMDError when
    the file holds adapters of layers ``net`` does not have (another teacher's)."""
    net.add_adapter(lora_config(rank, alpha))
    result = set_peft_model_state_dict(net, read(path))
    if getattr(result, "unexpected_keys", None):
        raise FlashDMDError(f"{path} does not fit {type(net).__name__} (e.g. {result.unexpected_keys[0]})")
    return net


def save_for_pipeline(state: dict[str, Tensor], pipeline_class: type, layers_kwarg: str, folder: str | Path,
                      weight_name: str, rank: int, alpha: float | None = None) -> None:
    """Adapter tensors ``state`` (peft's names) as the LoRA file ``pipe.load_lora_weights(folder)`` reads: the
    pipeline class's ``save_lora_weights`` under ``{layers_kwarg}_lora_layers`` (``unet``: converted to diffusers'
    names first), with the adapter's rank / alpha as its metadata."""
    if layers_kwarg == "unet":
        state = convert_state_dict_to_diffusers(state)
    pipeline_class.save_lora_weights(str(folder), weight_name=weight_name,
                                     **{f"{layers_kwarg}_lora_layers": state,
                                        f"{layers_kwarg}_lora_adapter_metadata": metadata(rank, alpha)})


def merge(net: nn.Module) -> nn.Module:
    """Fuse the adapters into the base weights (W + alpha/r * B @ A, in the weights' dtype) and remove them: a plain
    diffusers model again."""
    net.fuse_lora()
    net.unload_lora()
    return net
