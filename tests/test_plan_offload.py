"""flashdmd plan with model_offload: which frozen parts each phase holds (traced, checked against the parts' own
tensors), the streamed base's resident bound (non-block rest + the 2 or 3 largest blocks), the block calls of a
checkpointed phase (against the calls a real run makes), the transfers per iteration, the set-up without the
denoiser, SDXL refused, and --suggest choosing the offload rungs."""
import dataclasses
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import tiny_models as tm  # noqa: E402

from flashdmd import FlashDMDError  # noqa: E402
from flashdmd.cli import main  # noqa: E402
from flashdmd.families import load_family  # noqa: E402
from flashdmd.training import plan as P  # noqa: E402
from flashdmd.training.distill import _encode, fake_score_step, generator_step, setup  # noqa: E402
from flashdmd.training.memory.residency import Residency  # noqa: E402
from flashdmd.training.memory.suggest import suggest  # noqa: E402
from flashdmd.training.roles import build_roles  # noqa: E402
from flashdmd.training.setup import student_steps  # noqa: E402

CUDA = P.Settings(device="cuda")  # planned for CUDA: a fixed runtime, so that plans compare to the byte


@pytest.fixture(scope="module")
def folders(tiny_run_folders, tmp_path_factory):
    """The tiny run folders and an SD3 teacher with four transformer blocks (three full, the last context-pre-only
    and smaller), so that its 2 and 3 largest blocks are less than all of them."""
    from diffusers import SD3Transformer2DModel
    tmp = tmp_path_factory.mktemp("offload")
    pipe = tm.sd3_pipeline(tmp)
    torch.manual_seed(0)
    pipe.transformer = SD3Transformer2DModel.from_config(dict(pipe.transformer.config, num_layers=4))
    prompts = tmp / "prompts.txt"
    prompts.write_text("a photo of a cat\na photo of a dog\n")
    return dict(tiny_run_folders, sd3x4=tm.save_pipeline(pipe, tmp / "sd3x4"), prompts=prompts,
                sd3t5=tm.save_pipeline(tm.sd3_pipeline(tmp, with_t5=True), tmp / "sd3t5"))


def _cfg(folders, offload="none", family="sd3x4", method="flashdmd", **kw):
    base = dict(run_batch_size=2, model_lora_rank=2, model_gradient_checkpointing=True, model_offload=offload,
                fake_score_ttur=3, data_real="world")
    return tm.run_config(folders, family, method, **{**base, **kw})


def _bytes(module) -> int:
    """A module's own bytes: every distinct parameter and buffer storage."""
    seen = {t.untyped_storage()._cdata: t.untyped_storage().nbytes()
            for t in list(module.parameters()) + list(module.buffers())}
    return sum(seen.values())


@pytest.fixture(scope="module")
def parts(folders):
    """The frozen parts' bytes, from the real tiny modules in the dtype a CUDA run holds them in (bfloat16), and the
    teacher's blocks' bytes (SD3: its transformer_blocks)."""
    cfg = _cfg(folders)
    fam = load_family(cfg.model_teacher, dtype=torch.float32, frozen_dtype=torch.bfloat16)
    disc = build_roles(cfg, fam).disc
    blocks = sorted((_bytes(b) for b in fam.denoiser.transformer_blocks), reverse=True)
    return {"text_encoders": sum(_bytes(e) for e in fam.text_encoders if e is not None), "vae": _bytes(fam.vae),
            "disc_backbone": _bytes(disc.backbone), "teacher": _bytes(fam.denoiser), "blocks": blocks,
            "K": len(student_steps(cfg, fam)[0])}


@pytest.fixture(scope="module")
def plans(folders):
    return {mode: P.plan(_cfg(folders, mode), CUDA) for mode in ("none", "frozen", "base")}


def _phase_totals(result, stage="stage1"):
    return result["strategies"]["single"]["stages"][stage]["per_phase"]


