"""Weight-only quantisation of frozen modules: ``none | int8 | fp8`` (torchao), the one place flashdmd calls it.

torchao's weight-only configs replace each ``nn.Linear`` weight by a tensor subclass -- ``Int8Tensor`` (int8 values,
one float scale per output row) or ``Float8Tensor`` (float8 e4m3, one scale per row) -- that dequantises in the
layer's forward; convolutions, norms and embeddings stay in the frozen dtype. torchao rather than optimum-quanto:
peft's LoRA layers wrap torchao's quantised linears (``peft.tuners.lora.torchao.TorchaoLoraLinear``, any torchao
tensor but int4), while peft 0.21 has no LoRA layer for quanto's. Quantisation is deterministic: the same folder
gives the same quantised tensors, so a resumed run rebuilds them bit for bit and a checkpoint never holds them."""
from __future__ import annotations

import logging

import torch
from torch import nn

from flashdmd import FlashDMDError
from flashdmd.choices import QUANTS

FP8_CAPABILITY = (8, 9)  # float8 e4m3 matmuls: Ada (8.9) and Hopper (9.0) or newer


def check(kind: str, device, field: str) -> None:
    """One FlashDMDError line when ``kind`` cannot run on ``device`` (fp8 off a CUDA GPU with float8 support);
    the meta device (`flashdmd plan`) accepts every kind."""
    device = torch.device(device)
    if kind != "fp8" or device.type == "meta":
        return
    ok = device.type == "cuda" and torch.cuda.is_available() \
        and torch.cuda.get_device_capability(device) >= FP8_CAPABILITY
    if not ok:
        where = torch.cuda.get_device_name(device) if device.type == "cuda" and torch.cuda.is_available() else device
        raise FlashDMDError(f"{field}: fp8 needs a CUDA GPU with float8 support (compute capability 8.9+: Ada, Hopper "
                            f"or newer), and this run's device is {where}: set {field} int8 or none")


def quantise(module: nn.Module | None, kind: str, keep: tuple[nn.Module, ...] = ()) -> nn.Module | None:
    """``module``'s linear weights quantised in place (``kind`` int8 / fp8; none: unchanged), but for those it shares
    with the modules in ``keep`` (another part's, quantised or not by its own field). Frozen modules only: a quantised
    weight takes no gradient."""
    if module is None or kind == "none":
        return module
    for name in ("torchao", "torch.utils._pytree"):  # its import warns of each CUDA kernel it cannot load, and of
        logging.getLogger(name).setLevel(logging.ERROR)  # its enums' registration with torch.compile
    from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig, quantize_
    config = Int8WeightOnlyConfig() if kind == "int8" else Float8WeightOnlyConfig()
    kept = {id(p) for k in keep for p in k.parameters()}
    # linears only, not twice, and not another part's (an LRM whose frozen backbone is the teacher)
    quantize_(module, config, filter_fn=lambda m, _: isinstance(m, nn.Linear) and not is_quantised(m.weight)
              and id(m.weight) not in kept)
    return module


def is_quantised(t: torch.Tensor) -> bool:
    """Whether ``t`` is a quantised (tensor-subclass) weight."""
    return type(t) not in (torch.Tensor, nn.Parameter) and hasattr(t, "__tensor_flatten__")


def inner_tensors(t: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors that hold ``t``'s bytes: ``t`` itself, or a quantised weight's data and scales."""
    if not hasattr(t, "__tensor_flatten__") or type(t) in (torch.Tensor, nn.Parameter):
        return [t]
    names, _ = t.__tensor_flatten__()
    return [x for n in names for x in inner_tensors(getattr(t, n))]
