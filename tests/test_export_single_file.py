"""`flashdmd export --single-file`: an SDXL student (its LoRA fused) as one original-layout safetensors checkpoint.
Loaded the way its model card says -- ``StableDiffusionXLPipeline.from_single_file(file, config=<teacher folder>)``
with the scheduler its header records, offline -- it reproduces the exported diffusers folder's 4-step latents within
1e-4 (tests/tolerances.py); diffusers' own original -> diffusers converters read every tensor back unchanged (the
export checks that before writing), and bad input is one line.
"""
import json
import re
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).parent))
import tiny_models as tm  # noqa: E402
from test_export_formats import PROMPTS, SEED, TEACHERS, latents, lora_run  # noqa: E402

from flashdmd import FlashDMDError, runfolder  # noqa: E402
from flashdmd.cli import main  # noqa: E402
from flashdmd.export import singlefile  # noqa: E402
from flashdmd.families import FAMILIES  # noqa: E402
from tolerances import contract_bound  # noqa: E402


def sdxl_two_widths(tmp: Path):
    """The tiny SDXL pipeline with text encoder 2 wider than text encoder 1 (48 vs 32, as SDXL's 1280 vs 768): a
    single-file loader tells the two CLIPs apart by that width (diffusers' create_diffusers_clip_model_from_ldm)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection
    pipe = tm.sdxl_pipeline(tmp)
    c = pipe.text_encoder_2.config
    wide = CLIPTextConfig(bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id, pad_token_id=c.pad_token_id,
                          hidden_size=48, intermediate_size=37, layer_norm_eps=1e-5, num_attention_heads=4,
                          num_hidden_layers=5, vocab_size=c.vocab_size, hidden_act="gelu",
                          projection_dim=c.projection_dim)
    torch.manual_seed(21)
    pipe.text_encoder_2 = CLIPTextModelWithProjection(wide).eval()
    torch.manual_seed(22)
    pipe.unet = UNet2DConditionModel.from_config({**pipe.unet.config, "cross_attention_dim": 32 + 48})
    pipe.register_modules(text_encoder_2=pipe.text_encoder_2, unet=pipe.unet)
    return pipe


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A LoRA SDXL run, its fused diffusers folder's latents, and its single-file export."""
    tmp = tmp_path_factory.mktemp("single")
    run = lora_run(tmp, "sdxl", make=sdxl_two_widths)
    assert main(["export", "--run", str(run), "--out", str(tmp / "folder")]) == 0
    out = tmp / "ckpt" / "student.safetensors"
    assert main(["export", "--run", str(run), "--out", str(out), "--single-file"]) == 0
    return run, tmp / "teacher_sdxl", latents(tmp / "folder", "sdxl"), out


