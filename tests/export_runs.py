"""LoRA run folders on tiny teachers of every family, for the export tests (tests/test_export_formats.py,
tests/test_export_card.py, tests/test_export_single_file.py): written by the run folder's writer
(flashdmd.runfolder: run.json + random adapters with rank 2 and alpha 4, so that alpha / rank matters) -- export
only reads those files -- and, once per session and family, the run's fused export and its latents.

The SDXL and SD3 teachers have text encoders of two widths (32 and 48, as SDXL's 768 and 1280): a single-file
loader tells its CLIPs apart by width. SD3's CLIP-L projection is the identity, as SD3's single-file layout (which
has none) assumes.
"""
import json
from pathlib import Path

import torch

import tiny_flux2
import tiny_models as tm
import tiny_qwenimage
import tiny_zimage
from flashdmd import runfolder
from flashdmd.cli import main
from flashdmd.families import FAMILIES, load_family
from flashdmd.networks import lora

RANK, ALPHA = 2, 4.0
PROMPTS = ["a red shoe", "a small bag"]
SEED = 11


def _wide_clip(narrow, seed: int):
    """A CLIPTextModelWithProjection like ``narrow`` (same tokens, projection) but 48 wide."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection
    c = narrow.config
    wide = CLIPTextConfig(bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id, pad_token_id=c.pad_token_id,
                          hidden_size=48, intermediate_size=37, layer_norm_eps=1e-5, num_attention_heads=4,
                          num_hidden_layers=5, vocab_size=c.vocab_size, hidden_act="gelu",
                          projection_dim=c.projection_dim)
    torch.manual_seed(seed)
    return CLIPTextModelWithProjection(wide).eval()


def sdxl_two_widths(tmp: Path):
    from diffusers import UNet2DConditionModel
    pipe = tm.sdxl_pipeline(tmp)
    te2 = _wide_clip(pipe.text_encoder_2, 21)
    torch.manual_seed(22)
    unet = UNet2DConditionModel.from_config({**pipe.unet.config, "cross_attention_dim": 32 + 48})
    pipe.register_modules(text_encoder_2=te2, unet=unet)
    return pipe


def sd3_two_widths(tmp: Path):
    pipe = tm.sd3_pipeline(tmp)
    with torch.no_grad():
        pipe.text_encoder.text_projection.weight.copy_(torch.eye(pipe.text_encoder.config.hidden_size))
    pipe.register_modules(text_encoder_2=_wide_clip(pipe.text_encoder_2, 23))
    return pipe


# family -> (tiny pipeline builder, resolution of the call)
TEACHERS = {"sdxl": (sdxl_two_widths, 32), "sd3": (sd3_two_widths, 32), "flux": (tm.flux_pipeline, 32),
            "qwenimage": (tiny_qwenimage.qwenimage_pipeline, 32), "zimage": (tiny_zimage.zimage_pipeline, 48),
            "flux2-klein": (tiny_flux2.klein_pipeline, 32)}


def lora_run(tmp: Path, family: str) -> Path:
    """A tiny teacher folder ``tmp/teacher_<family>`` and a LoRA run folder ``tmp/run_<family>`` on it (random
    lora_B, so that the adapter changes the output)."""
    make, res = TEACHERS[family]
    teacher = tm.save_pipeline(make(tmp), tmp / f"teacher_{family}")
    fam = load_family(teacher)
    net = lora.attach(fam.denoiser, RANK, ALPHA)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    run = tmp / f"run_{family}"
    run.mkdir()
    runfolder.write_student(run, net, RANK)
    runfolder.write_record(run, teacher=str(teacher), family=fam.name, teacher_path=str(teacher),
                           student_timesteps=[float(t) for t in fam.default_student_timesteps], resolution=res,
                           embedded_guidance=3.5, lora_rank=RANK, lora_alpha=ALPHA, generator_steps=1, rl_steps=0,
                           method="flashdmd")
    return run


_CACHE: dict = {}


def shared_run(tmp_path_factory, family: str):
    """(run folder, teacher folder, fused export folder, its latents) of ``family``, built once per session (in a
    folder of the session's tmp_path_factory) and shared by the export test modules."""
    if "tmp" not in _CACHE:
        _CACHE["tmp"] = tmp_path_factory.mktemp("export_runs")
    tmp = _CACHE["tmp"]
    if family not in _CACHE:
        run = lora_run(tmp, family)
        fused = tmp / f"fused_{family}"
        assert main(["export", "--run", str(run), "--out", str(fused)]) == 0
        _CACHE[family] = run, tmp / f"teacher_{family}", fused, latents(fused, family)
    return _CACHE[family]


def latents(folder: Path, family: str, weight_name: str | None = None):
    """Plain diffusers: the folder's pipeline (with ``weight_name``: its LoRA file loaded and fused), called with
    the folder's documented arguments."""
    from diffusers import DiffusionPipeline
    record = json.loads((folder / "flashdmd_export.json").read_text())
    pipe = DiffusionPipeline.from_pretrained(folder, **{k: None for k in record["missing_components"]})
    pipe.set_progress_bar_config(disable=True)
    if weight_name:
        pipe.load_lora_weights(folder, weight_name=weight_name)
        pipe.fuse_lora()
    return call(pipe, family, record)


def call(pipe, family: str, record: dict):
    """4-step latents of ``pipe`` with the documented arguments ``record`` (flashdmd_export.json, or a single file's
    header) holds; the generator as the export's README says (SDXL's own, the flow pipelines' global one)."""
    res = TEACHERS[family][1]
    gen = torch.Generator().manual_seed(SEED) if FAMILIES[family].export_scheduler == "lcm" else torch.manual_seed(SEED)
    kw = {FAMILIES[family].pipeline_guidance_kwarg: float(record["guidance_scale"])}
    # a copy: ZImagePipeline.encode_prompt rewrites the list in place (chat template)
    return pipe(prompt=list(PROMPTS), height=res, width=res, output_type="latent", generator=gen, **kw,
                **record["pipeline_kwargs"]).images
