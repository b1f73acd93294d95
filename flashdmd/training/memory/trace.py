"""The tracer: live bytes of the tensors a step creates on the meta device, with fused attention as the kernels hold
it. Nothing here knows the step: it runs whatever function it is given (:func:`trace_phase`)."""
from __future__ import annotations

import weakref
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode, _get_current_dispatch_mode_stack


class _Uncacheable(Exception):
    pass


_SCALARS = (bool, int, float, str, torch.dtype, torch.device, torch.layout, torch.memory_format, type(None))


def _sig(x):
    """A hashable signature of an op argument on the meta device: a tensor's dtype, shape, strides and offset (all a
    meta kernel reads), a scalar's type and value, a list's items; anything else is not cacheable."""
    if isinstance(x, torch.Tensor):
        if (type(x) is not torch.Tensor and type(x) is not nn.Parameter) or x.device.type != "meta" \
                or x.layout is not torch.strided or x.is_conj() or x.is_neg():
            raise _Uncacheable
        return x.dtype, x.shape, x.stride(), x.storage_offset()
    if isinstance(x, (list, tuple)):
        return type(x), tuple(_sig(y) for y in x)
    if isinstance(x, _SCALARS):
        return type(x), x
    raise _Uncacheable


class MetaKernelCache:
    """What torch's meta kernels return, keyed by the op and its arguments' metadata. On the meta device an op's
    outputs are fully determined by that (dtypes, shapes, strides), and many of torch's meta kernels are Python
    decompositions (group norm, layer norm, addmm: 0.5-4 ms a call), run again for every block of the same shape.
    A hit makes the same outputs with ``empty_strided``: the same metadata and storage bytes, so the trace's numbers
    do not change. Only ops that are pure by their schema (no mutation, no aliased or random outputs) and whose
    outputs were, when first run, fresh storages of exactly their strided size are cached; any other op always runs.
    Real tensors (``LiveBytes("cpu")``) never reach it, nor do ops while a dispatch mode that cannot be shown a hit
    (no ``observe``) is below the tracer."""

    def __init__(self, max_entries: int = 100_000):
        self.enabled = True
        self.hits = 0
        self.max_entries = max_entries
        self.entries: dict = {}
        self.never: set = set()  # ops whose outputs alias or are not plain tensors: always run

    def _pure(self, func) -> bool:
        s = func._schema
        return not (func in self.never or s.is_mutable or any(r.alias_info is not None for r in s.returns)
                    or torch.Tag.nondeterministic_seeded in func.tags)

    def __call__(self, func, args, kwargs):
        if not (self.enabled and self._pure(func)):
            return func(*args, **kwargs)
        try:
            # the default dtype: what a factory op (empty, full, arange) without one makes
            key = (func, torch.get_default_dtype(), _sig(args), tuple((k, _sig(v)) for k, v in kwargs.items()))
        except _Uncacheable:
            return func(*args, **kwargs)
        hit = self.entries.get(key)
        if hit is not None:
            self.hits += 1
            spec, leaves = hit
            return torch.utils._pytree.tree_unflatten(
                [torch.empty_strided(v[1], v[2], dtype=v[0], device="meta") if isinstance(v, tuple) else v
                 for v in leaves], spec)
        out = func(*args, **kwargs)
        leaves, spec = torch.utils._pytree.tree_flatten(out)
        try:
            recorded = self._record(leaves, args, kwargs)
        except _Uncacheable:  # e.g. a factory op asked for a CPU tensor: only this call is not kept
            return out
        if recorded is None:
            self.never.add(func)
        else:
            if len(self.entries) >= self.max_entries:
                self.entries.clear()
            self.entries[key] = (spec, recorded)
        return out

    @staticmethod
    def _record(leaves, args, kwargs) -> list | None:
        """Each output as (dtype, shape, stride), or a scalar as itself; None when an output is not a fresh meta
        tensor of exactly its strided size (it shares an input's or another output's storage, or has more)."""
        seen = {t.untyped_storage()._cdata for t in torch.utils._pytree.tree_leaves((args, kwargs))
                if isinstance(t, torch.Tensor)}
        recorded = []
        for t in leaves:
            if not isinstance(t, torch.Tensor):
                if not isinstance(t, _SCALARS):
                    return None
                recorded.append(t)
                continue
            _sig(t)  # a plain strided meta tensor, or _Uncacheable
            st = t.untyped_storage()
            fresh = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")
            if st._cdata in seen or t.storage_offset() != 0 or st.nbytes() != fresh.untyped_storage().nbytes():
                return None
            seen.add(st._cdata)
            recorded.append((t.dtype, t.shape, t.stride()))
        return recorded


