"""Tiny random-weight models of the real SDXL / SD3 architectures, assembled into real diffusers pipelines.

Everything is built from configs (no hub access): a CLIP BPE tokenizer and a T5 unigram tokenizer are
written on the fly, sized just above the 100-token sanity floor the adapters enforce. Later tests reuse
these builders; each call with the same seed gives identical weights.

* :func:`clip_tokenizer` -- CLIPTokenizer, 518 tokens (256 byte chars, 256 ``</w>`` variants, 4 merges,
  2 specials), ``model_max_length`` 77.
* :func:`sdxl_pipeline` -- StableDiffusionXLPipeline: UNet2DConditionModel (``text_time``, cross-attn dim
  64 = 32 + 32), CLIPTextModel + CLIPTextModelWithProjection (hidden 32, projection 32), AutoencoderKL
  (factor 2, scaling 0.13025), EulerDiscreteScheduler (SDXL's config: scaled_linear, ``leading``).
* :func:`sd3_pipeline` -- StableDiffusion3Pipeline: SD3Transformer2DModel (patch 1, 2 blocks, joint dim
  96), two CLIPTextModelWithProjection, optional tiny T5 (d_model 96, so the CLIP embeds get padded),
  AutoencoderKL (scaling 1.5305, shift 0.0609), FlowMatchEulerDiscreteScheduler(shift=3).
* :func:`save_pipeline` -- ``save_pretrained`` into a folder and return its path.
* :func:`clip_model_folder` -- a transformers CLIPModel folder (hidden 32, 2 layers, image 32, patch 8,
  projection 32) with tokenizer and CLIPImageProcessor config: what the CLIP-score / PickScore / HPSv2
  metric backends load.
* :func:`random_fid_inception` -- a random FID Inception weights file in pytorch-fid's release format.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

BYTE_MERGES = [("t", "h"), ("th", "e</w>"), ("o", "f</w>"), ("i", "n")]
TEXT_HIDDEN = 32
TEXT_PROJ = 32


def _bytes_to_unicode() -> list[str]:
    """GPT-2/CLIP byte -> printable unicode table, in byte order (256 chars)."""
    from flashdmd.world.tokenizer import bytes_to_unicode
    table = bytes_to_unicode()
    return [table[b] for b in range(256)]


def write_clip_vocab(folder: Path) -> tuple[Path, Path]:
    """Write a 518-token CLIP ``vocab.json`` and ``merges.txt`` into ``folder``; return their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    chars = _bytes_to_unicode()
    tokens = chars + [c + "</w>" for c in chars] + [a + b for a, b in BYTE_MERGES]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab, merges = folder / "vocab.json", folder / "merges.txt"
    vocab.write_text(json.dumps({t: i for i, t in enumerate(tokens)}), encoding="utf-8")
    merges.write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in BYTE_MERGES), encoding="utf-8")
    return vocab, merges


def clip_tokenizer(folder: Path):
    """A real-format CLIPTokenizer (518 tokens) built from files written into ``folder``."""
    from transformers import CLIPTokenizer

    vocab, merges = write_clip_vocab(Path(folder))
    return CLIPTokenizer(str(vocab), str(merges), model_max_length=77)


def t5_tokenizer():
    """A T5Tokenizer (unigram, 160 pieces: specials, '▁', a-z, '▁a'..'▁z', digits, punctuation, words)."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    singles = letters + [str(d) for d in range(10)] + list(".,!?-'")
    pieces += [(c, -5.0) for c in singles] + [("▁" + c, -4.0) for c in singles]
    words = ["photo", "cat", "dog", "digit", "seven", "three", "drawing", "number", "handwritten", "the", "of"]
    pieces += [("▁" + w, -3.0) for w in words]
    while len(pieces) < 160:
        pieces.append((f"▁tok{len(pieces)}", -8.0))
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=512)


def clip_encoders(vocab_size: int, bos: int, eos: int, seed: int):
    """(CLIPTextModel, CLIPTextModelWithProjection) with hidden 32, 5 layers, projection 32."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(bos_token_id=bos, eos_token_id=eos, pad_token_id=eos, hidden_size=TEXT_HIDDEN,
                         intermediate_size=37, layer_norm_eps=1e-5, num_attention_heads=4, num_hidden_layers=5,
                         vocab_size=vocab_size, hidden_act="gelu", projection_dim=TEXT_PROJ)
    torch.manual_seed(seed)
    te1 = CLIPTextModel(cfg)
    torch.manual_seed(seed + 1)
    te2 = CLIPTextModelWithProjection(cfg)
    return te1.eval(), te2.eval()


