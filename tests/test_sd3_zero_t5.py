"""SD3 without T5: the 256 zero T5 tokens counted as one (model_zero_t5, flashdmd/families/sd3.py).

The pipeline passes [77 CLIP tokens, 256 zero tokens]; the family in ``counted`` mode passes [77 CLIP tokens, one zero
token] with + log 256 on that token's attention logit. Mathematically the same function of the inputs (identical
tokens stay identical through every block; n identical keys and values weigh n exp(logit)), so in float64 the two
agree to round-off, outputs and gradients, on SD3's blocks and on SD3.5's (qk-norm, an image-only ``attn2``).
"""
from __future__ import annotations

import copy

import pytest
import torch

import tiny_models as tm
from flashdmd import FlashDMDError
from flashdmd.families import load_family
from flashdmd.families.sd3 import CountedZeroT5Processor
from flashdmd.training.config import DistillConfig
from tolerances import U64, UBF16, assert_close, magnitude, network_factor

PROMPTS = ["a photo of the cat", "in the digit seven"]
SIZE = 32  # pixels; latents 16x16, 64 image tokens (patch 2)


def _family(tmp_path_factory, name, **kw):
    tmp = tmp_path_factory.mktemp(name)
    return load_family(tm.save_pipeline(tm.sd3_pipeline(tmp, **kw), tmp / "pipe"))


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    return _family(tmp_path_factory, "sd3")


@pytest.fixture(scope="module")
def sd35(tmp_path_factory):
    return _family(tmp_path_factory, "sd35", sd35=True)


@pytest.fixture(params=["sd3", "sd35"])
def no_t5(request):
    return request.getfixturevalue(request.param)


def _inputs(fam, dtype):
    torch.manual_seed(0)
    x = torch.randn((2,) + fam.latent_shape(SIZE, SIZE), dtype=dtype)
    t = torch.tensor([fam.schedule.t_max * 0.95, fam.schedule.t_max * 0.3])
    cond = fam.encode_prompts(PROMPTS, SIZE, SIZE)
    return x, t, type(cond)(**{k: (v.to(dtype) if torch.is_tensor(v) else v) for k, v in vars(cond).items()})


def _run(fam, net, mode, x, t, cond, monkeypatch):
    monkeypatch.setattr(fam, "zero_t5", mode)
    out = fam._forward(net, x, t, cond)
    out.square().sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}


def test_counted_equals_the_pipelines_padded_tokens_in_float64(no_t5, monkeypatch):
    fam = no_t5
    x, t, cond = _inputs(fam, torch.float64)
    assert cond.prompt_embeds.shape[1] == 77 + 256 and not fam.has_t5
    padded_net = copy.deepcopy(fam.denoiser).double().requires_grad_(True)   # diffusers' own processor
    counted_net = copy.deepcopy(fam.denoiser).double().requires_grad_(True)
    want, want_grads = _run(fam, padded_net, "padded", x, t, cond, monkeypatch)
    got, got_grads = _run(fam, counted_net, "counted", x, t, cond, monkeypatch)
    assert all(isinstance(p, CountedZeroT5Processor) for p in counted_net.attn_processors.values())
    assert not any(isinstance(p, CountedZeroT5Processor) for p in padded_net.attn_processors.values())
    # another float path (17 + 64 keys with a bias for 272 + 64 keys, other sums): the network's round-off in u64,
    # plus the bias's log and the weights' exp (a few u)
    k = network_factor(fam.denoiser) + 8
    assert_close(got, want, factor=k, u=U64, what="output")
    assert set(got_grads) == set(want_grads)
    for name, g in want_grads.items():  # backward doubles the path (the same layers again, transposed)
        assert_close(got_grads[name], g, factor=2 * k, u=U64, mag=magnitude(g), what=name)


