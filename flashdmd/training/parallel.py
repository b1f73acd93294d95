"""What differs between one process, DDP and FSDP, in one place.

* **Preparing.** Each trainable role is handed to ``accelerate`` together with its own optimiser(s), one model
  per ``prepare`` call: accelerate's FSDP path shards exactly one model per call and rebinds that call's
  optimisers to the sharded parameters (DDP and one process do not care). FSDP means FSDP2
  (``fsdp_version: 2`` in the accelerate config): its parameters stay named as in the plain module, so the
  EMA pull, gradient clipping and checkpoints need no special names. FSDP1 is refused with a one-line error.
* **Full state.** Checkpoints and the saved student hold full (unsharded) tensors, gathered with
  ``torch.distributed.checkpoint.state_dict`` (a collective: every rank calls it) and loaded back the same way;
  in one process and under DDP those functions return / load the plain ``state_dict``.
* **Replicas.** Whatever runs on rank 0 only (sample grids, evaluation, the saved student) and the frozen
  Stage-2 reference use an unsharded replica of the student, built from the teacher's architecture and the
  gathered weights, so that no rank-0-only forward ever waits on a collective.

tests/test_distributed.py runs 2 CPU processes with the student and fake score sharded by FSDP2's
``fully_shard`` (accelerate only enables its FSDP plugin on GPUs) and checks weights and checkpoints against one
process.
"""
from __future__ import annotations

import copy

import torch
from accelerate.utils import DistributedType
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)

from flashdmd import FlashDMDError
from flashdmd.training.roles import add_lora, copy_sharing_frozen, shares_base

try:  # FSDP2's public API (torch >= 2.6); with an older torch nothing is sharded by it
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import distribute_tensor
except ImportError:  # pragma: no cover
    FSDPModule, distribute_tensor = (), None

_WRAPPERS = {"module", "_orig_mod", "_checkpoint_wrapped_module", "_fsdp_wrapped_module"}  # DDP, compile, AC, FSDP1


def is_sharded(module: nn.Module) -> bool:
    """True when ``module`` (or a submodule) is sharded by FSDP2's ``fully_shard``."""
    return any(isinstance(m, FSDPModule) for m in module.modules())


def reshard(*modules: nn.Module) -> None:
    """Put FSDP2 modules back into their sharded state (a root stays unsharded after a no-grad forward), so that
    parameter-wise updates such as the EMA pull see matching DTensors. A no-op for unsharded modules."""
    for module in modules:
        for m in module.modules():
            if isinstance(m, FSDPModule):
                m.reshard()


def check_supported(accelerator) -> None:
    if accelerator.distributed_type == DistributedType.FSDP and not accelerator.is_fsdp2:
        raise FlashDMDError("FSDP1 is not supported: set fsdp_version: 2 in your accelerate config "
                            "(flashdmd relies on FSDP2's plain parameter names for the EMA pull and checkpoints)")


def prepare_role(accelerator, module: nn.Module | None, optimizers: list, placement: bool = True):
    """``accelerate.prepare`` for one model and its optimisers. A module already sharded by ``fully_shard``
    (tests, or a caller that shards itself) keeps its sharding: only its optimisers are wrapped. ``placement``
    False: accelerate does not move the module (model_offload placed it, homed tensors on the CPU)."""
    if module is None:
        return None, [accelerator.prepare(o) for o in optimizers]
    if is_sharded(module):
        return module, [accelerator.prepare(o) for o in optimizers]
    out = accelerator.prepare(module, *optimizers, device_placement=[placement] * (1 + len(optimizers)))
    out = list(out) if isinstance(out, (list, tuple)) else [out]
    return out[0], out[1:]


def canonical(name: str) -> str:
    """A parameter name without the path components that wrappers insert ("module.up.0" -> "up.0")."""
    return ".".join(c for c in name.split(".") if c not in _WRAPPERS)


def _options(**kw):
    return StateDictOptions(**kw)


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def full_state_dict(module: nn.Module, all_ranks: bool = False) -> dict:
    """Full CPU tensors of ``module`` by canonical name. A collective under FSDP: every rank must call it;
    only rank 0 gets the tensors unless ``all_ranks``. In one process / DDP: the plain state dict."""
    if not is_sharded(module):
        return {canonical(k): v.detach() for k, v in module.state_dict().items()}
    sd = get_model_state_dict(module, options=_options(full_state_dict=True, cpu_offload=not all_ranks))
    return {canonical(k): v.detach().cpu() if torch.is_tensor(v) else v for k, v in sd.items()}


def load_full_state_dict(module: nn.Module, state: dict) -> None:
    """Load full tensors (a subset of the module's names) into ``module``, sharding them under FSDP."""
    if not is_sharded(module):
        target = module.module if hasattr(module, "module") and isinstance(module.module, nn.Module) else module
        target.load_state_dict(state, strict=False)
        return
    set_model_state_dict(module, state, options=_options(full_state_dict=True, strict=False))


def full_optimizer_state(module: nn.Module, opt) -> dict:
    """The optimiser's state with parameters named (canonical names of ``module``'s parameters), full tensors.
    Collective under FSDP (only rank 0 gets the state; the others get {}). A parameter that never received a
    gradient has no state (AdamW creates it lazily)."""
    inner = getattr(opt, "optimizer", opt)
    if not is_sharded(module):
        names = {id(p): canonical(n) for n, p in module.named_parameters()}
        order = [names[id(p)] for g in inner.param_groups for p in g["params"]]
        sd = inner.state_dict()
        return {"state": {order[i]: st for i, st in sd["state"].items()},
                "param_groups": [{**g, "params": [order[i] for i in g["params"]]} for g in sd["param_groups"]]}
    sd = get_optimizer_state_dict(module, inner, options=_options(full_state_dict=True, cpu_offload=True))
    if "state" not in sd:  # FSDP: ranks other than 0 get nothing
        return {}
    return {"state": {canonical(k): v for k, v in sd["state"].items()},
            "param_groups": [{**g, "params": [canonical(p) for p in g["params"]]} for g in sd["param_groups"]]}