def _ids(tok) -> tuple[int, int]:
    return tok.bos_token_id, tok.eos_token_id


def sdxl_vae(seed: int = 0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(block_out_channels=[16, 32], in_channels=3, out_channels=3, norm_num_groups=8,
                         down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                         latent_channels=4, sample_size=32, scaling_factor=0.13025)


def sdxl_unet(seed: int = 0):
    """SDXL-style UNet2DConditionModel (text_time), sample 16 (=> default 32x32 pixels), 1.4 M params."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, norm_num_groups=8,
        addition_embed_type="text_time", addition_time_embed_dim=8, transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=6 * 8 + TEXT_PROJ, cross_attention_dim=2 * TEXT_HIDDEN)


def sdxl_scheduler(timestep_spacing: str = "leading"):
    """SDXL's own EulerDiscreteScheduler config (``leading`` spacing, steps_offset 1)."""
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                  steps_offset=1, timestep_spacing=timestep_spacing, prediction_type="epsilon")


def sdxl_pipeline(tmp: Path, seed: int = 0, **pipe_kwargs):
    """A complete tiny StableDiffusionXLPipeline (float32, CPU). ``tmp`` receives the tokenizer files."""
    from diffusers import StableDiffusionXLPipeline

    tok = clip_tokenizer(Path(tmp) / "clip_vocab")
    te1, te2 = clip_encoders(len(tok), *_ids(tok), seed=seed + 10)
    return StableDiffusionXLPipeline(vae=sdxl_vae(seed), text_encoder=te1, text_encoder_2=te2, tokenizer=tok,
                                     tokenizer_2=tok, unet=sdxl_unet(seed), scheduler=sdxl_scheduler(),
                                     **pipe_kwargs)


def sd3_transformer(seed: int = 0, joint_dim: int = 96, sd35: bool = False):
    """SD3Transformer2DModel, patch 1, 2 joint blocks (the last one context-pre-only), sample 16; ``sd35``: SD3.5's
    additions -- RMS qk-norm and a dual-attention (MMDiT-X) first block."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    extra = {"qk_norm": "rms_norm", "dual_attention_layers": (0,)} if sd35 else {}
    return SD3Transformer2DModel(sample_size=16, patch_size=1, in_channels=4, num_layers=2, attention_head_dim=8,
                                 num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=joint_dim,
                                 pooled_projection_dim=2 * TEXT_PROJ, out_channels=4, pos_embed_max_size=32, **extra)


def sd3_vae(seed: int = 0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(block_out_channels=[8, 16], in_channels=3, out_channels=3, norm_num_groups=4,
                         down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                         latent_channels=4, sample_size=32, use_quant_conv=False, use_post_quant_conv=False,
                         scaling_factor=1.5305, shift_factor=0.0609)


def t5_encoder(vocab_size: int, d_model: int = 96, seed: int = 0):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    cfg = T5Config(vocab_size=vocab_size, d_model=d_model, d_ff=37, d_kv=8, num_layers=2, num_heads=4,
                   relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    return T5EncoderModel(cfg).eval()


def sd3_pipeline(tmp: Path, seed: int = 0, with_t5: bool = False, sd35: bool = False):
    """A complete tiny StableDiffusion3Pipeline; T5 (text_encoder_3) only when ``with_t5``; ``sd35``: an SD3.5-style
    transformer (qk-norm, dual attention)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    tok = clip_tokenizer(Path(tmp) / "clip_vocab")
    _, te1 = clip_encoders(len(tok), *_ids(tok), seed=seed + 20)
    _, te2 = clip_encoders(len(tok), *_ids(tok), seed=seed + 30)
    tok3 = t5_tokenizer() if with_t5 else None
    te3 = t5_encoder(len(tok3), seed=seed + 40) if with_t5 else None
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    return StableDiffusion3Pipeline(transformer=sd3_transformer(seed, sd35=sd35), scheduler=scheduler, vae=sd3_vae(seed),
                                    text_encoder=te1, tokenizer=tok, text_encoder_2=te2, tokenizer_2=tok,
                                    text_encoder_3=te3, tokenizer_3=tok3)


