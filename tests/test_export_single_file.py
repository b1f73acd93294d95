"""`flashdmd export --single-file`: a student (its LoRA fused) as one safetensors file in its family's original
layout -- SDXL and SD3: the whole pipeline (A1111 / Forge / ComfyUI checkpoints); Z-Image, Qwen-Image, FLUX.1 (at its
released width), FLUX.2: the transformer (ComfyUI diffusion-model files). Loaded the way its model card says -- diffusers' ``from_single_file``
with the teacher's folder for configs and the scheduler its header records, offline -- it reproduces the exported
diffusers folder's 4-step latents within 1e-4 (tests/tolerances.py). diffusers' own original -> diffusers converters
read every tensor back unchanged (the export checks that before writing), and bad input is one line.
"""
import json
from functools import partial
import re
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).parent))
from export_runs import call, shared_run  # noqa: E402

from flashdmd import FlashDMDError  # noqa: E402
from flashdmd.cli import main  # noqa: E402
from flashdmd.export import singlefile  # noqa: E402
from tolerances import contract_bound  # noqa: E402


@pytest.fixture
def export_runs(tmp_path_factory):
    """family -> the session's shared LoRA run and fused export (tests/export_runs.py)."""
    return partial(shared_run, tmp_path_factory)


# family, keys of the original layout, a fragment of diffusers' names it must not hold (None: the same names)
FILES = [("sdxl", ["model.diffusion_model.input_blocks.0.0.weight", "model.diffusion_model.label_emb.0.0.weight",
                   "conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight",
                   "conditioner.embedders.1.model.positional_embedding",
                   "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"], "resnets"),
         ("sd3", ["model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight", "model.diffusion_model.pos_embed",
                  "model.diffusion_model.final_layer.adaLN_modulation.1.weight",
                  "first_stage_model.decoder.conv_in.weight",
                  "text_encoders.clip_l.transformer.text_model.embeddings.position_embedding.weight",
                  "text_encoders.clip_g.transformer.text_model.embeddings.position_embedding.weight"],
          "transformer_blocks"),
         ("zimage", ["layers.0.attention.qkv.weight", "final_layer.linear.weight"], ".to_q."),
         ("qwenimage", ["transformer_blocks.0.attn.to_q.weight"], None),
         ("flux2-klein", ["double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight"],
          "transformer_blocks.")]


_FILES = {}


def single_file(export_runs, family, tmp_path):
    """(run, teacher, fused folder, its latents, the run's single-file export), the export once per family."""
    if family not in _FILES:
        run, teacher, folder, ref = export_runs(family)
        out = tmp_path / "ckpt" / "student.safetensors"
        assert main(["export", "--run", str(run), "--out", str(out), "--single-file"]) == 0
        _FILES[family] = run, teacher, folder, ref, out
    return _FILES[family]


@pytest.mark.parametrize("family,keys,absent", FILES, ids=[f for f, _, _ in FILES])
def test_from_single_file_reproduces_the_exported_folder(export_runs, family, keys, absent, tmp_path):
    import diffusers
    run, teacher, folder, ref, out = single_file(export_runs, family, tmp_path)
    with safe_open(str(out), "pt") as f:
        meta, names = f.metadata(), set(f.keys())
    assert set(keys) <= names and (absent is None or not any(absent in k for k in names))
    index = json.loads((folder / "model_index.json").read_text())
    record = {"guidance_scale": meta["flashdmd.guidance_scale"],
              "pipeline_kwargs": json.loads(meta["flashdmd.pipeline_kwargs"])}
    sched = getattr(diffusers, meta["flashdmd.scheduler"]).from_config(json.loads(meta["flashdmd.scheduler_config"]))
    pipe_cls, net_cls = getattr(diffusers, index["_class_name"]), index[singlefile.denoiser(family)][1]
    card = out.with_suffix(".md").read_text()
    if singlefile.FAMILIES_SINGLE_FILE[family] == "checkpoint":  # the card's recipe: the whole pipeline, one file
        absent_parts = {k: None for k, v in index.items() if isinstance(v, list) and v[0] is None}
        pipe = pipe_cls.from_single_file(str(out), config=str(teacher), scheduler=sched, local_files_only=True,
                                         **absent_parts)
        assert f"{index['_class_name']}.from_single_file(path" in card
    else:  # the transformer from the file, the rest from the base
        net = getattr(diffusers, net_cls).from_single_file(str(out), config=str(teacher), subfolder="transformer",
                                                           local_files_only=True)
        pipe = pipe_cls.from_pretrained(teacher, transformer=net, scheduler=sched)
        assert f"{net_cls}.from_single_file(path" in card
    pipe.set_progress_bar_config(disable=True)
    got = call(pipe, family, record)
    assert got.shape == ref.shape and (got - ref).abs().max().item() <= contract_bound(ref)


