"""flashdmd plan: the split it predicts is checked against the tensors a real tiny run allocates (weights and AdamW
states exactly; the traced peak of each phase against the same phase run on real CPU tensors), its live-bytes
tracker against torch's MemTracker, and the command's JSON, errors and strategies."""
import json
import sys
from pathlib import Path

import pytest
import torch
from torchao.quantization import Int8Tensor

sys.path.insert(0, str(Path(__file__).parent))
import tiny_models as tm  # noqa: E402
import tiny_zimage as tz  # noqa: E402
import tiny_qwenimage as tq  # noqa: E402

from flashdmd import FlashDMDError  # noqa: E402
from flashdmd.cli import main  # noqa: E402
from flashdmd.families import FAMILIES  # noqa: E402
from flashdmd.training import plan as P  # noqa: E402
from flashdmd.training.config import DistillConfig  # noqa: E402
from flashdmd.training.distill import _encode, discriminator_step, distill_iteration, fake_score_step, generator_step, setup  # noqa: E402,E501


@pytest.fixture(scope="module")
def folders(tiny_run_folders, tmp_path_factory):
    return dict(tiny_run_folders, zimage=tz.session_folders(tmp_path_factory)["zimage"],
                qwenimage=tq.qwenimage_folders(tmp_path_factory)["qwenimage"])


def _cfg(folders, family, method, **kw):
    base = dict(run_batch_size=4, data_real="world", model_gradient_checkpointing=True, run_max_steps=3)
    if method == "flashdmd":
        base["fake_score_ema"] = 0.95  # the default
    else:
        base.update(disc_gen_weight=0.05, disc_weight=1.0)  # the defaults (memory does not depend on them)
    return tm.run_config(folders, family, method, **{**base, **kw})


class _Sink:
    def accumulate(self, logs):
        pass

    def bookkeeping(self, ctx):
        pass


def _real_weights(ctx) -> dict:
    roles = {"teacher": ctx.teacher, "student": ctx.student, "fake_score": ctx.fake_score,
             "text_encoders": torch.nn.ModuleList(ctx.family.text_encoders), "vae": ctx.family.vae, "disc": ctx.disc}
    return P.weights_by_role(roles)


def _optimizer_bytes(opt) -> int:
    inner = getattr(opt, "optimizer", opt)
    return sum(v.untyped_storage().nbytes() for st in inner.state.values() for v in st.values() if torch.is_tensor(v))


INT8 = dict(model_frozen_quant="int8", model_text_encoder_quant="int8", disc_backbone_quant="int8")


@pytest.mark.parametrize("family,method,lora,quant", [
    ("sdxl", "flashdmd", 2, {}), ("sdxl", "flashdmd", 0, {}), ("sd3", "dmd2", 2, {}), ("flux", "flashdmd", 2, {}),
    ("flux2-klein", "flashdmd", 2, {}), ("zimage", "flashdmd", 2, {}), ("qwenimage", "flashdmd", 2, {}),
    ("sdxl", "flashdmd", 2, INT8)])
