"""LoRA runs checkpoint only what they train (adapters, discriminator heads, their optimiser state), and
`flashdmd export --dtype fp16|bf16|fp32` casts every weight of the exported folder."""
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).parent))
import tiny_models as tm  # noqa: E402

from flashdmd import FlashDMDError  # noqa: E402
from flashdmd.cli import main  # noqa: E402
from flashdmd.export import SAFETENSORS_FLOAT, cast_folder, export, safetensors_dtypes  # noqa: E402
from flashdmd.families import load_family  # noqa: E402
from flashdmd.networks.reward import LatentRewardModel  # noqa: E402
from flashdmd.training.config import DistillConfig  # noqa: E402
from flashdmd.training.distill import setup, train  # noqa: E402

PROMPTS = ["a photo of the digit seven", "a drawing of a cat"]
SEED = 7


# ---------------------------------------------------------------------------------------------------
# (a) what a LoRA run's checkpoint holds


@pytest.fixture(scope="module")
def sd3_world(tmp_path_factory):
    """Tiny SD3 teacher (its transformer has a persistent positional-table buffer, the frozen tensor a LoRA
    checkpoint must not carry), a tiny SAM backbone for the pixel discriminator, a latent reward model."""
    tmp = tmp_path_factory.mktemp("sd3")
    folder = tm.save_pipeline(tm.sd3_pipeline(tmp), tmp / "sd3")
    torch.manual_seed(0)
    LatentRewardModel(load_family(folder), proj_dim=16, hidden_dim=16).save(tmp / "lrm")
    return {"teacher": folder, "sam": tm.sam_vision_folder(tmp / "sam"), "lrm": tmp / "lrm"}


def _every_role_cfg(world, lora_rank: int) -> DistillConfig:
    """Every role a checkpoint can hold: student + EMA, fake score, pixel discriminator on a frozen backbone,
    and (Stage 2) the frozen reference and the RL optimiser. One generator step, one RL step."""
    return DistillConfig(model_teacher=str(world["teacher"]), run_batch_size=2, run_max_steps=1, eval_every_steps=0,
                         run_sample_every_steps=0, run_checkpoint_every_steps=1, run_log_every_steps=1, run_seed=0,
                         method="flashdmd", disc_kind="pixel", disc_backbone="sam",
                         disc_backbone_path=str(world["sam"]), student_ema=0.9, model_lora_rank=lora_rank,
                         rl_enabled=True, rl_reward_model=str(world["lrm"]), rl_steps=1, rl_distill_ratio=1,
                         rl_num_candidates=2)


def _latest(run: Path) -> Path:
    return sorted((run / "checkpoints").glob("step_*"))[-1]


def _keys_by_role(path: Path) -> dict[str, set[str]]:
    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
    out = {}
    for k in keys:
        role, name = k.split("/", 1)
        out.setdefault(role, set()).add(name)
    return out


def _tensor_bytes(path: Path, roles) -> int:
    total = 0
    with safe_open(str(path), "pt") as f:
        for k in f.keys():
            if k.split("/", 1)[0] in roles:
                t = f.get_tensor(k)
                total += t.numel() * t.element_size()
    return total