def load_full_optimizer_state(module: nn.Module, opt, state: dict) -> None:
    """Inverse of :func:`full_optimizer_state`. Raises ValueError when the saved parameter groups name other
    parameters than this optimiser holds (another config). Parameters without saved state get fresh state."""
    inner = getattr(opt, "optimizer", opt)
    names = {id(p): canonical(n) for n, p in module.named_parameters()}
    mine = [[names[id(p)] for p in g["params"]] for g in inner.param_groups]
    if mine != [list(g["params"]) for g in state["param_groups"]]:
        raise ValueError("the saved optimiser holds other parameters than this run's")
    if not is_sharded(module):
        flat = [n for g in mine for n in g]
        index = {n: i for i, n in enumerate(flat)}
        groups, start = [], 0
        for g_saved, g in zip(state["param_groups"], mine):
            groups.append({**{k: v for k, v in g_saved.items() if k != "params"},
                           "params": list(range(start, start + len(g)))})
            start += len(g)
        inner.load_state_dict({"state": {index[n]: st for n, st in state["state"].items()}, "param_groups": groups})
        return
    set_optimizer_state_dict(module, inner, state, options=_options(full_state_dict=True, strict=False))


def clip_grad_norm_(params, max_norm: float) -> torch.Tensor:
    """Clip the gradients of ``params`` to one global norm; returns that norm (a plain tensor).

    Plain parameters: ``torch.nn.utils.clip_grad_norm_``. With FSDP2 (DTensor) parameters, possibly mixed with
    plain ones (DMD2's replicated classifier head next to the sharded fake score): the norm of each kind is
    computed separately (the DTensor one across shards), combined, and every gradient scaled by the same
    factor, as ``clip_grad_norm_`` does."""
    params = [p for p in params if p.grad is not None]
    if not any(hasattr(p, "to_local") for p in params):
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    norms = []
    for group in ([p for p in params if hasattr(p, "to_local")], [p for p in params if not hasattr(p, "to_local")]):
        if group:
            n = torch.nn.utils.get_total_norm([p.grad for p in group])
            norms.append(n.full_tensor() if hasattr(n, "full_tensor") else n)
    total = torch.linalg.vector_norm(torch.stack([n.double().cpu() for n in norms]))  # the roles' own precision or better
    coef = min(1.0, max_norm / (float(total) + 1e-6))
    if coef < 1.0:
        for p in params:
            p.grad.mul_(coef)
    return total


def all_true(flag: bool, device) -> bool:
    """``flag`` AND-ed across processes (one all-reduce; in one process: ``flag``)."""
    if not _distributed():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
    return bool(t.item() > 0)


def max_across(value: int, device) -> int:
    """The largest of the processes' ``value`` (one all-reduce of one integer; in one process: ``value``)."""
    if not _distributed():
        return int(value)
    t = torch.tensor([int(value)], dtype=torch.int64, device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return int(t.item())


def local_tensors(module: nn.Module, trainable_only: bool = True):
    """This rank's part of each (trainable) parameter: the local shard under FSDP2."""
    for p in module.parameters():
        if p.requires_grad or not trainable_only:
            yield p.to_local() if hasattr(p, "to_local") else p


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A full CPU copy of a plain or DTensor tensor (a collective for DTensors: every rank calls it)."""
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().cpu().clone()


def like(full: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``full`` laid out like ``ref``: sharded the same way when ``ref`` is a DTensor."""
    if hasattr(ref, "device_mesh"):
        return distribute_tensor(full.to(ref.device, ref.dtype), ref.device_mesh, ref.placements)
    return full.to(ref.device, ref.dtype)


def replica(setup, module: nn.Module, all_ranks: bool = False) -> nn.Module | None:
    """An unsharded copy of the student-like ``module`` (student or fake score) for rank-0-only work; ``setup``: the
    run's :class:`flashdmd.training.setup.RunSetup` (its accelerator, config, teacher and family).

    Not sharded: the module itself (unwrapped from DDP), no copy. Sharded: a collective; rank 0 (every rank with
    ``all_ranks``) gets a fresh copy of the teacher's architecture (with the run's LoRA adapters) holding the
    gathered weights; other ranks get None."""
    acc, cfg = setup.accelerator, setup.cfg
    if not is_sharded(module):
        return acc.unwrap_model(module)
    state = full_state_dict(module, all_ranks=all_ranks)
    if not (all_ranks or acc.is_main_process):
        return None
    net = copy_sharing_frozen(setup.teacher) if shares_base(cfg) else copy.deepcopy(setup.teacher)
    if cfg.model_lora_rank > 0:
        add_lora(net, cfg.model_lora_rank, cfg.model_lora_alpha, setup.family.dtype)
    if shares_base(cfg):  # the base is the teacher's own tensors: load only the adapters
        trainable = {n for n, p in net.named_parameters() if p.requires_grad}
        state = {k: v for k, v in state.items() if k in trainable}
    missing = set(state) - set(net.state_dict())
    if missing:
        raise FlashDMDError(f"internal: gathered student has tensors the replica lacks, e.g. {sorted(missing)[0]}")
    net.load_state_dict(state, strict=False)
    return net.to(acc.device)