def test_frozen_holds_only_the_parts_a_phase_reads(plans, parts):
    none, frozen = plans["none"], plans["frozen"]
    assert "transfers" not in none and "encode" not in none["detail"]["stage1"]["phases"]
    te, vae, backbone = parts["text_encoders"], parts["vae"], parts["disc_backbone"]
    # Flash-DMD with the Pixel-GAN: the generator decodes its x0 and judges it, the fake score reads neither, the
    # discriminator decodes and judges; the prompts' encoding (its own phase) reads the text encoders alone
    reads = {"generator": ["vae", "disc_backbone"], "fake_score": [], "disc": ["vae", "disc_backbone"],
             "encode": ["text_encoders"]}
    phases = frozen["detail"]["stage1"]["phases"]
    assert {n: p["use"]["parts"] for n, p in phases.items()} == reads
    every = sum(none["detail"]["stage1"]["weights"].values())
    saved = {"generator": te, "fake_score": te + vae + backbone, "disc": te, "encode": vae + backbone}
    for name, drop in saved.items():  # the same phase's weights, less the parts it does not read
        assert sum(phases[name]["resident"].values()) == every - drop, name
    # the generator's peak is its traced one either way (none counts the encoding in every phase, as its floor)
    assert _phase_totals(none)["generator"] - _phase_totals(frozen)["generator"] == te
    assert phases["encode"]["traced_peak"] == none["detail"]["stage1"]["encode_peak"] > 0
    # the Pixel-GAN's split: its backbone an offloaded part of its own, the heads (trainable) in "disc"
    w = frozen["detail"]["stage1"]["weights"]
    assert w["disc_backbone"] == backbone and w["disc_backbone"] + w["disc"] == none["detail"]["stage1"]["weights"][
        "disc"]
    t = frozen["transfers"]["stage1"]
    assert t["per_phase_bytes"] == {"generator": vae + backbone, "fake_score": 0, "disc": vae + backbone,
                                    "encode": te}
    # fake_score_ttur 3: the generator phase in one iteration of three
    assert t["rollout_bytes"] == 0 and t["per_iteration_bytes"] == (3 * (vae + backbone + te) + vae + backbone) // 3


def test_base_holds_the_non_block_rest_and_two_or_three_largest_blocks(plans, parts, folders):
    base = plans["base"]
    blocks, teacher = parts["blocks"], parts["teacher"]
    assert len(blocks) == 4 and blocks[2] > blocks[3]  # so that 2 < 3 < all of them
    rest = teacher - sum(blocks)
    assert base["transfers"]["base"] == {"streamed_bytes": sum(blocks), "non_block_bytes": rest, "blocks": 4,
                                         "largest_block_bytes": blocks[:3]}
    resident = {n: p["resident"]["teacher"] for n, p in base["detail"]["stage1"]["phases"].items()}
    # the student's and the fake score's backward run through the shared base (3 blocks); the discriminator and
    # the prompts' encoding call no block
    assert resident == {"generator": rest + sum(blocks[:3]), "fake_score": rest + sum(blocks[:3]), "disc": rest,
                        "encode": rest}
    frozen = plans["frozen"]
    assert _phase_totals(frozen)["disc"] - _phase_totals(base)["disc"] == sum(blocks)
    # a forward-only phase (the teacher's no-grad forward, as the DM loss and a full fine-tune's phases run it):
    # each block called once, no backward through them -- 2 blocks
    run = P.meta_run(_cfg(folders, "base"), "cuda")
    res, s = Residency("base", P.role_modules(run), run.setup.family), run.setup
    cond = s.family.encode_prompts(["a prompt"], s.resolution, s.resolution)
    x = torch.zeros((1,) + tuple(s.family.latent_shape(s.resolution, s.resolution)), device="meta",
                    dtype=s.family.dtype)
    with res.phase() as use, torch.no_grad(), P.fused_attention():
        s.family.predict(s.teacher, x, torch.full((1,), 500.0, device="meta"), cond)
    assert use["block_calls"] == 4 and use["block_bytes"] == sum(blocks) and not use["base_backward"]
    assert res.resident(use)["teacher"] == rest + sum(blocks[:2])


