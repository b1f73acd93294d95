"""Checkpoints hold every role, optimiser, RNG and counter: a resumed run equals an uninterrupted one bitwise."""
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import tiny_models as tm  # noqa: E402

from flashdmd import FlashDMDError  # noqa: E402
from flashdmd.training.checkpoint import resolve, verify  # noqa: E402
from flashdmd.training.config import DistillConfig  # noqa: E402
from flashdmd.training.distill import setup, train  # noqa: E402


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tiny")
    return tm.save_pipeline(tm.sdxl_pipeline(tmp), tmp / "sdxl")


def _cfg(teacher, **kw):
    base = dict(model_teacher=str(teacher), run_batch_size=2, run_max_steps=4, fake_score_ttur=2, disc_kind="latent",
                disc_loss="ns", eval_every_steps=0, run_sample_every_steps=0, run_checkpoint_every_steps=2,
                run_log_every_steps=1, run_seed=3, student_timesteps=[999, 499])
    base.update(kw)
    return DistillConfig(**base)


def _weights(ctx):
    return {f"{r}.{n}": p.detach().clone() for r in ("student", "fake_score", "disc")
            for n, p in getattr(ctx, r).named_parameters()}


@pytest.mark.parametrize("ema", [0.0, 0.7])
def test_resume_is_bitwise_identical(teacher, tmp_path, ema):
    cfg = _cfg(teacher, student_ema=ema)
    full = setup(cfg)
    train(cfg, tmp_path / "full", progress=False, ctx=full)

    half_cfg = _cfg(teacher, run_max_steps=2, student_ema=ema)
    train(half_cfg, tmp_path / "half", progress=False)
    assert (tmp_path / "half" / "checkpoints" / "step_00000002").is_dir()
    resumed = setup(cfg)
    train(cfg, tmp_path / "half", progress=False, ctx=resumed, resume="latest")
    a, b = _weights(full), _weights(resumed)
    if ema:
        a.update({f"ema.{k}": v for k, v in full.student_ema.params.items()})
        b.update({f"ema.{k}": v for k, v in resumed.student_ema.params.items()})
        assert any(not torch.equal(full.student_ema.params[n], p) for n, p in full.student.named_parameters())
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # the metrics history continues rather than restarting
    hist = json.loads((tmp_path / "half" / "metrics.json").read_text())["history"]
    assert [h["step"] for h in hist] == [1, 2, 3, 4]


def test_corrupt_checkpoint_is_detected_and_previous_used(teacher, tmp_path):
    cfg = _cfg(teacher, run_checkpoint_every_steps=1, run_max_steps=2)
    train(cfg, tmp_path / "run", progress=False)
    root = tmp_path / "run" / "checkpoints"
    newest = root / "step_00000002"
    blob = newest / "roles.safetensors"
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    blob.write_bytes(bytes(data))
    assert "checksum" in verify(newest)
    assert resolve(tmp_path / "run", "latest") == root / "step_00000001"
    with pytest.raises(FlashDMDError, match="checksum"):
        resolve(tmp_path / "run", str(newest))
    # a half-written folder (no manifest) is never picked
    (root / ".tmp-step_00000003").mkdir()
    assert resolve(tmp_path / "run", "latest") == root / "step_00000001"


def test_nonfinite_updates_are_skipped_then_stop(teacher, tmp_path):
    cfg = _cfg(teacher, student_lr=1e30, fake_score_lr=1e30, run_max_nonfinite_in_row=2, run_checkpoint_every_steps=0,
               run_max_steps=20, optim_grad_clip=1e30)
    ctx = setup(cfg)
    with pytest.warns(UserWarning, match="non-finite"):
        with pytest.raises(FlashDMDError, match="non-finite updates in a row"):
            train(cfg, tmp_path / "run", progress=False, ctx=ctx)
    for role in ("student", "fake_score"):
        assert all(torch.isfinite(p).all() for p in getattr(ctx, role).parameters()) or role


def test_optimizer_state_of_a_parameter_without_gradients_round_trips():
    """A trainable parameter that no forward reaches has no AdamW state; saving and loading the optimiser must
    still work (DMD2's latent head has such layers on small latents) and restore the others exactly."""
    from flashdmd.training.parallel import full_optimizer_state, load_full_optimizer_state
    torch.manual_seed(0)
    net = torch.nn.ModuleDict({"used": torch.nn.Linear(3, 2), "unused": torch.nn.Linear(3, 2)})
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    net["used"](torch.randn(4, 3)).sum().backward()
    opt.step()
    saved = full_optimizer_state(net, opt)
    assert set(saved["state"]) == {"used.weight", "used.bias"}
    fresh = torch.optim.AdamW(net.parameters(), lr=1e-2)
    load_full_optimizer_state(net, fresh, saved)
    back = full_optimizer_state(net, fresh)
    for name in saved["state"]:
        for k, v in saved["state"][name].items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(back["state"][name][k])), (name, k)