def test_plan_split_matches_a_real_run(folders, family, method, lora, quant, monkeypatch):
    if family == "zimage":  # its plan takes every prompt at the text-encoder length: one the world's captions reach
        monkeypatch.setattr(FAMILIES["zimage"], "max_sequence_length", 24)
    cfg = _cfg(folders, family, method, model_lora_rank=lora,
               student_timesteps=[999, 749, 499, 249] if family == "sdxl" else None,
               # the tiny FLUX.1 / FLUX.2 / Qwen-Image / Z-Image folders default to 256 px
               **({"data_resolution": 32} if family in ("flux", "flux2-klein", "qwenimage", "zimage") else {}), **quant)
    result = P.plan(cfg, P.Settings(device="cpu"))
    planned = result["detail"]["stage1"]
    ctx = setup(cfg)
    distill_iteration(ctx, _Sink())  # AdamW creates its state at the first step
    # weights by role and optimiser states: exactly the real tensors
    assert planned["weights"] == _real_weights(ctx)
    if quant:  # the int8 tensors' own bytes (int8 data, float32 scales and zero points), counted without the plan
        int8 = [m.weight for m in ctx.teacher.modules() if isinstance(m.weight if hasattr(m, "weight") else None,
                                                                        Int8Tensor)]
        plain = [t for t in list(ctx.teacher.parameters()) + list(ctx.teacher.buffers()) if type(t) is not Int8Tensor
                 and not isinstance(t, Int8Tensor)]
        own = sum(w.qdata.nbytes + w.scale.nbytes + w.zero_point.nbytes for w in int8) + sum(t.nbytes for t in plain)
        assert int8 and planned["weights"]["teacher"] == own
        print(f"int8 plan: teacher {own} bytes")
    roles_of = {"student": "generator", "fake_score": "fake_score", "disc": "disc"}
    for role, opt in roles_of.items():
        assert planned["optimizer"][role] == _optimizer_bytes(ctx.opt[opt]), role
    # the traced peak of each phase against the same phase on real CPU tensors (which also holds the optimiser
    # step's temporaries): the meta trace runs the same ops, so they agree up to what fused attention keeps and
    # the step's temporaries -- measured 1-5 % on these models; 15 % would mean a missing or extra tensor class
    for o in ctx.opt.values():
        o.zero_grad(set_to_none=True)
    ctx.rng.shared_randrange = lambda n: n - 1  # the plan traces the last DM step
    cond = _encode(ctx, ctx.prompts.sample(cfg.run_batch_size, ctx.rng))
    uncond = ctx.family.null_conditioning(cfg.run_batch_size, ctx.resolution, ctx.resolution)
    real = {}
    with P.LiveBytes("cpu") as tr:
        out = generator_step(ctx, cond, uncond)
    real["generator"] = tr.peak
    with P.LiveBytes("cpu") as tr:
        fake_score_step(ctx, out["x0_fake_score"], cond)
    real["fake_score"] = tr.peak
    if cfg.disc_kind == "pixel":
        with P.LiveBytes("cpu") as tr:
            discriminator_step(ctx, out["x0_disc"], cond)
        real["disc"] = tr.peak
    assert set(real) == set(planned["phases"])
    for phase, measured in real.items():
        traced = planned["phases"][phase]["traced_peak"]
        assert abs(traced - measured) <= 0.15 * measured, (phase, traced, measured)
    # gradients the generator phase leaves: the student's trainable tensors (and what its backward reaches)
    student = sum(p.numel() * p.element_size() for p in ctx.student.parameters() if p.requires_grad)
    assert planned["phases"]["generator"]["gradients"] >= student


def test_live_bytes_agrees_with_torch_memtracker():
    """The tracker the plan traces with against torch's own MemTracker, on one forward + backward of a tiny UNet
    with every weight trainable (MemTracker needs every parameter to take gradient hooks)."""
    from torch.distributed._tools.mem_tracker import MemTracker
    unet = tm.sdxl_unet()
    unet.requires_grad_(True)
    x = torch.randn(2, 4, 16, 16)
    t = torch.full((2,), 500.0)
    enc = torch.randn(2, 77, tm.TEXT_HIDDEN * 2)
    added = {"text_embeds": torch.randn(2, tm.TEXT_PROJ), "time_ids": torch.randn(2, 6)}

    def step():
        unet(x, t, encoder_hidden_states=enc, added_cond_kwargs=added).sample.square().mean().backward()
    step()  # warm-up: lazily created state
    unet.zero_grad(set_to_none=True)
    mt = MemTracker()
    mt.track_external(unet)
    with mt:
        step()
    snap = mt.get_tracker_snapshot("peak")[torch.device("cpu")]
    reference = snap["Total"] - snap[next(k for k in snap if str(k).endswith("PARAM"))]
    unet.zero_grad(set_to_none=True)
    meta = unet.to("meta")
    xs = [v.to("meta") for v in (x, t, enc)]
    with P.fused_attention(), P.LiveBytes("meta") as tr:
        meta(xs[0], xs[1], encoder_hidden_states=xs[2],
             added_cond_kwargs={k: v.to("meta") for k, v in added.items()}).sample.square().mean().backward()
    # the same storages are live at the peak; MemTracker also counts the inputs created before it started
    assert abs(tr.peak - reference) <= 0.1 * reference, (tr.peak, reference)


