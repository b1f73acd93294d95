"""``model_offload`` in the plan: which frozen parts each traced phase reads and how often it calls the streamed base's
blocks -- recorded while the phase runs on the meta run (a dispatch mode sees every op's inputs; forward hooks see every
block call), not taken from a table -- and from them the weights resident during each phase and the bytes copied
host -> device per Stage-1 iteration and per RL update.

* ``frozen``: the text encoders, the VAE, the Pixel-GAN backbone and the Stage-2 reward model (their own tensors) are on
  the device only during a phase whose ops read one of their tensors, copied there once per such phase; the rest stays.
* ``base``: that, and the teacher's transformer blocks (the family's ``offload_blocks``, as the run streams them:
  :func:`flashdmd.networks.offload.base_blocks`) streamed: a block's frozen tensors are
  copied at each forward call of a block holding them -- the teacher's, and under a shared LoRA base the student's,
  fake score's and reference's, which hold the same tensors -- gradient-checkpointing recomputations included; at most
  2 blocks are on the device in a forward-only phase (the one computing, the one prefetched), 3 in a phase whose
  backward runs through them (a block output that requires grad), bounded by the largest blocks. What is not in a
  block (embedders, norms, the output projection) stays. A denoiser without top-level block lists (SDXL's UNet) cannot
  stream: one FlashDMDError line.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from flashdmd import FlashDMDError
from flashdmd.networks.quant import inner_tensors
from flashdmd.networks.offload import base_blocks, frozen_tensors
from flashdmd.training.memory.accounting import ROLE_ORDER, nbytes, weights_by_role
from flashdmd.training.memory.trace import ReadsOf

# the parts `frozen` keeps off the device between the phases that use them
OFFLOADED = ("text_encoders", "vae", "disc_backbone", "reward")
# the accounting's roles with the Pixel-GAN split into its frozen backbone (offloaded) and trainable heads ("disc")
ORDER = ROLE_ORDER[:ROLE_ORDER.index("disc")] + ("disc_backbone",) + ROLE_ORDER[ROLE_ORDER.index("disc"):]
H2D_GBPS = 25.0
H2D_NOTE = "an assumed host-to-device bandwidth (PCIe 4.0 x16, pinned memory), not a measurement"
STREAMING = ("teacher", "student", "fake_score", "reference", "reward")  # roles whose block calls copy streamed bytes


def _frozen_tensors(module: nn.Module):
    """The plain tensors holding the bytes of the tensors the run streams for ``module`` (offload.frozen_tensors)."""
    params, buffers = frozen_tensors(module)
    return [x for t in params + buffers for x in inner_tensors(t)]


def _keys(t: torch.Tensor) -> set[int]:
    """The storage keys an op may see for a held tensor: a quantised weight's own and its data's and scales'."""
    return {t.untyped_storage()._cdata} | {x.untyped_storage()._cdata for x in inner_tensors(t)}


def _owners(roles: dict) -> dict[int, str]:
    """storage key -> the role its bytes are attributed to (the first in ORDER holding it, as weights_by_role)."""
    out: dict[int, str] = {}
    for role in ORDER:
        module = roles.get(role)
        tensors = list(module.parameters()) + list(module.buffers()) if module is not None else []
        for t in tensors:
            for key in _keys(t):
                out.setdefault(key, role)
    return out


def _new_use() -> dict:
    return {"parts": [], "block_calls": 0, "block_bytes": 0, "base_backward": False}


