"""torch.compile of the run's networks (``model_compile``), region by region; the one place flashdmd calls it.

What is compiled is each block's ``forward`` (set on the block as a :class:`CompiledForward`), not the whole denoiser
and not ``nn.Module.compile``:

* the module tree, its parameter names and its state dict are the eager module's (no ``_orig_mod.`` wrapper):
  checkpoints, the EMA, the saved student and export see the names they always saw;
* the forward hooks of a block run eagerly around its compiled forward (``nn.Module.compile`` would trace them, and
  dynamo does not guard on hooks added later): the feature taps of DMD2's latent head and of the reward model, which
  hook the very blocks that are compiled, keep working;
* peft's LoRA layers are inside the blocks and are traced with them; diffusers' gradient checkpointing wraps each
  block's call, so a checkpointed region is one compiled call and its recomputation in backward is the same call
  again (the whole denoiser compiled would put ``torch.utils.checkpoint`` inside the graph and retrace on every
  Python branch of the model's forward);
* the blocks repeat, so one compiled graph serves all the blocks of a class and shape, of every role (regional
  compilation, as diffusers' ``compile_repeated_blocks``): a set-up compiles a few graphs, not one per block.

The compiled forward is one ``torch.compile`` of the block class's forward, shared by every block of that class, called
with the block as its argument: a deep copy of a compiled block (the student's copies for sampling, the Stage-2
reference) calls it with the copy, not with the original.
"""
from __future__ import annotations

import torch
from torch import nn

from flashdmd import FlashDMDError
from flashdmd.networks.offload import base_blocks

# torch.compile's backend: inductor (generated kernels). The CPU tests and the GPU check's --smoke set "aot_eager"
# (the same graph capture and AOT autograd, eager kernels: no C++ compilation)
BACKEND = "inductor"
# dynamo's cache per code object (its default 8): one compiled block forward serves every block of its class, and the
# roles (gradients on or off, checkpointed recomputation) and shapes (UNet levels) each add an entry
RECOMPILE_LIMIT = 64
_COMPILED: dict[tuple, object] = {}   # (block class, backend) -> torch.compile of its forward
# the VAE's units (what its gradient checkpointing wraps): diffusers' encoder / decoder blocks
VAE_BLOCKS = ("DownEncoderBlock2D", "UpDecoderBlock2D", "UNetMidBlock2D")


class CompiledForward:
    """A block's ``forward``: its class's compiled forward called with the block (deep-copied with the block)."""

    def __init__(self, module: nn.Module):
        key = (type(module), BACKEND)
        if key not in _COMPILED:
            _COMPILED[key] = torch.compile(type(module).forward, backend=BACKEND)
        self.fn, self.module = _COMPILED[key], module

    def __call__(self, *args, **kwargs):
        return self.fn(self.module, *args, **kwargs)


def compile_forward(module: nn.Module) -> None:
    """Compile ``module``'s forward in place (its hooks stay eager, its names unchanged)."""
    if not isinstance(module.__dict__.get("forward"), CompiledForward):
        module.forward = CompiledForward(module)


def compile_blocks(net: nn.Module | None, classes: tuple[str, ...] | list[str], whole: bool = True) -> int:
    """Compile the forward of each of ``net``'s blocks of the named classes (outermost only), or, ``whole``, ``net``'s
    own forward when it has none (not for a network accelerate prepares: it wraps the top module's forward). Returns
    how many forwards were compiled."""
    if net is None:
        return 0
    if not whole and not base_blocks(net, tuple(classes)):
        raise FlashDMDError(f"model_compile: {type(net).__name__} has no blocks of {', '.join(classes)} to compile; "
                            "set model_compile none")
    name = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
    setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), RECOMPILE_LIMIT))
    blocks = base_blocks(net, tuple(classes)) or [net]
    for block in blocks:
        compile_forward(block)
    return len(blocks)


def is_compiled(module: nn.Module) -> bool:
    """Whether any of ``module``'s forwards is compiled by :func:`compile_forward`."""
    return any(isinstance(m.__dict__.get("forward"), CompiledForward) for m in module.modules())