def test_plan_command_writes_json_and_says_when_it_does_not_fit(folders, tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"model_teacher: {folders['sdxl']}\nmodel_lora_rank: 2\nrun_batch_size: 2\ndisc_kind: latent\n"
                   "method: dmd2\ndata_real: world\n")
    out = tmp_path / "plan.json"
    # a card that is too small: non-zero exit with one line -- and the plan is still written
    assert main(["plan", "--config", str(cfg), "--processes", "8", "--json", str(out), "--device-memory", "1MB"]) == 2
    err = capsys.readouterr()
    assert "memory plan" in err.out
    lines = err.err.strip().splitlines()
    assert len(lines) == 1 and "does not fit 1MB" in lines[0]
    result = json.loads(out.read_text())
    assert result["peak_bytes_per_device"] > 2 ** 20 and result["fits"] is False
    assert result["fits_cards_gb"]["24"] is True
    assert set(result["strategies"]) == {"single", "ddp", "fsdp2"} and result["strategy"] == "ddp"
    for role in ("teacher", "student", "fake_score", "text_encoders", "vae", "disc"):
        assert set(result["split"][role]) == {"weights", "gradients", "optimizer", "activations"}
    ddp, single = result["strategies"]["ddp"], result["strategies"]["single"]
    assert ddp["peak_bytes_per_device"] > single["peak_bytes_per_device"]  # the gradient buckets
    assert main(["plan", "--config", str(cfg), "--device-memory", "lots"]) == 2
    assert "24GB" in capsys.readouterr().err


def test_a_text_cached_plan_counts_the_encoding_pass(folders, tmp_path):
    """With model_text_cache the text encoders are gone while training, but the prompts are encoded at set-up with the
    teacher, the text encoders and the VAE all on the device (setup.cache_text runs before the roles exist): the plan
    has that stage, its weights are the loaded family's to the byte, and it is the peak when the encoders outweigh
    the training phases' extra (FLUX.2-dev: 60 GiB transformer + 45 GiB Mistral-3 at once)."""
    from flashdmd.families import load_family
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a cat\na photo of a dog\n")
    cfg = _cfg(folders, "sdxl", "flashdmd", model_lora_rank=2, model_text_cache=True, data_prompts=str(prompts))
    result = P.plan(cfg, P.Settings(device="cpu", processes=2))
    fam = load_family(cfg.model_teacher)
    want = P.weights_by_role({"teacher": fam.denoiser, "text_encoders": torch.nn.ModuleList(fam.text_encoders),
                              "vae": fam.vae})
    for name, strat in result["strategies"].items():
        setup_stage = strat["stages"]["setup"]
        assert {r: v["weights"] for r, v in setup_stage["split"].items() if r in want} == want, name
        encode = setup_stage["split"]["text_encoders"]["activations"]
        assert encode > 0 and setup_stage["peak_bytes"] == sum(want.values()) + encode + \
            setup_stage["split"]["runtime"]["other"]
        assert strat["peak_bytes_per_device"] >= setup_stage["peak_bytes"]
    assert result["detail"]["stage1"]["weights"]["text_encoders"] == 0  # released for training


def test_fsdp_shards_a_full_fine_tune(folders):
    cfg = _cfg(folders, "sdxl", "dmd2", model_lora_rank=0, run_batch_size=1)
    result = P.plan(cfg, P.Settings(device="cuda", processes=8, strategy="fsdp2"))
    single = result["strategies"]["single"]["stages"]["stage1"]["split"]
    fsdp = result["strategies"]["fsdp2"]["stages"]["stage1"]["split"]
    assert fsdp["student"]["weights"] == single["student"]["weights"] // 8
    assert fsdp["fake_score"]["optimizer"] == single["fake_score"]["optimizer"] // 8
    assert result["peak_bytes_per_device"] == result["strategies"]["fsdp2"]["peak_bytes_per_device"]


def test_frozen_dtype_and_shared_base_change_the_plan_as_they_change_the_run(folders):
    def weights(device="cpu", **kw):  # the plan's exact counts, without its traces
        cfg = _cfg(folders, "sdxl", "dmd2", model_lora_rank=2, run_batch_size=1, **kw)
        train, frozen = P.dtypes(cfg, device)
        return P.weights_by_role(P.meta_roles(cfg, P.meta_family(cfg.model_teacher, None, train, frozen)))
    shared, copies, bf16 = weights(), weights(model_shared_base=False), weights("cuda")
    assert copies["student"] > 10 * shared["student"]  # a whole base per role against adapters only
    assert bf16["teacher"] * 2 == shared["teacher"] and bf16["vae"] * 2 == shared["vae"]
    assert bf16["student"] == shared["student"]  # the adapters stay in model_dtype