def test_lora_checkpoint_holds_adapters_and_heads_only(sd3_world, tmp_path):
    ctx = setup(_every_role_cfg(sd3_world, lora_rank=2))
    train(_every_role_cfg(sd3_world, lora_rank=2), tmp_path / "lora", progress=False, ctx=ctx)
    ckpt = _latest(tmp_path / "lora")
    assert json.loads((ckpt / "state.json").read_text())["stage"] == 2
    roles = _keys_by_role(ckpt / "roles.safetensors")
    assert set(roles) == {"student", "fake_score", "disc", "reference", "student_ema"}
    adapters = {n for n, p in ctx.student.named_parameters() if p.requires_grad}
    assert adapters and all("lora_" in n for n in adapters)
    for role in ("student", "fake_score", "reference", "student_ema"):
        # exactly the adapters: no frozen base weight, no base buffer (SD3's pos_embed.pos_embed)
        assert roles[role] == adapters, (role, sorted(roles[role] ^ adapters)[:3])
    assert "pos_embed.pos_embed" in dict(ctx.student.named_buffers())   # the buffer exists and is left out
    heads = {n for n, p in ctx.disc.named_parameters() if p.requires_grad}
    assert heads and roles["disc"] == heads and not any(n.startswith("backbone.") for n in roles["disc"])
    opt = _keys_by_role(ckpt / "optim.safetensors")
    assert set(opt) == {"generator", "rl", "fake_score", "disc"}
    for role in ("generator", "rl", "fake_score"):
        assert opt[role] and all("lora_" in k for k in opt[role]), role
    assert {k.rsplit("/", 1)[0] for k in opt["disc"]} == heads

    # the same run as a full fine-tune: its denoiser tensors are what the LoRA checkpoint leaves out
    train(_every_role_cfg(sd3_world, lora_rank=0), tmp_path / "full", progress=False)
    full = _latest(tmp_path / "full")
    size = {name: sum((c / f).stat().st_size for f in ("roles.safetensors", "optim.safetensors"))
            for name, c in (("lora", ckpt), ("full", full))}
    denoisers = ("student", "fake_score", "reference", "student_ema")
    lora_den = _tensor_bytes(ckpt / "roles.safetensors", denoisers)
    full_den = _tensor_bytes(full / "roles.safetensors", denoisers)
    print(f"checkpoint roles+optim bytes: LoRA {size['lora']}, full {size['full']}; "
          f"denoiser tensors: LoRA {lora_den}, full {full_den}")
    # tiny model, so the discriminator heads (the same in both) are a large share of the LoRA checkpoint
    assert size["lora"] < size["full"] / 5
    assert lora_den < full_den / 20

    # the adapters-only checkpoint restores the run: a resume from it loads every role without complaint
    again = setup(_every_role_cfg(sd3_world, lora_rank=2))
    train(_every_role_cfg(sd3_world, lora_rank=2), tmp_path / "lora", progress=False, ctx=again, resume=str(ckpt))
    for name, p in ctx.student.named_parameters():
        if p.requires_grad:
            assert torch.equal(p, dict(again.student.named_parameters())[name]), name


# ---------------------------------------------------------------------------------------------------
# (b) export --dtype


@pytest.fixture(scope="module")
def sdxl_lora_run(tmp_path_factory):
    """A tiny SDXL LoRA distill run (rank 2, alpha 4; a large lr so the one step moves the adapters visibly)."""
    tmp = tmp_path_factory.mktemp("sdxl")
    teacher = tm.save_pipeline(tm.sdxl_pipeline(tmp), tmp / "sdxl")
    cfg = DistillConfig(model_teacher=str(teacher), run_batch_size=2, run_max_steps=1, disc_kind="none",
                        eval_every_steps=0,
                        run_sample_every_steps=0, run_checkpoint_every_steps=0, run_seed=0, student_lr=1e-2,
                        model_lora_rank=2, model_lora_alpha=4.0)
    train(cfg, tmp / "run", progress=False)
    return tmp / "run"


@pytest.fixture(scope="module")
def exports(sdxl_lora_run, tmp_path_factory):
    """The run exported (LoRA fused) without --dtype and with each --dtype."""
    tmp = tmp_path_factory.mktemp("exports")
    out = {}
    for dtype in (None, "fp32", "fp16", "bf16"):
        folder = tmp / str(dtype)
        assert main(["export", "--run", str(sdxl_lora_run), "--out", str(folder)]
                    + ([] if dtype is None else ["--dtype", dtype])) == 0
        out[dtype] = folder
    return out


def _float_dtypes(folder: Path) -> dict[str, set[str]]:
    """file (relative) -> the float dtypes it holds."""
    return {str(p.relative_to(folder)): {SAFETENSORS_FLOAT[c] for c in safetensors_dtypes(p).values()
                                         if c in SAFETENSORS_FLOAT}
            for p in folder.rglob("*.safetensors")}