META_KERNELS = MetaKernelCache()


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of the distinct storages that ops create on ``device`` while active, each until it is
    freed; ``peak`` is the largest total seen. Storages that existed before (weights, inputs) are not counted: an
    op's output is new only when it shares no storage with the op's inputs."""

    def __init__(self, device: str = "meta"):
        super().__init__()
        self.device = torch.device(device)
        self.live = 0
        self.peak = 0
        self._held: dict[int, object] = {}

    def _track(self, t: torch.Tensor) -> None:
        if t.device != self.device:
            return
        st = t.untyped_storage()
        key = st._cdata
        if key in self._held:
            return
        n = st.nbytes()
        self.live += n
        self.peak = max(self.peak, self.live)

        def freed(_ref, key=key, n=n):
            if self._held.pop(key, None) is not None:
                self.live -= n
        self._held[key] = weakref.ref(st, freed)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        # a cache hit does not call the op, so the modes below this one (residency's ReadsOf under model_offload)
        # would not see it: the cache only when each of them can be shown the op (``observe``, idempotent: on a miss
        # the op reaches them again)
        below = _get_current_dispatch_mode_stack() if torch._C._len_torch_dispatch_stack() else ()
        if self.device.type == "meta" and all(hasattr(m, "observe") for m in below):
            for m in below:
                m.observe(func, args, kwargs)
            out = META_KERNELS(func, args, kwargs)
        else:
            out = func(*args, **kwargs)
        # an output sharing an input's storage (a view, an in-place op) allocates nothing: only new storages count
        inputs = {t.untyped_storage()._cdata for t in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage()._cdata not in inputs:
                self._track(t)
        return out

    def reset_peak(self) -> None:
        self.peak = self.live


class ReadsOf(TorchDispatchMode):
    """Records which of the ``watch``ed storages (storage key -> label) ops read while active: ``read``, the labels."""

    def __init__(self, watch: dict[int, str]):
        super().__init__()
        self.watch = watch
        self.read: set[str] = set()

    def observe(self, func, args, kwargs) -> None:
        """Record the watched storages an op reads (idempotent: the tracer above may show it an op twice)."""
        for a in (*args, *(kwargs or {}).values()):  # an op's tensors: its arguments, or in a list of them
            for t in a if isinstance(a, (list, tuple)) else (a,):
                if isinstance(t, torch.Tensor):
                    label = self.watch.get(t.untyped_storage()._cdata)
                    if label is not None:
                        self.read.add(label)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.observe(func, args, kwargs)
        return func(*args, **(kwargs or {}))


class _FusedAttention(torch.autograd.Function):
    """Shapes and saved tensors of a fused (flash / memory-efficient) attention kernel, for meta tensors."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = q.new_empty(q.shape[:-1] + (v.shape[-1],))
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


@contextmanager
def fused_attention():
    """Inside: F.scaled_dot_product_attention on meta tensors without a mask, or with a key-padding mask (one row
    broadcast over the queries: the padded text of Qwen-Image-style language-model encoders), counts as a fused kernel
    (CUDA's memory-efficient and the CPU flash kernels take such masks; the mask itself is the caller's tensor)."""
    original = F.scaled_dot_product_attention

    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw):
        # torch's own parameter names: diffusers' attention dispatcher (FLUX) passes them as keywords
        if query.device.type == "meta" and (attn_mask is None or (attn_mask.dim() >= 2 and attn_mask.shape[-2] == 1)):
            return _FusedAttention.apply(query, key, value)
        return original(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                        **kw)
    F.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


def grad_bytes(modules) -> int:
    return sum(p.grad.untyped_storage().nbytes() for m in modules if m is not None for p in m.parameters()
               if p.grad is not None)


def clear_grads(modules) -> None:
    for m in modules:
        if m is not None:
            for p in m.parameters():
                p.grad = None


def trace_phase(fn, *args) -> tuple[int, int, object]:
    """Run ``fn(*args) -> (the modules it updates, its outputs)`` under the tracer: (the peak bytes its tensors
    reach, the bytes of the gradients it leaves on those modules, its outputs). The gradients are then freed, as
    the run's optimiser step frees them (training/optim.py)."""
    tracker = LiveBytes("meta")
    with fused_attention(), tracker:
        updated, outputs = fn(*args)
    modules = list({id(m): m for m in updated if m is not None}.values())
    grads = grad_bytes(modules)
    clear_grads(modules)
    return tracker.peak, grads, outputs