class Residency:
    """The recorder for one meta run under ``model_offload`` ``mode`` (frozen / base): :meth:`update` with the run's
    roles (again when Stage 2 adds the reference and the reward model), :meth:`phase` around each traced phase."""

    def __init__(self, mode: str, roles: dict, family):
        self.mode, self._use = mode, None
        self._hooked: set[int] = set()
        self.streamed: set[int] = set()
        self.block_sizes: list[int] = []
        self.classes = tuple(family.offload_blocks)
        if mode == "base":
            # the run's own rule (networks/offload.py): the family's offload_blocks; none (SDXL's UNet) is an error
            blocks = base_blocks(roles["teacher"], family.offload_blocks)
            if not blocks:
                raise FlashDMDError(f"model_offload base: the {family.name} denoiser ({type(roles['teacher']).__name__})"
                                    " has no whole-block units to stream (gradient checkpointing must wrap each one); "
                                    "use model_offload frozen or model_frozen_quant int8")
            for blk in blocks:
                fresh = {x.untyped_storage()._cdata: nbytes(x) for x in _frozen_tensors(blk)}
                fresh = {k: n for k, n in fresh.items() if k not in self.streamed}
                self.streamed |= set(fresh)
                self.block_sizes.append(sum(fresh.values()))
            self.block_sizes.sort(reverse=True)
        self.update(roles)

    def update(self, roles: dict) -> None:
        disc = roles.get("disc")
        self.roles = dict(roles, disc_backbone=getattr(disc, "backbone", None))
        self.weights = weights_by_role(self.roles, ORDER)
        self.watch = {k: r for k, r in _owners(self.roles).items() if r in OFFLOADED}
        if self.mode == "base":
            for role in STREAMING:
                if self.roles.get(role) is not None:
                    self._hook(self.roles[role])

    def _hook(self, module: nn.Module) -> None:
        for blk in module.modules():
            if type(blk).__name__ not in self.classes or id(blk) in self._hooked:
                continue
            size = sum({x.untyped_storage()._cdata: nbytes(x) for x in _frozen_tensors(blk)
                        if x.untyped_storage()._cdata in self.streamed}.values())
            if size:
                self._hooked.add(id(blk))
                blk.register_forward_pre_hook(lambda m, a, size=size: self._called(size))
                blk.register_forward_hook(lambda m, a, out: self._returned(out))

    def _called(self, size: int) -> None:
        if self._use is not None:
            self._use["block_calls"] += 1
            self._use["block_bytes"] += size

    def _returned(self, out) -> None:
        if self._use is not None and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tree_leaves(out)):
            self._use["base_backward"] = True

    @contextmanager
    def phase(self):
        """Record one phase: yields its use -- the offloaded parts its ops read, its streamed block calls (forward
        and recomputation) and their bytes, whether a backward runs through the streamed blocks."""
        use, reads = _new_use(), ReadsOf(self.watch)
        self._use = use
        try:
            with reads:
                yield use
        finally:
            self._use = None
            use["parts"] = [p for p in OFFLOADED if p in reads.read]

    def resident(self, use: dict) -> dict[str, int]:
        """The weights on the device during a phase of ``use``, by role (ORDER)."""
        out = {r: (b if r not in OFFLOADED or r in use["parts"] else 0) for r, b in self.weights.items()}
        if self.mode == "base":
            k = 3 if use["base_backward"] else 2 if use["block_calls"] else 0
            out["teacher"] += sum(self.block_sizes[:k]) - sum(self.block_sizes)
        return out

    def transfer(self, use: dict) -> int:
        """Bytes copied host -> device in a phase of ``use``: each offloaded part it reads once, each block call's."""
        return sum(self.weights[p] for p in use["parts"]) + use["block_bytes"]

    def base_bytes(self) -> dict:
        """The streamed base in the plan's JSON: its bytes, its non-block rest, its largest blocks."""
        if self.mode != "base":
            return {}
        streamed = sum(self.block_sizes)
        return {"streamed_bytes": streamed, "non_block_bytes": self.weights["teacher"] - streamed,
                "blocks": len(self.block_sizes), "largest_block_bytes": self.block_sizes[:3]}


def transfers(res: Residency, stage1: dict, stage2: dict | None, ttur: int, gbps: float) -> dict:
    """Bytes host -> device per Stage-1 iteration -- the mean over a cycle of ``ttur`` iterations, one of which runs
    the generator phase (at the mean of its step draw) and the others the no-grad rollout -- and per RL update, and
    the seconds each takes at ``gbps`` (an assumption: the GPU check measures it)."""
    def seconds(b):
        return round(b / (gbps * 1e9), 3)
    per_phase = {n: res.transfer(p["use"]) for n, p in stage1["phases"].items()}
    ro = stage1["rollouts"]
    rollout = sum(ro["bytes"].values()) / len(ro["bytes"])  # linear in the step k: the mean of its ends
    generator = per_phase["generator"] + rollout - ro["bytes"][ro["generator_k"]]
    others = sum(b for n, b in per_phase.items() if n != "generator")
    cycle = ttur * others + generator + (ttur - 1) * rollout
    out = {"mode": res.mode, "h2d_gbps": gbps, "h2d_note": H2D_NOTE, "base": res.base_bytes(),
           "stage1": {"per_phase_bytes": per_phase, "rollout_bytes": int(rollout),
                      "generator_mean_bytes": int(generator), "cycle_iterations": ttur, "per_cycle_bytes": int(cycle),
                      "per_iteration_bytes": int(cycle / ttur), "per_iteration_seconds": seconds(cycle / ttur),
                      "block_calls": {n: p["use"]["block_calls"] for n, p in stage1["phases"].items()}}}
    if stage2 is not None:
        rl = {n: res.transfer(p["use"]) for n, p in stage2["phases"].items()}
        out["stage2"] = {"per_phase_bytes": rl, "per_rl_update_bytes": sum(rl.values()),
                         "per_rl_update_seconds": seconds(sum(rl.values())),
                         "block_calls": {n: p["use"]["block_calls"] for n, p in stage2["phases"].items()}}
    return out


def _size(b: float) -> str:
    return f"{b / 2 ** 30:.1f} GiB" if b >= 2 ** 30 / 10 else f"{b / 2 ** 20:.1f} MiB"


def transfer_line(result: dict) -> str | None:
    """One line for `plan`'s output under the headline: the offloaded bytes per iteration and their time."""
    t = result.get("transfers")
    if not t:
        return None
    s1 = t["stage1"]
    line = (f"offload {t['mode']}: {_size(s1['per_iteration_bytes'])} host->device per Stage-1 iteration "
            f"({s1['per_iteration_seconds']:.3g} s")
    if "stage2" in t:
        s2 = t["stage2"]
        line += f"), {_size(s2['per_rl_update_bytes'])} per RL update ({s2['per_rl_update_seconds']:.3g} s"
    return line + f") at {t['h2d_gbps']:g} GB/s, {t['h2d_note']}; prefetch overlaps it with compute on a GPU"