def _student_latents(folder: Path):
    from diffusers import StableDiffusionXLPipeline
    pipe = StableDiffusionXLPipeline.from_pretrained(folder, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    record = json.loads((folder / "flashdmd_export.json").read_text())
    return pipe(PROMPTS, guidance_scale=1.0, output_type="latent", generator=torch.Generator().manual_seed(SEED),
                **record["pipeline_kwargs"]).images


def test_export_dtype_casts_every_weight_and_keeps_the_student(exports, sdxl_lora_run):
    files = _float_dtypes(exports[None])
    assert {"unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
            "text_encoder/model.safetensors", "text_encoder_2/model.safetensors"} <= set(files)
    assert set().union(*files.values()) == {"float32"}   # the tiny teacher and run are float32
    for dtype, name in (("fp32", "float32"), ("fp16", "float16"), ("bf16", "bfloat16")):
        folder = exports[dtype]
        got = _float_dtypes(folder)
        assert set(got) == set(files), dtype                     # the same files, each holding only that dtype
        assert all(d == {name} for d in got.values()), (dtype, got)
        record = json.loads((folder / "flashdmd_export.json").read_text())
        assert record["dtype"] == dtype and record["weights_dtypes"] == [name] and record["lora_fused"]
        readme = (folder / "README.md").read_text()
        assert f"--dtype {dtype}" in readme and f"torch_dtype=torch.{name}" in readme
        enc = json.loads((folder / "text_encoder" / "config.json").read_text())
        assert enc.get("dtype", enc.get("torch_dtype")) == name
    record = json.loads((exports[None] / "flashdmd_export.json").read_text())
    assert record["dtype"] is None and record["weights_dtypes"] == ["float32"]
    assert "torch_dtype" not in (exports[None] / "README.md").read_text()

    ref = _student_latents(exports[None])
    assert torch.equal(_student_latents(exports["fp32"]), ref)   # fp32 of a float32 run: the same weights
    # Bound. Round-to-nearest stores each weight as w (1 + d) with |d| <= u, the unit roundoff: u = 2^-11 for
    # fp16 (10 stored mantissa bits), 2^-8 for bf16 (7). A layer's output then moves by at most u * sum |w_i x_i|,
    # relative to the output u times a cancellation factor; the errors of many weights are independent, so they
    # partly average out, and they compound through the two text encoders, the UNet's depth and the 4 sampling
    # steps (the fresh noise is identical in both runs, so only the x0 errors propagate). First order in u, the
    # latents' relative error is c * u with c set by the network, not by the dtype. We allow c <= 8 -- loose (on
    # these tiny models c is ~0.4 for both dtypes) -- and check the first-order scaling itself: the bf16 error is
    # the fp16 one times u_bf16 / u_fp16 = 8, within a factor 4 either way. The bf16 error must not be 0: the
    # cast really happened and reaches the student's latents.
    rel = {}
    for dtype, u in (("fp16", 2.0 ** -11), ("bf16", 2.0 ** -8)):
        lat = _student_latents(exports[dtype])
        assert lat.shape == ref.shape and torch.isfinite(lat).all()
        rel[dtype] = ((lat - ref).norm() / ref.norm()).item()
        assert rel[dtype] <= 8 * u, (dtype, rel[dtype], 8 * u)
    assert rel["bf16"] > 2.0 ** -16, rel
    assert 2 < rel["bf16"] / rel["fp16"] < 32, rel


def test_lora_weights_file_is_cast_and_loads(sdxl_lora_run, tmp_path):
    from diffusers import StableDiffusionXLPipeline
    out = tmp_path / "lora16"
    assert main(["export", "--run", str(sdxl_lora_run), "--out", str(out), "--lora", "--dtype", "fp16"]) == 0
    got = _float_dtypes(out)
    assert "pytorch_lora_weights.safetensors" in got and all(d == {"float16"} for d in got.values()), got
    with safe_open(str(out / "pytorch_lora_weights.safetensors"), "pt") as f:
        assert f.metadata()   # the adapter's rank / alpha metadata survives the cast
    pipe = StableDiffusionXLPipeline.from_pretrained(out, torch_dtype=torch.float32)
    pipe.load_lora_weights(out)
    assert any("lora" in n for n, _ in pipe.unet.named_parameters())


# ---------------------------------------------------------------------------------------------------
# (c) bad input


def test_bad_dtype_is_a_one_line_error(sdxl_lora_run, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["export", "--run", str(sdxl_lora_run), "--out", str(tmp_path / "o"), "--dtype", "fp8"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if "error:" in line]
    assert len(lines) == 1 and "--dtype" in lines[0] and "invalid choice" in lines[0] and "Traceback" not in err
    assert not (tmp_path / "o").exists()
    with pytest.raises(FlashDMDError, match="not one of fp16, bf16, fp32"):
        export(sdxl_lora_run, tmp_path / "o", dtype="float16")


def test_fp16_overflow_is_an_error_and_nothing_is_half_cast(tmp_path):
    from safetensors.torch import save_file
    (tmp_path / "vae").mkdir()
    path = tmp_path / "vae" / "diffusion_pytorch_model.safetensors"
    save_file({"w": torch.tensor([1.0, 1e5]), "ids": torch.arange(3)}, str(path), metadata={"format": "pt"})
    with pytest.raises(FlashDMDError, match="beyond torch.float16's range"):
        cast_folder(tmp_path, "fp16")
    assert safetensors_dtypes(path) == {"w": "F32", "ids": "I64"}   # untouched
    assert cast_folder(tmp_path, "bf16") == ["vae/diffusion_pytorch_model.safetensors"]
    assert safetensors_dtypes(path) == {"w": "BF16", "ids": "I64"}   # integer tensors stay as they are


def test_fused_lora_is_fused_in_fp32_then_cast(sdxl_lora_run, tmp_path):
    """A bf16 teacher: every LoRA-targeted weight of the bf16 export is bf16(W + s B A) computed in float32 --
    one rounding -- not the sum of W and a bf16-rounded delta in bf16 arithmetic (two roundings)."""
    from safetensors.torch import load_file

    from flashdmd.export import write_merged_lora_student
    from flashdmd.families.base import read_model_index
    info = json.loads((sdxl_lora_run / "run.json").read_text())
    teacher = tmp_path / "teacher_bf16"
    shutil.copytree(info["teacher_path"], teacher)
    cast_folder(teacher / "unet", "bf16")
    write_merged_lora_student(teacher, read_model_index(teacher), info, sdxl_lora_run, tmp_path / "unet", dtype="bf16")
    fused = load_file(str(tmp_path / "unet" / "diffusion_pytorch_model.safetensors"))
    base = load_file(str(teacher / "unet" / "diffusion_pytorch_model.safetensors"))
    adapter = load_file(str(sdxl_lora_run / "student" / "adapter.safetensors"))
    scale = info["lora_alpha"] / info["lora_rank"]
    two_roundings = 0
    layers = [k[: -len(".lora_A.weight")] for k in adapter if k.endswith(".lora_A.weight")]
    assert layers
    for layer in layers:
        w = base[f"{layer}.weight"]
        delta = scale * (adapter[f"{layer}.lora_B.weight"] @ adapter[f"{layer}.lora_A.weight"]).reshape(w.shape)
        assert fused[f"{layer}.weight"].dtype == torch.bfloat16
        assert torch.equal(fused[f"{layer}.weight"], (w.float() + delta).to(torch.bfloat16)), layer
        two_roundings += int((w + delta.to(torch.bfloat16) != fused[f"{layer}.weight"]).sum())
    assert two_roundings > 0   # the order matters here: the test tells the two apart
