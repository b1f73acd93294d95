"""A quantised frozen shared base (model_frozen_quant int8, torchao's weight-only Int8Tensor): a LoRA Flash-DMD run
trains its adapters in model_dtype around int8 base tensors that teacher, student and fake score share and that never
move; the teacher's x0 stays within the rounding's bound of the unquantised one; resume is bit-exact; export writes
the unquantised teacher with the adapters; fp8 on a CPU and a full fine-tune with a quantised base are one line."""
import sys
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file
from torch import nn
from torchao.quantization import Int8Tensor

sys.path.insert(0, str(Path(__file__).parent))
import tiny_models as tm  # noqa: E402

from flashdmd import FlashDMDError, runfolder  # noqa: E402
from flashdmd.cli import main  # noqa: E402
from flashdmd.families import load_family  # noqa: E402
from flashdmd.networks import lora  # noqa: E402
from flashdmd.networks.reward import LatentRewardModel  # noqa: E402
from flashdmd.networks.quant import quantise  # noqa: E402
from flashdmd.training import plan as P  # noqa: E402
from flashdmd.training.distill import setup, train  # noqa: E402

INT8_STEP = 1 / 255  # int8 symmetric, one scale per row: a weight moves by <= half a step = max|row| / 255


@pytest.fixture(scope="module")
def folders(tiny_run_folders):
    return tiny_run_folders


def _cfg(folders, **kw):
    base = dict(model_lora_rank=2, model_frozen_quant="int8", student_timesteps=[999, 499], student_lr=1e-3,
                fake_score_lr=1e-3, run_max_steps=2)
    return tm.run_config(folders, "sdxl", "flashdmd", **{**base, **kw})


def _quantised(net: nn.Module) -> dict:
    return {n: m.weight for n, m in net.named_modules()
            if isinstance(m, nn.Linear) and isinstance(m.weight, Int8Tensor)}


def _adapters(ctx) -> dict:
    return {f"{r}.{n}": p.detach().clone() for r in ("student", "fake_score", "disc")
            if getattr(ctx, r) is not None for n, p in getattr(ctx, r).named_parameters() if p.requires_grad}


def test_int8_lora_run_trains_adapters_around_one_shared_int8_base(folders, tmp_path):
    cfg = _cfg(folders, model_text_encoder_quant="int8", disc_backbone_quant="int8")
    ctx = setup(cfg)
    base = _quantised(ctx.teacher)
    linears = [m for m in ctx.teacher.modules() if isinstance(m, nn.Linear)]
    assert base and len(base) == len(linears)  # every linear of the teacher is int8
    assert all(w.qdata.dtype == torch.int8 for w in base.values())
    assert all(_quantised(e) for e in ctx.family.text_encoders) and _quantised(ctx.disc.backbone)
    for net in (ctx.student, ctx.fake_score):  # the same int8 tensors, not copies
        shared = {n.replace(".base_layer", ""): w for n, w in _quantised(net).items()}
        assert shared.keys() == base.keys()
        assert all(shared[n] is base[n] for n in base)
    q_before = {n: w.qdata.clone() for n, w in base.items()}
    before = _adapters(ctx)
    assert any("lora" in k for k in before) and all(v.dtype == torch.float32 for v in before.values())
    train(cfg, tmp_path / "run", progress=False, ctx=ctx)
    after = _adapters(ctx)
    moved = [k for k in before if "lora_B" in k and not torch.equal(before[k], after[k])]
    assert moved and all(v.dtype == torch.float32 for v in after.values())
    assert all(torch.equal(base[n].qdata, q_before[n]) for n in base)  # the base never moves


def test_int8_teacher_x0_within_the_rounding_bound(folders):
    ref = load_family(str(folders["sdxl"]), device="cpu", dtype=torch.float32, frozen_dtype=torch.float32)
    q = load_family(str(folders["sdxl"]), device="cpu", dtype=torch.float32, frozen_dtype=torch.float32)
    quantise(q.denoiser, "int8")
    n_layers = len(_quantised(q.denoiser))
    g = torch.Generator().manual_seed(0)
    x = torch.randn((2,) + tuple(ref.latent_shape(64, 64)), generator=g)
    t = torch.tensor([749.0, 249.0])
    cond = ref.encode_prompts(["a photo of the digit seven", "a drawing of a cat"])
    with torch.no_grad():
        x0_ref, x0_q = ref.predict(ref.denoiser, x, t, cond)[0], q.predict(q.denoiser, x, t, cond)[0]
    # first order, as tests/tolerances.network_factor counts round-off: each int8 layer perturbs its output by at most
    # INT8_STEP of its scale and the layers' perturbations add -> INT8_STEP * (number of int8 layers) * max|x0|
    err = float((x0_q - x0_ref).abs().max())
    bound = INT8_STEP * n_layers * float(x0_ref.abs().max())
    assert 0 < err <= bound, (err, bound)
    print(f"int8 teacher x0: max error {err:.3g} = {err / float(x0_ref.abs().max()):.3g} of max|x0| "
          f"(bound {bound:.3g}, {n_layers} int8 layers)")