def _count_calls(modules):
    calls = [0]
    handles = [b.register_forward_pre_hook(lambda m, a: calls.__setitem__(0, calls[0] + 1))
               for m in modules for b in m.transformer_blocks]
    return calls, handles


@pytest.mark.parametrize("checkpointing", [True, False])
def test_block_calls_are_the_real_runs_recomputation_included(folders, plans, checkpointing):
    """The streamed blocks' calls the plan counts in the generator and fake-score phases (each a copy of the block's
    tensors under base) against the block calls a real run's generator_step / fake_score_step make: equal with
    gradient checkpointing, and more than without it (the recomputation in backward calls every block again)."""
    cfg = _cfg(folders, "none", model_gradient_checkpointing=checkpointing)
    ctx = setup(cfg)
    ctx.rng.shared_randrange = lambda n: n - 1  # the plan traces the last DM step
    cond = _encode(ctx, ctx.prompts.sample(cfg.run_batch_size, ctx.rng))
    uncond = ctx.family.null_conditioning(cfg.run_batch_size, ctx.resolution, ctx.resolution)
    calls, _ = _count_calls([ctx.teacher, ctx.student, ctx.fake_score])
    out = generator_step(ctx, cond, uncond)
    real = {"generator": calls[0]}
    calls[0] = 0
    fake_score_step(ctx, out["x0_fake_score"], cond)
    real["fake_score"] = calls[0]
    planned = plans["base"]["transfers"]["stage1"]["block_calls"]
    if checkpointing:
        assert real == {k: planned[k] for k in real}
        assert real["fake_score"] == 2 * 4  # one forward of the fake score's 4 blocks, and its recomputation
    else:
        assert real["fake_score"] == 4 and real["generator"] < planned["generator"]


def test_transfers_per_iteration_follow_the_ttur_cycle(plans, parts, folders):
    """Per Stage-1 iteration: the encoding, fake-score and discriminator phases every iteration; the generator phase
    once per fake_score_ttur (3) iterations, a no-grad rollout in the others; each block call copies its block."""
    t = plans["base"]["transfers"]["stage1"]
    vae, backbone, te, blocks = parts["vae"], parts["disc_backbone"], parts["text_encoders"], parts["blocks"]
    per_call = sum(blocks) / len(blocks)  # every forward calls each block once
    phase = t["per_phase_bytes"]
    assert phase["generator"] == vae + backbone + t["block_calls"]["generator"] * per_call
    assert phase["fake_score"] == t["block_calls"]["fake_score"] * per_call and phase["encode"] == te
    # the no-grad rollout: K + 1 student forwards (k backward-simulation steps, the prediction, K-1-k finishing
    # steps, the low-noise GAN step's prediction), whichever step k it draws
    assert t["rollout_bytes"] == (parts["K"] + 1) * sum(blocks)
    assert t["generator_mean_bytes"] == phase["generator"]  # Flash-DMD: the same forwards at every drawn step
    cycle = 3 * (phase["fake_score"] + phase["disc"] + phase["encode"]) + phase["generator"] + 2 * t["rollout_bytes"]
    assert t["cycle_iterations"] == 3 and t["per_cycle_bytes"] == cycle and t["per_iteration_bytes"] == cycle // 3
    assert t["per_iteration_seconds"] == round(cycle / 3 / 25e9, 3)


