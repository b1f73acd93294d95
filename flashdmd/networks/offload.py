"""Frozen weights held on the CPU between their uses (``model_offload``), through diffusers' group offloading; the one
place flashdmd calls it.

Two granularities, both on :class:`diffusers.hooks.group_offloading.ModuleGroup` -- on CUDA a pinned CPU copy of
every tensor, copied onto the device without blocking on a side stream (``record_stream``, so the caching allocator
does not reuse a block the compute stream still reads) and dropped, not copied back, when offloaded (frozen tensors
never change); on the CPU the moves are no-ops:

* :class:`FrozenParts` (``frozen``) -- a whole part (a text encoder, the VAE, the Pixel-GAN backbone, a reward model)
  is one group, onloaded at its first use inside a :meth:`FrozenParts.phase` and offloaded when that phase ends. Phases
  nest; a part onloaded by an outer phase stays for the inner one. A part used outside every phase stays until
  :meth:`FrozenParts.release`.
* :func:`stream_base` (``base``) -- the frozen base (the teacher; under LoRA also the student's and the fake score's
  base, the Stage-2 reference's and a teacher-initialised reward model's) streamed block by block: one group per block
  of the family's ``offload_blocks`` classes, holding only the block's FROZEN tensors (adapters stay on the device),
  registered on every module of the run that holds those tensors, onloaded at the block's forward and offloaded after
  it, the next block (the previous one in backward's recomputation) prefetched. What is not in a block (embedders,
  norms, the output projection) stays on the device. A block's weights saved for backward would be offloaded before
  backward reads them, so a base that is differentiated through (the student's and fake score's under LoRA) must be
  gradient-checkpointed per block: its weights then come back with the recomputation (the config enforces it).

Tests check every use against the residency on the CPU by making each offload a real copy (tests/test_offload.py).
"""
from __future__ import annotations

import contextlib
import copy

import torch
from diffusers.hooks import HookRegistry
from diffusers.hooks.group_offloading import GroupOffloadingHook, ModuleGroup
from torch import nn

from flashdmd import FlashDMDError

GROUP_HOOK = "group_offloading"   # diffusers' registry name of a GroupOffloadingHook (its _GROUP_OFFLOADING)


def _stream(device: torch.device):
    """The side stream of one set of groups (prefetching synchronises on it, so a set shares one); None on the CPU."""
    return torch.cuda.Stream(device) if device.type == "cuda" else None


def _group(leader: nn.Module, params: list, buffers: list, device: torch.device, stream) -> ModuleGroup:
    """One diffusers group of ``params`` and ``buffers`` (not whole modules: an adapter inside stays put), homed on
    the CPU, onloaded to ``device``."""
    group = ModuleGroup(modules=[], offload_device=torch.device("cpu"), onload_device=device, offload_leader=leader,
                        onload_leader=leader, parameters=params, buffers=buffers, non_blocking=stream is not None,
                        stream=stream, record_stream=stream is not None, onload_self=True)
    group.offload_()
    return group


def _onload(group: ModuleGroup) -> None:
    group.onload_()
    if group.stream is not None:  # the compute stream waits for the copy
        torch.cuda.current_stream(group.onload_device).wait_stream(group.stream)


def frozen_tensors(module: nn.Module, exclude: set[int] = frozenset()) -> tuple[list, list]:
    """(frozen parameters, buffers) of ``module``, each once, but for those whose id is in ``exclude``."""
    params = {id(p): p for p in module.parameters() if not p.requires_grad and id(p) not in exclude}
    buffers = {id(b): b for b in module.buffers() if id(b) not in exclude}
    return list(params.values()), list(buffers.values())


