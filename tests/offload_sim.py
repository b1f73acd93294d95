"""Offloading made visible on a CPU: every onload and offload of a diffusers ModuleGroup (flashdmd.networks.offload)
becomes a real copy into fresh storage, and every op that reads the storage of an offloaded (CPU-homed) tensor is
recorded. On a GPU such an op is a device mismatch (or, for an async copy not waited for, stale data); here the
computation goes on (the values are equal) and the test asserts that none happened."""
from __future__ import annotations

import contextlib

import torch
from diffusers.hooks.group_offloading import ModuleGroup
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


def _ptr(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


class Residency(TorchDispatchMode):
    """Active while a run trains: ``violations`` lists (op, shape) of every read of a homed storage; ``onloads``
    counts onloads per group leader's class."""

    def __init__(self):
        super().__init__()
        self.homed: set[int] = set()
        # id(tensor) -> (the tensor, its CPU home), both kept alive: no id and no address is reused
        self.home: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.violations: list[str] = []
        self.onloads: dict[str, int] = {}
        self.moving = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.moving and not func.is_view:   # a view (detach, t, reshape...) reads no data; its user does
            for t in tree_flatten((args, kwargs or {}))[0]:
                if isinstance(t, torch.Tensor) and t.device.type == "cpu" and t.numel() and _ptr(t) in self.homed:
                    self.violations.append(f"{func} reads an offloaded {tuple(t.shape)}")
        return func(*args, **(kwargs or {}))

    def _tensors(self, group: ModuleGroup) -> list:
        return list(group.parameters) + list(group.buffers)

    def offload(self, group: ModuleGroup) -> None:
        self.moving = True
        try:
            for t in self._tensors(group):
                if id(t) not in self.home:
                    self.home[id(t)] = (t, t.data.clone())
                    self.homed.add(_ptr(self.home[id(t)][1]))
                t.data = self.home[id(t)][1]
        finally:
            self.moving = False

    def onload(self, group: ModuleGroup) -> None:
        self.moving = True
        try:
            for t in self._tensors(group):
                if _ptr(t) in self.homed:   # not resident yet: a fresh "device" copy
                    t.data = t.data.clone()
            name = type(group.offload_leader).__name__
            self.onloads[name] = self.onloads.get(name, 0) + 1
        finally:
            self.moving = False


@contextlib.contextmanager
def simulated(monkeypatch):
    """Patch ModuleGroup's moves to :class:`Residency`'s copies for the duration; yields the Residency (enter it as a
    dispatch mode around the work to check)."""
    res = Residency()
    monkeypatch.setattr(ModuleGroup, "offload_", lambda self: res.offload(self))
    monkeypatch.setattr(ModuleGroup, "onload_", lambda self: res.onload(self))
    yield res