def test_from_single_file_reproduces_the_exported_folder(exported):
    from diffusers import LCMScheduler, StableDiffusionXLPipeline
    from diffusers.loaders.single_file_utils import CHECKPOINT_KEY_NAMES
    run, teacher, ref, out = exported
    with safe_open(str(out), "pt") as f:
        meta, keys = f.metadata(), set(f.keys())
        attn_q = f.get_tensor("first_stage_model.decoder.mid.attn_1.q.weight")
    # the original layout: SGM UNet blocks, LDM VAE (1x1-conv attention), CLIP-L and OpenCLIP bigG prefixes
    assert {CHECKPOINT_KEY_NAMES["clip_sdxl"], CHECKPOINT_KEY_NAMES["open_clip_sdxl"],
            "model.diffusion_model.input_blocks.0.0.weight", "model.diffusion_model.label_emb.0.0.weight",
            "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"} <= keys
    assert attn_q.ndim == 4 and not any(k.startswith(("unet.", "vae.", "text_encoder")) for k in keys)
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base"
    # the card's recipe, offline: the teacher folder for configs, the header's scheduler and call arguments
    sched = LCMScheduler.from_config(json.loads(meta["flashdmd.scheduler_config"]))
    pipe = StableDiffusionXLPipeline.from_single_file(str(out), config=str(teacher), scheduler=sched,
                                                      local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    got = pipe(prompt=list(PROMPTS), height=32, width=32, output_type="latent",
               guidance_scale=float(meta["flashdmd.guidance_scale"]), generator=torch.Generator().manual_seed(SEED),
               **json.loads(meta["flashdmd.pipeline_kwargs"])).images
    assert got.shape == ref.shape
    assert (got - ref).abs().max().item() <= contract_bound(ref)
    card = out.with_suffix(".md").read_text()  # the recipe above is the card's
    assert "StableDiffusionXLPipeline.from_single_file(path" in card and "models/checkpoints" in card


def test_the_names_are_the_original_ones(exported):
    """diffusers' converters pass unknown sub-names through, so the round trip alone would accept a diffusers name
    left in place; A1111 / ComfyUI would not. Every resnet and VAE-attention key uses the original vocabulary."""
    with safe_open(str(exported[3]), "pt") as f:
        keys = list(f.keys())
    resnet = re.compile(r"model\.diffusion_model\.(input_blocks\.\d+\.0|output_blocks\.\d+\.0|middle_block\.[02])\.(.+)\."
                        r"(weight|bias)$")
    subs = {m[2] for k in keys if (m := resnet.match(k))}
    assert subs and subs <= {"in_layers.0", "in_layers.2", "out_layers.0", "out_layers.3", "emb_layers.1",
                             "skip_connection", "op"}
    vae = {k.split(".")[-2] for k in keys if ".mid.attn_1." in k}
    assert vae == {"norm", "q", "k", "v", "proj_out"}
    assert not [k for k in keys if re.search(r"(resnets|downsamplers|upsamplers|mid_block|conv_shortcut)", k)]


def test_the_round_trip_check_refuses_what_diffusers_would_not_read_back(exported, tmp_path):
    folder = tmp_path / "f"
    main(["export", "--run", str(exported[0]), "--out", str(folder)])
    parts = {n: singlefile.read_component(folder / n) for n in ("unet", "vae", "text_encoder", "text_encoder_2")}
    configs = {n: json.loads((folder / n / "config.json").read_text()) for n in ("unet", "vae")}
    ckpt = singlefile.sdxl_checkpoint(folder)
    singlefile.check_round_trip(ckpt, parts, configs, folder)  # the export's own: passes
    lost = {k: v for k, v in ckpt.items() if k != "model.diffusion_model.out.2.weight"}
    with pytest.raises(FlashDMDError, match="does not read unet's conv_out.weight back"):
        singlefile.check_round_trip(lost, parts, configs, folder)
    a, b = "first_stage_model.encoder.conv_in.weight", "first_stage_model.decoder.conv_in.weight"
    swapped = {**ckpt, a: ckpt[a] + 1.0}
    with pytest.raises(FlashDMDError, match="vae's encoder.conv_in.weight does not survive"):
        singlefile.check_round_trip(swapped, parts, configs, folder)
    assert b in ckpt


# family, a key of the original layout, a fragment of diffusers' names it does not have (None: the same names)
FILES = [("zimage", "layers.0.attention.qkv.weight", ".to_q."),
         ("qwenimage", "transformer_blocks.0.attn.to_q.weight", None),
         ("flux2-klein", "double_blocks.0.img_attn.qkv.weight", "transformer_blocks.")]


@pytest.mark.parametrize("family,key,absent", FILES, ids=[f for f, _, _ in FILES])
def test_a_diffusion_model_file_loads_with_from_single_file(family, key, absent, tmp_path):
    """Z-Image, Qwen-Image, FLUX.2: the transformer alone in the original layout (a ComfyUI diffusion-model file),
    loaded as the card says -- <Transformer>.from_single_file(file, config=<teacher>, subfolder="transformer") in the
    teacher's pipeline with the header's scheduler -- reproduces the exported folder's latents within 1e-4."""
    import diffusers
    run = lora_run(tmp_path, family)
    teacher = tmp_path / f"teacher_{family}"
    assert main(["export", "--run", str(run), "--out", str(tmp_path / "folder")]) == 0
    ref = latents(tmp_path / "folder", family)
    out = tmp_path / "net.safetensors"
    assert main(["export", "--run", str(run), "--out", str(out), "--single-file"]) == 0
    with safe_open(str(out), "pt") as f:
        meta, keys = f.metadata(), set(f.keys())
    assert key in keys and (absent is None or not any(absent in k for k in keys))
    index = json.loads((tmp_path / "folder" / "model_index.json").read_text())
    sched = getattr(diffusers, meta["flashdmd.scheduler"]).from_config(json.loads(meta["flashdmd.scheduler_config"]))
    net = getattr(diffusers, index["transformer"][1]).from_single_file(str(out), config=str(teacher),
                                                                      subfolder="transformer", local_files_only=True)
    pipe = getattr(diffusers, index["_class_name"]).from_pretrained(teacher, transformer=net, scheduler=sched)
    pipe.set_progress_bar_config(disable=True)
    res = TEACHERS[family][1]
    got = pipe(prompt=list(PROMPTS), height=res, width=res, output_type="latent", generator=torch.manual_seed(SEED),
               **{FAMILIES[family].pipeline_guidance_kwarg: float(meta["flashdmd.guidance_scale"])},
               **json.loads(meta["flashdmd.pipeline_kwargs"])).images
    assert got.shape == ref.shape and (got - ref).abs().max().item() <= contract_bound(ref)
    assert f"{index['transformer'][1]}.from_single_file(path" in out.with_suffix(".md").read_text()


def test_bad_single_file_input_is_one_line(exported, tmp_path, capsys):
    run = exported[0]
    sd3 = tmp_path / "sd3run"
    sd3.mkdir()
    runfolder.write_record(sd3, teacher="x", family="sd3", student_timesteps=[1000.0])
    cases = [(["--run", str(run), "--out", str(tmp_path / "a.ckpt")], "does not end in .safetensors"),
             (["--run", str(sd3), "--out", str(tmp_path / "b.safetensors")], "a sd3 student is exported as a diffusers folder"),
             (["--run", str(run), "--out", str(exported[3])], "exists; refusing to overwrite"),
             (["--run", str(run), "--out", str(tmp_path / "c.safetensors"), "--lora"], "drop --lora")]
    for argv, words in cases:
        capsys.readouterr()
        assert main(["export", *argv, "--single-file"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err and words in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sd3run"]