class FrozenParts:
    """``model_offload: frozen``: named frozen parts homed on the CPU, each onloaded at its first use in a phase."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.groups: dict[str, ModuleGroup] = {}
        self.stream = _stream(self.device)
        self.resident: set[str] = set()
        self._phases: list[set[str]] = [set()]   # the outermost set: parts used outside every phase

    def add(self, name: str, part: nn.Module | None, exclude: set[int] = frozenset()) -> None:
        """Home ``part``'s frozen tensors (but those in ``exclude``: another part's, e.g. the shared base) on the CPU
        and onload them at the first forward of any of its modules inside a phase."""
        if part is None or name in self.groups:
            return
        params, buffers = frozen_tensors(part, exclude)
        if not params and not buffers:
            return
        self.groups[name] = _group(part, params, buffers, self.device, self.stream)
        for m in part.modules():
            m.register_forward_pre_hook(lambda *_, n=name: self.use(n))

    def use(self, name: str) -> None:
        if name not in self.resident:
            _onload(self.groups[name])
            self.resident.add(name)
            self._phases[-1].add(name)

    @contextlib.contextmanager
    def phase(self):
        """Parts first used inside go back to the CPU when it ends (an exception included)."""
        self._phases.append(set())
        try:
            yield
        finally:
            self._offload(self._phases.pop())

    def drop(self, names: list[str]) -> None:
        """Forget parts that are gone (the text encoders once the text cache is built)."""
        for name in names:
            self.groups.pop(name, None)
            self.resident.discard(name)
            for level in self._phases:
                level.discard(name)

    def release(self) -> None:
        """Offload the parts used outside every phase (set-up work: calibration, the text cache)."""
        self._offload(self._phases[0])
        self._phases[0] = set()

    def _offload(self, names: set[str]) -> None:
        for name in names:
            self.groups[name].offload_()
            self.resident.discard(name)


class _BlockHook(GroupOffloadingHook):
    """diffusers' hook for one block's group, shared by every module holding the block's tensors (the teacher's block
    and its LoRA copies): whichever of them runs leads the group, and the prefetched neighbour is the next block in a
    forward and the previous one during backward's recomputation."""

    def __init__(self, group: ModuleGroup, config, order: dict):
        super().__init__(group, config=config)
        self.order = order   # {"next": ModuleGroup | None, "prev": ModuleGroup | None}, shared by the block's hooks

    def pre_forward(self, module, *args, **kwargs):
        self.group.onload_leader = self.group.offload_leader = module
        backward = torch._C._current_graph_task_id() != -1
        self.next_group = self.order["prev" if backward else "next"]
        return super().pre_forward(module, *args, **kwargs)


def base_blocks(net: nn.Module, classes: tuple[str, ...]) -> list[nn.Module]:
    """``net``'s blocks of the named classes, outermost only, in module order."""
    out, inside = [], set()
    for name, m in net.named_modules():
        if any(name.startswith(p + ".") for p in inside):
            continue
        if type(m).__name__ in classes:
            out.append(m)
            inside.add(name)
    return out


def stream_base(teacher: nn.Module, classes: tuple[str, ...], device: torch.device, family_name: str) -> list:
    """Home the teacher's block tensors on the CPU as one diffusers group per block (in block order) and move the
    rest of the teacher to ``device``. Call before the roles are cloned from the teacher; :func:`hook_base` then hooks
    every module holding the blocks' tensors."""
    blocks = base_blocks(teacher, classes)
    if not blocks:
        raise FlashDMDError(f"model_offload base: the {family_name} denoiser ({type(teacher).__name__}) has no "
                            "whole-block units to stream (gradient checkpointing must wrap each one); use "
                            "model_offload frozen or model_frozen_quant int8")
    in_blocks = {id(m) for b in blocks for m in b.modules()}
    for m in teacher.modules():   # what no block holds goes to the device, module by module (its own tensors only)
        if id(m) not in in_blocks:
            m._apply(lambda t: t.to(device), recurse=False)
    stream = _stream(torch.device(device))
    return [_group(b, *frozen_tensors(b), torch.device(device), stream) for b in blocks]