def test_sdxl_names_are_the_original_ones(export_runs, tmp_path):
    """diffusers' converters pass unknown sub-names through, so the round trip alone would accept a diffusers name
    left in place; A1111 / ComfyUI would not. Every resnet and VAE-attention key uses the original vocabulary."""
    out = single_file(export_runs, "sdxl", tmp_path)[-1]
    with safe_open(str(out), "pt") as f:
        keys = list(f.keys())
        attn_q = f.get_tensor("first_stage_model.decoder.mid.attn_1.q.weight")
        assert f.metadata()["modelspec.architecture"] == "stable-diffusion-xl-v1-base"
    resnet = re.compile(r"model\.diffusion_model\.(input_blocks\.\d+\.0|output_blocks\.\d+\.0|middle_block\.[02])"
                        r"\.(.+)\.(weight|bias)$")
    subs = {m[2] for k in keys if (m := resnet.match(k))}
    assert subs and subs <= {"in_layers.0", "in_layers.2", "out_layers.0", "out_layers.3", "emb_layers.1",
                             "skip_connection", "op"}
    assert {k.split(".")[-2] for k in keys if ".mid.attn_1." in k} == {"norm", "q", "k", "v", "proj_out"}
    assert attn_q.ndim == 4  # the VAE attention's 1x1 convs
    assert not [k for k in keys if re.search(r"(resnets|downsamplers|upsamplers|mid_block|conv_shortcut)", k)]


def test_the_round_trip_check_refuses_what_diffusers_would_not_read_back(export_runs):
    folder = export_runs("sdxl")[2]
    parts = {n: singlefile.read_component(folder / n) for n in ("unet", "vae", "text_encoder", "text_encoder_2")}
    configs = {n: json.loads((folder / n / "config.json").read_text()) for n in ("unet", "vae")}
    ckpt = singlefile.sdxl_checkpoint(folder)
    singlefile.check_round_trip(ckpt, parts, configs, folder)  # the export's own: passes
    lost = {k: v for k, v in ckpt.items() if k != "model.diffusion_model.out.2.weight"}
    with pytest.raises(FlashDMDError, match="does not read unet's conv_out.weight back"):
        singlefile.check_round_trip(lost, parts, configs, folder)
    key = "first_stage_model.encoder.conv_in.weight"
    with pytest.raises(FlashDMDError, match="vae's encoder.conv_in.weight does not survive"):
        singlefile.check_round_trip({**ckpt, key: ckpt[key] + 1.0}, parts, configs, folder)


def _thin_flux_1(layers: int = 2, single: int = 2) -> dict:
    """A FLUX.1 transformer's state dict in diffusers' names at the released width (24 heads of 128: 3072) with every
    tensor one column wide: diffusers' reader only splits, chunks and swaps rows, so the round trip is exact and
    covers every key while holding a few MB (the real one is 12 B parameters)."""
    import torch
    from diffusers import FluxTransformer2DModel
    with torch.device("meta"):
        net = FluxTransformer2DModel(num_layers=layers, num_single_layers=single, attention_head_dim=128,
                                     num_attention_heads=24, joint_attention_dim=32, pooled_projection_dim=16,
                                     guidance_embeds=True, axes_dims_rope=(16, 56, 56))
    gen = torch.Generator().manual_seed(0)
    return {k: torch.randn(t.shape[:1] + (1,) * (t.ndim > 1), generator=gen) for k, t in net.state_dict().items()}


def test_flux_1_original_layout_is_what_diffusers_reads_back():
    """FLUX.1 at its released width: BFL's names (flux1-dev.safetensors), and diffusers' own reader takes every key
    (nothing left over) and gives every tensor back under its diffusers name, bit for bit."""
    import torch
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers as read
    sd = _thin_flux_1()
    ckpt = singlefile.flux_to_original(sd)
    assert {"double_blocks.1.img_attn.qkv.weight", "double_blocks.0.txt_attn.norm.key_norm.scale",
            "single_blocks.1.linear1.bias", "single_blocks.0.modulation.lin.weight", "guidance_in.out_layer.bias",
            "final_layer.adaLN_modulation.1.weight", "vector_in.in_layer.weight", "img_in.weight"} <= set(ckpt)
    assert ckpt["single_blocks.0.linear1.weight"].shape[0] == 3 * 3072 + 4 * 3072
    left = dict(ckpt)
    back = read(left)
    assert not left and set(back) == set(sd)
    assert all(torch.equal(back[k], t) for k, t in sd.items())
    shift, scale = sd["norm_out.linear.weight"].chunk(2)  # diffusers: (scale, shift); BFL: (shift, scale)
    assert torch.equal(ckpt["final_layer.adaLN_modulation.1.weight"], torch.cat([scale, shift]))


def test_bad_single_file_input_is_one_line(export_runs, tmp_path, capsys):
    run, teacher = export_runs("sdxl")[:2]
    flux = export_runs("flux")[0]  # the test FLUX.1 is narrower than the released 3072
    taken = tmp_path / "taken.safetensors"
    taken.write_bytes(b"mine")
    cases = [(["--run", str(run), "--out", str(tmp_path / "a.ckpt")], "does not end in .safetensors"),
             (["--run", str(flux), "--out", str(tmp_path / "b.safetensors")], "only reads the released 3072-wide"),
             (["--run", str(run), "--out", str(taken)], "exists; refusing to overwrite"),
             (["--run", str(run), "--out", str(teacher / "s.safetensors")], "lies inside"),
             (["--run", str(run), "--out", str(tmp_path / "c.safetensors"), "--lora"], "drop --lora")]
    for argv, words in cases:
        capsys.readouterr()
        assert main(["export", *argv, "--single-file"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err and words in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken.safetensors"]
    assert taken.read_bytes() == b"mine" and not (teacher / "s.safetensors").exists()
