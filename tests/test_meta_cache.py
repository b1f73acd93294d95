"""The tracer's cache of meta-kernel outputs (training/memory/trace.py, MetaKernelCache): a hit gives the tensors
torch's own meta kernel gives (dtype, shape, strides, storage bytes), ops that alias, mutate or draw random numbers
always run, a dispatch mode below the tracer (model_offload's ReadsOf) still sees every op, and a whole plan -- every
phase of Stage 1 and Stage 2, bf16 frozen parts and autocast included -- has exactly the same numbers with the cache as
without it."""
import json

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tests import tiny_models as tm
from flashdmd.training import plan as P
from flashdmd.training.config import DistillConfig
from flashdmd.training.memory import trace as T

aten = torch.ops.aten


def _meta(*shape, dtype=torch.float32):
    return torch.empty(*shape, device="meta", dtype=dtype)


def _same(a: torch.Tensor, b: torch.Tensor):
    assert (a.dtype, a.shape, a.stride(), a.storage_offset(), a.untyped_storage().nbytes()) == \
        (b.dtype, b.shape, b.stride(), b.storage_offset(), b.untyped_storage().nbytes())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_a_hit_gives_what_the_meta_kernel_gives(dtype):
    cache = T.MetaKernelCache()
    x, w, b = _meta(2, 8, 4, 4, dtype=dtype), _meta(8, dtype=dtype), _meta(8, dtype=dtype)
    m1, m2 = _meta(3, 5, dtype=dtype), _meta(5, 7, dtype=dtype).t().contiguous().t()  # a transposed layout
    calls = [(aten.native_group_norm.default, (x, w, b, 2, 8, 16, 4, 1e-5), {}),
             (aten.native_layer_norm.default, (_meta(2, 6, 8, dtype=dtype), [8], None, None, 1e-5), {}),
             (aten.addmm.default, (_meta(7, dtype=dtype), m1, m2), {}),
             (aten.add.Tensor, (_meta(4, 1, dtype=dtype), _meta(1, 3)), {"alpha": 2}),  # promotes to float32
             (aten.sum.dim_IntList, (x, [2, 3]), {"keepdim": True})]
    for func, args, kwargs in calls:
        expected = torch.utils._pytree.tree_leaves(func(*args, **kwargs))
        first = torch.utils._pytree.tree_leaves(cache(func, args, kwargs))
        hit = torch.utils._pytree.tree_leaves(cache(func, args, kwargs))
        assert len(expected) == len(first) == len(hit)
        for e, f, h in zip(expected, first, hit):
            _same(e, f)
            _same(e, h)
            assert h.untyped_storage()._cdata != f.untyped_storage()._cdata  # a fresh storage each time
    assert len(cache.entries) == cache.hits == len(calls) and not cache.never


def test_a_different_argument_is_a_different_entry():
    cache = T.MetaKernelCache()
    x = _meta(2, 8, 4, 4)
    a = cache(aten.sum.dim_IntList, (x, [2, 3]), {"keepdim": True})
    b = cache(aten.sum.dim_IntList, (x, [2, 3]), {"keepdim": False})
    c = cache(aten.sum.dim_IntList, (_meta(2, 8, 4, 4, dtype=torch.bfloat16), [2, 3]), {"keepdim": False})
    assert a.shape == (2, 8, 1, 1) and b.shape == (2, 8) and c.dtype == torch.bfloat16
    assert len(cache.entries) == 3
    try:  # a factory op without a dtype makes the default one: the default dtype is part of the key
        torch.set_default_dtype(torch.float64)
        assert cache(aten.empty.memory_format, ([2],), {"device": torch.device("meta")}).dtype == torch.float64
    finally:
        torch.set_default_dtype(torch.float32)
    assert cache(aten.empty.memory_format, ([2],), {"device": torch.device("meta")}).dtype == torch.float32


