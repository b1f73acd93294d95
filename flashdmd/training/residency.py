"""Where a run's frozen weights wait between their uses (``model_offload``; the mechanics are
:mod:`flashdmd.networks.offload`).

* ``none``: every part on the device from loading on (the family loads there).
* ``frozen`` and ``base``: the family loads every part on the CPU; :func:`install` homes the text encoders and the VAE
  there (onloaded at their first use in a phase), and -- ``base`` -- streams the teacher's blocks. The denoiser moves
  to the device only after the text cache is encoded (:func:`settle`), so the set-up never holds the text encoders
  and the denoiser on the device together. The Pixel-GAN backbone (:func:`add_part` from the set-up) and the Stage-2
  reward model join the homed parts when they are built; the student, fake score, reference and a
  teacher-initialised reward model are hooked to the same block groups (:func:`hook`).
* :func:`phase`: the context of one phase -- an encoding, a generator / fake-score / discriminator / RL step, the
  evaluations -- at whose end the parts it onloaded go back.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from flashdmd import FlashDMDError
from flashdmd.networks.offload import Offload, hook_base, stream_base


def load_device(cfg) -> torch.device | None:
    """Where the family loads its parts: the CPU when offloading, else the run's device (None)."""
    return torch.device("cpu") if cfg.model_offload != "none" else None


def check(cfg, sharded: bool, processes: int) -> None:
    """model_offload against the run: one process only (FSDP2's shards are the device's own; DDP wraps a module
    whose tensors are all on one device)."""
    if cfg.model_offload != "none" and (sharded or processes > 1):
        raise FlashDMDError(f"model_offload {cfg.model_offload} runs in one process (FSDP2 shards, and DDP wraps, "
                            f"modules whose tensors are all on the device), and this launch has {processes}: run on "
                            "one GPU, or set model_offload none (FSDP2 over several GPUs divides the base instead)")


def install(cfg, family) -> Offload | None:
    """The run's offloading right after the family loaded (on the CPU) and was quantised: text encoders and VAE homed,
    and under ``base`` the teacher's blocks streamed (the rest of the teacher on the device)."""
    if cfg.model_offload == "none":
        return None
    off = Offload(family.device)
    for i, encoder in enumerate(family.text_encoders):
        off.parts.add(f"text_encoder_{i}", encoder)
    off.parts.add("vae", family.vae)
    if cfg.model_offload == "base":
        off.groups = stream_base(family.denoiser, family.offload_blocks, family.device, family.name)
        hook_base(off.groups, [family.denoiser])
    return off


def settle(off: Offload | None, family) -> None:
    """Once the set-up's text cache is encoded (a run without one: at the same point of the set-up, before the
    denoiser's first use): the denoiser onto the device, but for its streamed blocks."""
    if off is not None:
        if family.text_encoders_released:   # their homed copies go with them
            off.parts.drop([n for n in off.parts.groups if n.startswith("text_encoder_")])
        off.place(family.denoiser)
        off.release()


def add_part(off: Offload | None, name: str, part: nn.Module | None, base: nn.Module) -> None:
    """Home a later frozen part (the Pixel-GAN backbone, the reward model) -- but for the base's tensors, which
    a teacher-initialised part shares and which stay as the base's own setting has them."""
    if off is not None and part is not None:
        shared = {id(t) for t in list(base.parameters()) + list(base.buffers())}
        off.parts.add(name, part, exclude=shared)


def hook(off: Offload | None, nets: list) -> None:
    """The streamed blocks' hooks on every module copy holding the base (student, fake score, reference, ...)."""
    if off is not None and off.groups:
        hook_base(off.groups, nets)


def place(off: Offload | None, net: nn.Module | None, device) -> nn.Module | None:
    """``net`` onto the run's device: all of it, or, when offloading, all but the homed tensors."""
    if net is None:
        return None
    return off.place(net) if off is not None else net.to(device)


def phase(off: Offload | None):
    """One phase's context (see the module docstring); a no-op without offloading."""
    return off.phase() if off is not None else contextlib.nullcontext()
