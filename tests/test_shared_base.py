"""Under LoRA, teacher, student and fake score share ONE copy of the base weights (model_shared_base): the run's
losses and every trained tensor equal the three-copy path's bit for bit, both families and both methods (DMD2's
latent head reads the fake-score adapters' features), and resume stays bit-exact."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import tiny_models as tm  # noqa: E402

from flashdmd.training.distill import setup, train  # noqa: E402
from flashdmd.training.roles import copy_sharing_frozen  # noqa: E402


@pytest.fixture(scope="module")
def folders(tiny_run_folders):
    return tiny_run_folders


def _cfg(folders, family, method, **kw):
    base = dict(model_lora_rank=2, student_timesteps=[999, 499] if family == "sdxl" else None,
                **({"fake_score_ttur": 2} if method == "dmd2" else {}))
    return tm.run_config(folders, family, method, **{**base, **kw})


def _storages(*modules) -> dict:
    """Distinct parameter storages of the modules -> bytes."""
    return {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for m in modules for p in m.parameters()}


def _trained(ctx) -> dict:
    return {f"{r}.{n}": p.detach().clone() for r in ("student", "fake_score", "disc")
            for n, p in getattr(ctx, r).named_parameters() if p.requires_grad}


@pytest.mark.parametrize("family", ["sdxl", "sd3"])
@pytest.mark.parametrize("method", ["flashdmd", "dmd2"])
def test_shared_base_equals_three_copies(folders, family, method, tmp_path):
    runs = {}
    for shared in (True, False):
        cfg = _cfg(folders, family, method, model_shared_base=shared)
        ctx = setup(cfg)
        base = sum(p.numel() * p.element_size() for p in ctx.teacher.parameters())
        held = sum(_storages(ctx.teacher, ctx.student, ctx.fake_score).values())
        if shared:
            # every frozen tensor of student and fake score is the teacher's own; only the adapters are extra
            teacher = dict(ctx.teacher.named_parameters())
            for net in (ctx.student, ctx.fake_score):
                for n, p in net.named_parameters():
                    if not p.requires_grad:
                        assert p is teacher[n.replace(".base_layer", "")], n
            assert held < 1.1 * base
        else:
            assert held > 2.9 * base
        result = train(cfg, tmp_path / f"run_{shared}", progress=False, ctx=ctx)
        history = [{k: v for k, v in h.items() if not k.startswith("time/")} for h in result["history"]]
        runs[shared] = (history, _trained(ctx), {n: p.clone() for n, p in ctx.teacher.named_parameters()})
    (h_shared, w_shared, t_shared), (h_copies, w_copies, t_copies) = runs[True], runs[False]
    assert len(h_shared) == 3 and h_shared == h_copies  # every logged loss and gradient norm, exactly
    assert w_shared.keys() == w_copies.keys() and any("lora" in k for k in w_shared)
    for k in w_shared:
        assert torch.equal(w_shared[k], w_copies[k]), k
    for k in t_shared:  # the teacher (the shared base) never moved
        assert torch.equal(t_shared[k], t_copies[k]), k


def test_resume_with_a_shared_base_is_bit_exact(folders, tmp_path):
    kw = dict(run_max_steps=4, run_checkpoint_every_steps=2, fake_score_ttur=2)
    cfg = _cfg(folders, "sdxl", "flashdmd", **kw)
    full = setup(cfg)
    train(cfg, tmp_path / "full", progress=False, ctx=full)
    train(_cfg(folders, "sdxl", "flashdmd", **{**kw, "run_max_steps": 2}), tmp_path / "half", progress=False)
    resumed = setup(cfg)
    train(cfg, tmp_path / "half", progress=False, ctx=resumed, resume="latest")
    a, b = _trained(full), _trained(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_copy_sharing_frozen_copies_only_trainable_tensors(folders):
    """What the Stage-2 reference and the EMA copy are built with: frozen tensors shared, adapters copied."""
    ctx = setup(_cfg(folders, "sdxl", "flashdmd"))
    ref = copy_sharing_frozen(ctx.student).requires_grad_(False)
    student = dict(ctx.student.named_parameters())
    for n, p in ref.named_parameters():
        if student[n].requires_grad:
            assert p is not student[n] and torch.equal(p, student[n]) and p.data_ptr() != student[n].data_ptr()
        else:
            assert p is student[n]
    with torch.no_grad():
        next(p for p in ctx.student.parameters() if p.requires_grad).add_(1.0)
    assert not all(torch.equal(p, student[n]) for n, p in ref.named_parameters())