def test_a_wrong_formula_is_not_within_that_bound(sd3, monkeypatch):
    """The bound above is tight enough to catch a missing log 256 (one zero token weighed once)."""
    x, t, cond = _inputs(sd3, torch.float64)
    net = copy.deepcopy(sd3.denoiser).double()
    with torch.no_grad():
        monkeypatch.setattr(sd3, "zero_t5", "padded")
        want = sd3._forward(net, x, t, cond)
        cut = type(cond)(**{**vars(cond), "prompt_embeds": cond.prompt_embeds[:, :78]})
        wrong = sd3._forward(net, x, t, cut)
    err = float((wrong - want).abs().max())
    assert err > 1e3 * (network_factor(sd3.denoiser) + 8) * U64 * magnitude(want)


def test_bf16_counted_is_as_close_to_float64_as_padded(sd3, monkeypatch):
    """The GPU's dtype on the CPU: a bf16 base (frozen parts' dtype), and a float32 base under bf16 autocast. The
    bias rounds to bf16 like every logit (log 256 to 5.53, a weight 1.4 % off for the 256 tokens together, inside
    the logits' own bf16 rounding): counted lands as near the float64 answer as the pipeline's padded tokens do."""
    x64, t, cond64 = _inputs(sd3, torch.float64)
    with torch.no_grad():
        monkeypatch.setattr(sd3, "zero_t5", "padded")
        ref = sd3._forward(copy.deepcopy(sd3.denoiser).double(), x64, t, cond64)
        x, _, cond = _inputs(sd3, torch.float32)
        bf16 = copy.deepcopy(sd3.denoiser).to(torch.bfloat16)
        errs = {}
        for setting in ("bf16 weights", "autocast"):
            net = bf16 if setting == "bf16 weights" else sd3.denoiser
            for mode in ("padded", "counted"):
                monkeypatch.setattr(sd3, "zero_t5", mode)
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=setting == "autocast"):
                    out = sd3._forward(net, x, t, cond)
                assert out.dtype == torch.float32 and torch.isfinite(out).all()
                errs[setting, mode] = float((out.double() - ref).abs().max())
    for setting in ("bf16 weights", "autocast"):
        # at most twice the padded path's error plus 8 bf16 units at the output's magnitude
        assert errs[setting, "counted"] <= 2 * errs[setting, "padded"] + 8 * UBF16 * magnitude(ref), errs


def test_modes_and_t5(sd3, tmp_path_factory, monkeypatch):
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    for mode, on_cpu, on_gpu in (("auto", True, False), ("counted", True, True), ("padded", False, False)):
        monkeypatch.setattr(sd3, "zero_t5", mode)
        assert (sd3.counts_zero_t5(cpu), sd3.counts_zero_t5(gpu)) == (on_cpu, on_gpu)
    monkeypatch.setattr(sd3, "zero_t5", "count")
    with pytest.raises(FlashDMDError, match="model_zero_t5 must be one of auto, counted, padded"):
        sd3.counts_zero_t5(cpu)
    with_t5 = _family(tmp_path_factory, "sd3_t5", with_t5=True)  # real T5 tokens are not alike: never counted
    with_t5.zero_t5 = "counted"
    assert with_t5.has_t5 and not with_t5.counts_zero_t5(cpu)
    with_t5.release_text_encoders()  # what the text cache does: the family still knows it had T5
    assert with_t5.has_t5 and not with_t5.counts_zero_t5(cpu)
    assert with_t5.run_notes() == []  # the run log says what a run without T5 does, and only then
    for mode, said in (("auto", "256 zero tokens counted as one (model_zero_t5: auto)"),
                       ("padded", "256 zero tokens padded (model_zero_t5: padded)")):
        monkeypatch.setattr(sd3, "zero_t5", mode)
        assert sd3.run_notes() == [f"no text_encoder_3 (T5): its {said}"]
    with pytest.raises(FlashDMDError, match="model_zero_t5 must be one of"):
        DistillConfig(model_zero_t5="count")