def test_the_plan_follows_the_runs_networks_the_text_conditioned_head(folders):
    """The plan builds the discriminator the run builds (build_roles on the meta family): disc_condition text gives
    the pooled head its projection of the pooled text embedding, and the plan's discriminator weights and AdamW
    states are the real run's to the byte, with the projection and without."""
    from flashdmd.families import load_family
    from flashdmd.training.roles import build_roles
    planned, real = {}, {}
    for condition in ("none", "text"):
        cfg = _cfg(folders, "sdxl", "flashdmd", disc_head="pooled", disc_condition=condition)
        train, frozen = P.dtypes(cfg, "cpu")
        planned[condition] = P.meta_roles(cfg, P.meta_family(cfg.model_teacher, None, train, frozen))["disc"]
        real[condition] = build_roles(cfg, load_family(cfg.model_teacher)).disc
        assert planned[condition].conditional == (condition == "text")
        assert P.weights_by_role({"disc": planned[condition]}) == P.weights_by_role({"disc": real[condition]})
        assert P.adamw_state_bytes(planned[condition], "cpu") == P.adamw_state_bytes(real[condition], "cpu")
    grown = P.trainable_bytes(real["text"]) - P.trainable_bytes(real["none"])
    assert grown > 0 and P.trainable_bytes(planned["text"]) - P.trainable_bytes(planned["none"]) == grown


PRESETS = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.yaml"))
# the real-checkpoint presets name a user's folders (/models/...): pointed at tiny random folders of the same family
# (their full-size plans, on config-only folders, are benchmarks/vram_table.py's)
REAL_PRESET_FAMILY = {"sdxl_flashdmd": "sdxl", "sdxl_dmd2": "sdxl", "sd3_flashdmd": "sd3", "flux_flashdmd": "flux",
                      "flux2_klein_flashdmd": "flux2-klein", "flux2_dev_flashdmd": "flux2",
                      "zimage_flashdmd": "zimage", "qwenimage_flashdmd": "qwenimage"}


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_every_shipped_preset_plans(preset, folders, capsys):
    """`flashdmd plan --config configs/X.yaml` succeeds on every shipped preset as shipped (the world ones include the
    text-conditioned pooled Pixel-GAN head, whose discriminator phase encodes the real images' captions)."""
    assert preset.stem.startswith("world_") or preset.stem in REAL_PRESET_FAMILY, f"{preset.name}: which folders?"
    sets = []
    if preset.stem in REAL_PRESET_FAMILY:
        sets = ["--set", f"model_teacher={folders[REAL_PRESET_FAMILY[preset.stem]]}",
                "--set", f"disc_backbone_path={folders['sam']}"]
    assert main(["plan", "--config", str(preset)] + sets) == 0
    assert "memory plan (single, 1 process(es), cuda)" in capsys.readouterr().out


def test_stage2_plan_matches_a_real_rl_update():
    """Stage 2 on the world teacher (its shipped LRM): reference and reward-model weights, the RL optimiser's state
    and the RL update's traced peak against the real update's."""
    from flashdmd.training.stage2 import rl_step, setup_stage2
    cfg = DistillConfig(model_teacher="world-sdxl", run_batch_size=2, rl_enabled=True, eval_every_steps=0,
                        run_sample_every_steps=0, run_checkpoint_every_steps=0, disc_calibration_images=4)
    planned = P.plan(cfg, P.Settings(device="cpu"))["detail"]["stage2"]
    ctx = setup(cfg)
    setup_stage2(ctx)
    cond = _encode(ctx, ctx.prompts.sample(cfg.run_batch_size, ctx.rng))
    rl_step(ctx, cond)  # AdamW state
    roles = {"teacher": ctx.teacher, "student": ctx.student, "fake_score": ctx.fake_score,
             "text_encoders": torch.nn.ModuleList(ctx.family.text_encoders), "vae": ctx.family.vae, "disc": ctx.disc,
             "reference": ctx.reference, "reward": ctx.reward}
    assert planned["weights"] == P.weights_by_role(roles)
    assert planned["optimizer"]["rl"] == _optimizer_bytes(ctx.opt["rl"])
    ctx.rng.shared_randrange = lambda n: 0  # the plan traces the first RL step index
    with P.LiveBytes("cpu") as tr:
        rl_step(ctx, cond)
    traced = planned["phases"]["rl"]["traced_peak"]
    assert abs(traced - tr.peak) <= 0.15 * tr.peak, (traced, tr.peak)


def test_set_keeps_the_text_of_a_string_field_that_yaml_reads_as_a_boolean():
    assert DistillConfig.from_sources(None, ["model_mixed_precision=no"]).model_mixed_precision == "no"
    with pytest.raises(FlashDMDError, match="must be true or false"):
        DistillConfig.from_sources(None, ["model_shared_base=maybe"])