def hook_base(groups: list, nets: list[nn.Module | None]) -> None:
    """Register each block's hook on the blocks of ``nets`` that hold its tensors: the teacher and its module copies
    sharing the frozen base (the student, the fake score, the Stage-2 reference, a teacher-initialised reward model).
    A module hooked already keeps its hook."""
    owner = {id(t): g for g in groups for t in g.parameters + g.buffers}
    classes = tuple({type(g.offload_leader).__name__ for g in groups})
    for net in (n for n in nets if n is not None):
        pairs = []
        for block in base_blocks(net, classes):
            params, buffers = frozen_tensors(block)
            group = next((owner[id(t)] for t in params + buffers if id(t) in owner), None)
            if group is not None:
                pairs.append((block, group))
        _hook([b for b, _ in pairs], [g for _, g in pairs])


def _hook(blocks: list, groups: list) -> None:
    order = {id(g): {"next": groups[i + 1] if i + 1 < len(groups) else None, "prev": groups[i - 1] if i else None}
             for i, g in enumerate(groups)}
    for b, g in zip(blocks, groups):
        registry = HookRegistry.check_if_exists_or_initialize(b)
        if registry.get_hook(GROUP_HOOK) is None:
            registry.register_hook(_BlockHook(g, _Config(g.onload_device), order[id(g)]), GROUP_HOOK)
        g.onload_self = False   # prefetched by a neighbour, else onloaded by the hook's own fallback


def deepcopy_hooked(net: nn.Module, memo: dict) -> nn.Module:
    """``copy.deepcopy(net, memo)`` that gives the copy's blocks hooks of their own on the same groups: a deep copy of
    diffusers' hooks would keep calling the ORIGINAL module's forward. The hooks come off for the copy and back on."""
    hooked = [(m, m._diffusers_hook.get_hook(GROUP_HOOK)) for m in net.modules()
              if getattr(m, "_diffusers_hook", None) is not None and m._diffusers_hook.get_hook(GROUP_HOOK)]
    if not hooked:
        return copy.deepcopy(net, memo)
    for m, _ in hooked:
        m._diffusers_hook.remove_hook(GROUP_HOOK, recurse=False)
    try:
        new = copy.deepcopy(net, memo)
    finally:
        for m, hook in hooked:
            m._diffusers_hook.register_hook(hook, GROUP_HOOK)
    hook_base(list({id(h.group): h.group for _, h in hooked}.values()), [new])
    return new


class _Config:
    """The few fields of diffusers' GroupOffloadingConfig its hook reads."""

    def __init__(self, device):
        self.onload_device = device
        self.exclude_kwargs = None


class Offload:
    """A run's offloading: the frozen parts (:class:`FrozenParts`) and the base's block groups (:func:`stream_base`,
    empty unless ``base``). ``place`` moves a module to the device but for the tensors homed on the CPU."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.parts = FrozenParts(self.device)
        self.groups: list[ModuleGroup] = []

    def homed(self) -> set[int]:
        """ids of every tensor homed on the CPU (a part's or a block's)."""
        groups = list(self.parts.groups.values()) + self.groups
        return {id(t) for g in groups for t in g.parameters + g.buffers}

    def place(self, net: nn.Module) -> nn.Module:
        """``net`` onto the device, every tensor but the homed ones (``net.to(device)`` would move those too)."""
        homed = self.homed()
        for m in net.modules():
            own = [t for t in list(m._parameters.values()) + list(m._buffers.values()) if t is not None]
            kept = [id(t) in homed for t in own]
            if any(kept) and not all(kept):
                raise FlashDMDError(f"model_offload: {type(m).__name__} holds both offloaded and resident tensors")
            if not any(kept):   # a module's own tensors are all homed (a frozen layer) or none (adapters, heads)
                m._apply(lambda t: t.to(self.device), recurse=False)
        return net

    def phase(self):
        return self.parts.phase()

    def release(self) -> None:
        self.parts.release()