def flux_transformer(seed: int = 0, guidance_embeds: bool = True, joint_dim: int = 96):
    """FluxTransformer2DModel: one double- and two single-stream blocks, 16 packed channels (4 latent x 2x2)."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=2,
                                  attention_head_dim=8, num_attention_heads=2, joint_attention_dim=joint_dim,
                                  pooled_projection_dim=TEXT_HIDDEN, guidance_embeds=guidance_embeds,
                                  axes_dims_rope=(2, 2, 4))


def flux_vae(seed: int = 0, blocks: int = 2):
    """A FLUX-style VAE (scaling and shift); ``blocks`` 2: factor 2, 1: factor 1 (default resolution 128 px)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(block_out_channels=[8, 16][:blocks], in_channels=3, out_channels=3, norm_num_groups=4,
                         down_block_types=["DownEncoderBlock2D"] * blocks, up_block_types=["UpDecoderBlock2D"] * blocks,
                         latent_channels=4, sample_size=32, use_quant_conv=False, use_post_quant_conv=False,
                         scaling_factor=0.3611, shift_factor=0.1159)


def flux_pipeline(tmp: Path, seed: int = 0, guidance_embeds: bool = True, vae_blocks: int = 2):
    """A complete tiny FluxPipeline: dev-style (guidance embedding) or, with ``guidance_embeds=False``,
    schnell-style; CLIP-L pooled + a tiny T5; FLUX.1's dynamically shifted FlowMatchEuler scheduler."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    tok = clip_tokenizer(Path(tmp) / "clip_vocab")
    te1, _ = clip_encoders(len(tok), *_ids(tok), seed=seed + 20)
    tok2 = t5_tokenizer()
    te2 = t5_encoder(len(tok2), seed=seed + 40)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    return FluxPipeline(transformer=flux_transformer(seed, guidance_embeds), scheduler=scheduler,
                        vae=flux_vae(seed, vae_blocks),
                        text_encoder=te1, tokenizer=tok, text_encoder_2=te2, tokenizer_2=tok2)


def save_pipeline(pipe, folder: Path) -> Path:
    """``save_pretrained`` (safetensors) into ``folder`` and return it."""
    folder = Path(folder)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def clip_model_folder(path: Path, seed: int = 0) -> Path:
    """A tiny random transformers CLIPModel saved as a metric backend expects it: config.json,
    model.safetensors, the CLIP tokenizer files and a CLIPImageProcessor ``preprocessor_config.json``."""
    from transformers import CLIPConfig, CLIPModel

    folder = Path(path)
    tok = clip_tokenizer(folder / "_vocab")
    tok.save_pretrained(str(folder))
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8),
        projection_dim=32)
    torch.manual_seed(seed)
    CLIPModel(cfg).save_pretrained(str(folder))
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": 32},
        "do_center_crop": True, "crop_size": {"height": 32, "width": 32}, "resample": 3,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]}))
    return folder


def random_fid_inception(path: Path, seed: int = 0) -> Path:
    """A random FID Inception saved exactly like pytorch-fid's release file (torch.save of a state_dict).
    Convs get He init so activations keep their scale through the 90+ layers (torch's default shrinks them)."""
    from flashdmd.evaluation.backends.fid import FIDInceptionV3

    torch.manual_seed(seed)
    net = FIDInceptionV3()
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    torch.save(net.state_dict(), path)
    return path


def sam_vision_folder(path: Path, seed: int = 0, initializer_range: float = 0.02) -> Path:
    """A tiny random SamVisionModel (hidden 16, 2 layers, 32 px input, patch 8, 8 output channels) saved with
    save_pretrained: a Pixel-GAN backbone folder for ``disc_backbone: sam``."""
    from transformers import SamVisionConfig, SamVisionModel
    torch.manual_seed(seed)
    SamVisionModel(SamVisionConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                                   patch_size=8, output_channels=8, mlp_dim=32, global_attn_indexes=[1],
                                   window_size=2, initializer_range=initializer_range)).save_pretrained(path)
    return Path(path)