def test_resume_with_an_int8_base_is_bit_exact_and_export_is_unquantised(folders, tmp_path):
    kw = dict(run_max_steps=2, run_checkpoint_every_steps=1, disc_kind="none")
    full = setup(_cfg(folders, **kw))
    train(_cfg(folders, **kw), tmp_path / "full", progress=False, ctx=full)
    train(_cfg(folders, **{**kw, "run_max_steps": 1}), tmp_path / "half", progress=False)
    resumed = setup(_cfg(folders, **kw))
    train(_cfg(folders, **kw), tmp_path / "half", progress=False, ctx=resumed, resume="latest")
    a, b = _adapters(full), _adapters(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the checkpoint holds adapters and optimiser states in model_dtype, never the int8 base (rebuilt from the folder)
    files = list((tmp_path / "half" / "checkpoints").rglob("*.safetensors"))
    saved = {k: v for f in files for k, v in load_file(f).items()}
    assert saved and not any(v.dtype == torch.int8 for v in saved.values())
    assert all("lora_" in k for k, v in saved.items() if k.startswith(("student.", "fake_score.")))
    # export: the fused student is the folder's original (unquantised) teacher with the run's adapters fused in
    run = tmp_path / "full"
    assert main(["export", "--run", str(run), "--out", str(tmp_path / "fused")]) == 0
    teacher = load_family(str(folders["sdxl"]), device="cpu", dtype=torch.float32, frozen_dtype=torch.float32)
    expected = lora.merge(lora.load(teacher.denoiser, 2, None, run / runfolder.STUDENT / runfolder.ADAPTER_FILE))
    fused = UNet2DConditionModel.from_pretrained(tmp_path / "fused" / "unet")
    want = expected.state_dict()
    got = fused.state_dict()
    assert got.keys() == want.keys()
    assert all(type(v) is torch.Tensor and v.dtype == want[k].dtype and torch.equal(v, want[k]) for k, v in got.items())
    assert main(["export", "--run", str(run), "--out", str(tmp_path / "lora"), "--lora"]) == 0
    exported = load_file(tmp_path / "lora" / "pytorch_lora_weights.safetensors")
    assert exported and all(v.dtype == torch.float32 for v in exported.values())
    trained = sorted(float(v.abs().sum()) for k, v in a.items() if k.startswith("student."))
    assert sorted(float(v.abs().sum()) for v in exported.values()) == trained


@pytest.mark.parametrize("base", ["int8", "none"])
def test_stage2_with_an_int8_reward_model(folders, tmp_path, base):
    """rl_reward_quant quantises the LRM's own layers; its frozen backbone is the teacher, which keeps its own
    field's precision (model_frozen_quant), whichever it is."""
    torch.manual_seed(0)
    LatentRewardModel(load_family(str(folders["sdxl"])), proj_dim=16, hidden_dim=16).save(tmp_path / "lrm")
    cfg = _cfg(folders, disc_kind="none", run_max_steps=1, rl_enabled=True, rl_reward_model=str(tmp_path / "lrm"),
               rl_reward_quant="int8", rl_steps=1, rl_distill_ratio=1, rl_num_candidates=2, rl_step_indices=[0],
               model_frozen_quant=base)
    ctx = setup(cfg)
    before = _adapters(ctx)
    train(cfg, tmp_path / "run", progress=False, ctx=ctx)
    teacher = {id(w) for w in _quantised(ctx.teacher).values()}
    assert [n for n, w in _quantised(ctx.setup.reward).items() if id(w) not in teacher]  # the LRM's own layers
    assert bool(teacher) == (base == "int8") and bool(_quantised(ctx.setup.reference)) == (base == "int8")
    assert any(not torch.equal(before[k], v) for k, v in _adapters(ctx).items() if k.startswith("student."))


def test_fp8_on_a_cpu_and_a_quantised_full_fine_tune_are_one_line(folders, tmp_path, capsys):
    with pytest.raises(FlashDMDError) as e:
        setup(_cfg(folders, model_frozen_quant="fp8"))
    assert "fp8 needs a CUDA GPU" in str(e.value) and "\n" not in str(e.value)
    capsys.readouterr()
    assert main(["distill", "--no-plan", "--set", f"model_teacher={folders['sdxl']}", "--set", "model_lora_rank=2",
                 "--set", "disc_kind=none", "--set", "model_text_encoder_quant=fp8", "--out", str(tmp_path / "r"),
                 "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: model_text_encoder_quant: fp8 needs a CUDA GPU") and "\n" not in err, err
    with pytest.raises(FlashDMDError) as e:  # FSDP2 cannot shard torchao's tensors: refused before loading
        setup(_cfg(folders), shard=lambda net: pytest.fail("sharded"))
    assert str(e.value).startswith("model_frozen_quant int8 with FSDP2") and "\n" not in str(e.value)
    plan = P.plan(_cfg(folders, disc_kind="none"), P.Settings(device="cuda", processes=8))
    assert sorted(plan["strategies"]) == ["ddp", "single"]  # the plan offers no FSDP2 for a quantised base either
    with pytest.raises(FlashDMDError, match="^model_frozen_quant int8 with FSDP2"):
        P.plan(_cfg(folders, disc_kind="none"), P.Settings(device="cuda", processes=8, strategy="fsdp2"))
    with pytest.raises(FlashDMDError) as e:
        _cfg(folders, model_lora_rank=0)
    assert "model_frozen_quant" in str(e.value) and "full fine-tune" in str(e.value)