def test_aliasing_mutating_random_and_cpu_ops_always_run():
    cache = T.MetaKernelCache()
    x = _meta(4, 6)
    # _unsafe_view: no alias in its schema, but its output shares the input's storage -- found on the first call
    for _ in range(2):
        v = cache(aten._unsafe_view.default, (x, [6, 4]), {})
        assert v.untyped_storage()._cdata == x.untyped_storage()._cdata
    assert aten._unsafe_view.default in cache.never
    t = cache(aten.t.default, (x,), {})  # an aliased return in the schema
    assert t.untyped_storage()._cdata == x.untyped_storage()._cdata
    out = cache(aten.add_.Tensor, (x, x), {})  # in place
    assert out.untyped_storage()._cdata == x.untyped_storage()._cdata
    cache(aten.randn.default, ([3],), {"device": torch.device("meta")})  # seeded random
    cpu = cache(aten.add.Tensor, (torch.ones(2), torch.ones(2)), {})  # real values are never cached
    assert torch.equal(cpu, torch.full((2,), 2.0))
    cache(aten.empty.memory_format, ([2],), {"device": torch.device("cpu")})  # a factory op asked for CPU
    assert not cache.entries
    assert cache.never == {aten._unsafe_view.default}


def test_a_mode_below_the_tracer_still_sees_every_op():
    """model_offload's ReadsOf records the frozen parts each phase reads from below the tracer: with a warm cache the
    tracer shows it each hit (``observe``), or the reads of a phase whose shapes were traced before would go missing;
    a mode below that cannot be shown a hit gets every op itself (the cache stands aside)."""
    x, a, w, b = _meta(2, 8, 4, 4), _meta(3, 8), _meta(8, 8), _meta(8)
    reads = T.ReadsOf({w.untyped_storage()._cdata: "vae"})

    def step(below):
        hits = T.META_KERNELS.hits
        with below, T.LiveBytes("meta") as tracker:
            torch.nn.functional.group_norm(x, 2, b, b)
            torch.addmm(b, a, w)  # reads the watched weight through a pure, cacheable op
        return tracker.peak, T.META_KERNELS.hits - hits
    first, _ = step(reads)
    reads.read.clear()
    assert step(reads) == (first, 2) and reads.read == {"vae"}  # both hits, and the read seen

    class Ops(TorchDispatchMode):  # no observe
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(func)
            return func(*args, **(kwargs or {}))
    ops = Ops()
    assert step(ops) == (first, 0) and aten.addmm.default in ops.ops and aten.native_group_norm.default in ops.ops


BF16 = {"model_frozen_dtype": "bfloat16", "model_mixed_precision": "bf16"}


@pytest.mark.parametrize("family,method,extra", [
    ("world-sdxl", "flashdmd", {"rl_enabled": True, **BF16}),  # Stage 2 with the world's LRM, in bf16
    ("sdxl", "flashdmd", {}),
    ("sd3", "dmd2", BF16),
    ("flux", "flashdmd", {"data_resolution": 32, **BF16}),
    ("sdxl", "dmd2", {"model_offload": "frozen"})])  # ReadsOf below the tracer: each phase's reads of the frozen parts
def test_a_plan_is_the_same_with_and_without_the_cache(tiny_run_folders, family, method, extra, monkeypatch):
    if family == "world-sdxl":
        cfg = DistillConfig(model_teacher="world-sdxl", run_batch_size=2, eval_every_steps=0, run_sample_every_steps=0,
                            run_checkpoint_every_steps=0, **extra)
    else:
        cfg = tm.run_config(tiny_run_folders, family, method, run_batch_size=2, data_real="world", model_lora_rank=2,
                            model_gradient_checkpointing=True, **extra)

    def numbers():
        result = json.loads(json.dumps(P.plan(cfg, P.Settings(device="cuda")), default=str))
        result.pop("seconds", None)
        return result
    monkeypatch.setattr(T.META_KERNELS, "enabled", False)
    without = numbers()
    monkeypatch.setattr(T.META_KERNELS, "enabled", True)
    monkeypatch.setattr(T.META_KERNELS, "entries", {})
    monkeypatch.setattr(T.META_KERNELS, "hits", 0)
    cold = numbers()  # from an empty cache, as a run's first plan: the roles' networks and repeated blocks hit
    assert without == cold
    assert T.META_KERNELS.hits > len(T.META_KERNELS.entries) > 0
    assert (without["detail"]["stage2"] is not None) == bool(extra.get("rl_enabled"))