def run_folders(tmp: Path) -> dict:
    """{"sdxl", "sd3", "flux", "sam"} -> the tiny SDXL, SD3 and FLUX (dev-style) pipeline folders and a tiny SAM (the
    runs' teachers and Pixel-GAN backbone)."""
    return {"sdxl": save_pipeline(sdxl_pipeline(tmp), tmp / "sdxl"), "sd3": save_pipeline(sd3_pipeline(tmp), tmp / "sd3"),
            "flux": save_pipeline(flux_pipeline(tmp), tmp / "flux"), "sam": sam_vision_folder(tmp / "sam")}


def run_config(folders: dict, family: str, method: str, **kw):
    """A short distill config on a tiny teacher: Flash-DMD with the SAM pixel discriminator, or DMD2 with its latent
    classifier (DMD2's GAN weights), TTUR 1, no evaluation, samples or checkpoints; ``kw`` overrides any field."""
    from flashdmd.training.config import DistillConfig
    base = dict(model_teacher=str(folders[family]), run_batch_size=2, run_max_steps=3, eval_every_steps=0,
                run_sample_every_steps=0, run_checkpoint_every_steps=0, run_log_every_steps=1, run_seed=0)
    if method == "flashdmd":
        base.update(method="flashdmd", disc_kind="pixel", disc_backbone="sam", disc_backbone_path=str(folders["sam"]),
                    fake_score_ttur=1, fake_score_ema=0.9)
    else:
        base.update(method="dmd2", disc_kind="latent", disc_loss="ns", fake_score_ttur=1, fake_score_ema=0.0,
                    disc_gen_weight=5e-3, disc_weight=1e-2)
    base.update(kw)
    return DistillConfig(**base)


ROLES = ("teacher", "student", "fake_score", "disc")


def snapshot_roles(ctx) -> dict:
    """{role: {name: a copy of the parameter}} of every role of a distill context."""
    return {role: {n: p.detach().clone() for n, p in getattr(ctx, role).named_parameters()} for role in ROLES}


def assert_roles_trained(ctx, before: dict, lora: bool = False, exempt: tuple[str, ...] = ()) -> None:
    """After training from ``before`` (:func:`snapshot_roles`): every trainable tensor of student, fake score and
    discriminator changed and no frozen one did (``lora``: student's and fake score's trainable ones are adapters),
    and the teacher is untouched and frozen. ``exempt``: "role.name" prefixes of trainable tensors whose gradient is
    zero by construction (the caller says why), excused from having to change."""
    for role in ROLES[1:]:
        module = getattr(ctx, role)
        trainable = {n for n, p in module.named_parameters() if p.requires_grad}
        assert trainable, role
        if lora and role != "disc":
            assert all("lora_" in n for n in trainable), role
        unchanged = [n for n, p in module.named_parameters() if n in trainable and torch.equal(p, before[role][n])
                     and not f"{role}.{n}".startswith(exempt or ("\0",))]
        assert not unchanged, f"{role}: {len(unchanged)} trainable tensors did not change, e.g. {unchanged[:3]}"
        frozen_changed = [n for n, p in module.named_parameters() if n not in trainable and not torch.equal(p, before[role][n])]
        assert not frozen_changed, f"{role}: frozen tensors changed: {frozen_changed[:3]}"
    for n, p in ctx.teacher.named_parameters():
        assert torch.equal(p, before["teacher"][n]) and not p.requires_grad


def assert_resume_bitwise(make_cfg, tmp_path: Path, steps: int = 4) -> None:
    """A run of ``steps`` generator steps (checkpoints every steps/2, TTUR 2) against the same run stopped at
    steps/2 and resumed from its latest checkpoint: every parameter of student, fake score and discriminator is
    bitwise equal. ``make_cfg(**overrides)`` builds the family's config."""
    from flashdmd.training.distill import setup, train
    kw = dict(run_max_steps=steps, fake_score_ttur=2, run_checkpoint_every_steps=steps // 2, run_seed=3)
    cfg = make_cfg(**kw)
    full = setup(cfg)
    train(cfg, tmp_path / "full", progress=False, ctx=full)
    train(make_cfg(**{**kw, "run_max_steps": steps // 2}), tmp_path / "half", progress=False)
    resumed = setup(cfg)
    train(cfg, tmp_path / "half", progress=False, ctx=resumed, resume="latest")
    for role in ("student", "fake_score", "disc"):
        a, b = dict(getattr(full, role).named_parameters()), dict(getattr(resumed, role).named_parameters())
        assert a.keys() == b.keys()
        assert all(torch.equal(a[n], b[n]) for n in a), role