def test_offload_set_up_holds_the_text_encoders_alone(folders, parts, tmp_path, capsys):
    """`flashdmd plan` with model_offload and the text cache: the set-up's encoding pass holds the text encoders and
    their activations, not the denoiser or the VAE; no phase encodes; the transfer line under the headline."""
    cfg = _cfg(folders, "frozen", model_text_cache=True, data_prompts=str(folders["prompts"]))
    (tmp_path / "run.yaml").write_text(cfg.to_yaml())
    out = tmp_path / "plan.json"
    assert main(["plan", "--config", str(tmp_path / "run.yaml"), "--h2d-gbps", "12.5", "--json", str(out)]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("memory plan") and printed[1].startswith("offload frozen: ")
    assert "12.5 GB/s" in printed[1]
    result = json.loads(out.read_text())
    s = result["strategies"]["single"]["stages"]["setup"]
    enc = s["split"]["text_encoders"]["activations"]
    assert {r: v["weights"] for r, v in s["split"].items() if r != "runtime"} == {"text_encoders": parts[
        "text_encoders"]}
    assert enc > 0 and s["peak_bytes"] == parts["text_encoders"] + enc + P.CUDA_RUNTIME_BYTES
    assert "encode" not in result["detail"]["stage1"]["phases"]
    assert result["transfers"]["stage1"]["per_phase_bytes"]["fake_score"] == 0


def test_sdxl_base_is_refused_in_one_line(folders, capsys):
    with pytest.raises(FlashDMDError, match="model_offload base: the sdxl denoiser .UNet2DConditionModel. has no whole-block"):
        P.plan(_cfg(folders, "base", family="sdxl"), CUDA)
    assert main(["plan", "--set", f"model_teacher={folders['sdxl']}", "--set", "model_lora_rank=2",
                 "--set", "model_gradient_checkpointing=true", "--set", "model_offload=base"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "model_offload frozen" in lines[0]


def _start(folders, family):
    """Text cache, checkpointing, int8 text encoders and Pixel-GAN backbone already set: the ladder left starts at
    model_offload frozen, then the int8 base, then model_offload base."""
    return _cfg(folders, family=family, model_text_cache=True, data_prompts=str(folders["prompts"]),
                model_lora_rank=8, model_text_encoder_quant="int8", disc_backbone_quant="int8")


def _memo():
    memo = {}

    def plan(c, s):
        key = c.to_yaml()
        if key not in memo:
            memo[key] = P.plan(c, s)
        return memo[key]
    return plan


def test_suggest_picks_model_offload_frozen_for_a_set_up_peak(folders):
    """An SD3 teacher with a T5 encoder (FLUX.2-dev's case in small): the text cache's encoding pass, with the
    teacher and VAE next to the text encoders, is the peak; model_offload=frozen encodes without them and fits."""
    plan = _memo()
    start = _start(folders, "sd3t5")
    configured = plan(start, CUDA)
    assert configured["peak_phase"] == "setup/text_cache"
    frozen = plan(dataclasses.replace(start, model_offload="frozen"), CUDA)
    assert frozen["peak_bytes_per_device"] < configured["peak_bytes_per_device"]
    picked = suggest(start, P.Settings(device="cuda", device_memory=int(frozen["peak_bytes_per_device"] / 0.95) + 1),
                     plan)
    assert picked["fits"] and picked["set"] == ["model_offload=frozen"] and picked["pruned"] == []
    assert picked["notes"]["model_offload"].startswith("same numbers; ")


def test_suggest_picks_model_offload_base_over_frozen_when_only_streaming_fits(folders):
    """Where the generator phase is the peak (it reads the VAE and the Pixel-GAN backbone, so offloading the frozen
    parts, set already with the int8 base, saves nothing there), a card that only the streamed base fits takes
    model_offload=base in place of frozen, its note giving the bytes copied per iteration."""
    plan = _memo()
    start = dataclasses.replace(_start(folders, "sd3x4"), model_offload="frozen", model_frozen_quant="int8")
    streamed = plan(dataclasses.replace(start, model_offload="base"), CUDA)
    memory = int(streamed["peak_bytes_per_device"] / 0.95) + 1
    picked = suggest(start, P.Settings(device="cuda", device_memory=memory), plan)
    assert [t["overrides"] for t in picked["tried"]] == [{}, {"model_offload": "base"}]
    assert picked["tried"][0]["peak_bytes"] > 0.95 * memory >= picked["tried"][1]["peak_bytes"]
    assert picked["tried"][0]["peak_phase"] == "stage1/generator"
    assert picked["fits"] and picked["set"] == ["model_offload=base"]
    assert picked["peak_bytes"] == streamed["peak_bytes_per_device"] and picked["pruned"] == []
    gib = streamed["transfers"]["stage1"]["per_iteration_bytes"] / 2 ** 30
    assert f"same numbers; {gib:.1f} GiB over PCIe per iteration" in picked["notes"]["model_offload"]
