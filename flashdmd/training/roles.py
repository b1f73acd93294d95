"""The roles of a distillation run, each its own object: frozen teacher (real score), student
(generator), fake score, discriminator. No "unified model" with mode flags.

Dtypes (``model_dtype`` / ``model_frozen_dtype``): the frozen parts -- the teacher (under LoRA with a shared base:
the base of all three roles), the text encoders, the VAE, the Pixel-GAN backbone -- are held in the frozen dtype;
the trainable weights -- a full fine-tune's student and fake score (loaded from the folder in the model dtype, never
up-cast from a lower-precision teacher), LoRA adapters, discriminator heads, DMD2's latent head -- and so every
optimiser state are in the model dtype."""
from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from flashdmd import FlashDMDError
from flashdmd.families import LORA_TARGETS, name_part
from flashdmd.networks.compiling import VAE_BLOCKS, compile_blocks
from flashdmd.networks.discriminator import LatentClassifierHead, build_pixel_discriminator
from flashdmd.networks.lora import attach as attach_lora
from flashdmd.networks.offload import base_blocks, deepcopy_hooked
from flashdmd.networks.quant import check as check_quant_kind, quantise


@dataclass
class Roles:
    family: object             # flashdmd.families.Family (VAE, text encoders, schedule, predict)
    teacher: nn.Module         # frozen real score
    student: nn.Module         # generator G_theta
    fake_score: nn.Module      # mu_fake^psi
    disc: nn.Module | None     # PixelDiscriminator | LatentClassifierHead | None


def add_lora(net: nn.Module, rank: int, alpha: float | None, dtype: torch.dtype | None = None):
    """LoRA adapters on ``net``'s attention projections, in ``dtype`` (the model dtype; None: peft's choice, the base
    layer's dtype). peft
    creates them in the base's dtype; with a lower-precision frozen base they are cast up to the model dtype here
    (the gaussian init is then rounded once to the base's precision; lora_B starts at zero either way)."""
    attach_lora(net, rank, alpha, dtype)


def trainable_parameters(net: nn.Module) -> list[nn.Parameter]:
    return [p for p in net.parameters() if p.requires_grad]


def copy_sharing_frozen(net: nn.Module) -> nn.Module:
    """A deep copy of ``net``'s modules whose frozen parameters and buffers ARE ``net``'s tensors (not copies);
    only trainable parameters are copied. Under LoRA this is how teacher, student and fake score share one base:
    the student and the fake score are module copies of the frozen teacher, each with its own adapters wrapped
    around the same base weights. Module copies rather than peft's adapter switching on one module: every role
    keeps its own forward (no active-adapter state that a gradient-checkpointing recomputation in backward could
    see changed by a later teacher or fake-score forward), DDP and FSDP wrap each role as today, and the results
    are the three-copy path's to the bit (tests/test_shared_base.py)."""
    memo = {id(p): p for p in net.parameters() if not p.requires_grad}
    memo.update({id(b): b for b in net.buffers()})
    return deepcopy_hooked(net, memo)  # copy.deepcopy, but the copy of a streamed base (model_offload) gets own hooks


def shares_base(cfg) -> bool:
    """Whether this run's student and fake score share the teacher's base weights (LoRA with model_shared_base)."""
    return cfg.model_lora_rank > 0 and cfg.model_shared_base


def frozen_dtype(cfg, device) -> torch.dtype:
    """``model_frozen_dtype`` resolved for a run on ``device``: auto = bfloat16 on CUDA when model_dtype is
    float32, else model_dtype."""
    model = getattr(torch, cfg.model_dtype)
    if cfg.model_frozen_dtype != "auto":
        return getattr(torch, cfg.model_frozen_dtype)
    return torch.bfloat16 if torch.device(device).type == "cuda" and model == torch.float32 else model


def check_quant(cfg, device, sharded: bool = False) -> list[str]:
    """The quantisation fields that are set, checked against ``device`` (fp8 needs a GPU with float8) and, when the
    trained roles are ``sharded`` by FSDP2, against it (fully_shard cannot split torchao's quantised tensors): one
    FlashDMDError line, before anything is loaded. Returns ``field kind`` for each that is set."""
    fields = _quant_fields(cfg)
    for name, kind in fields.items():
        check_quant_kind(kind, device, name)
        if sharded and name in sharded_quant(cfg):
            raise FlashDMDError(f"{name} {kind} with FSDP2: fully_shard cannot shard torchao's quantised weights, "
                                f"which the sharded roles hold; run on one GPU or with DDP, or set {name} none")
    return [f"{name} {kind}" for name, kind in fields.items() if kind != "none"]


def _quant_fields(cfg) -> dict[str, str]:
    """quantisation field -> its kind, "none" where the run has no such part."""
    return {"model_frozen_quant": cfg.model_frozen_quant, "model_text_encoder_quant": cfg.model_text_encoder_quant,
            "disc_backbone_quant": cfg.disc_backbone_quant if cfg.disc_kind == "pixel" else "none",
            "rl_reward_quant": cfg.rl_reward_quant if cfg.rl_enabled else "none"}


def sharded_quant(cfg) -> list[str]:
    """The quantisation fields set on parts that FSDP2 would shard (the shared base, the discriminator's backbone)."""
    fields = _quant_fields(cfg)
    return [n for n in ("model_frozen_quant", "disc_backbone_quant") if fields[n] != "none"]


def quantise_frozen(cfg, family) -> None:
    """The family's frozen teacher (model_frozen_quant) and text encoders (model_text_encoder_quant) quantised in
    place, once, right after loading: before the text cache and before :func:`build_roles` clones the teacher, so
    that under LoRA the student and the fake score wrap the same quantised tensors."""
    quantise(family.denoiser, cfg.model_frozen_quant)
    for encoder in family.text_encoders:
        quantise(encoder, cfg.model_text_encoder_quant, keep=(family.denoiser,))


def build_roles(cfg, family, place=None) -> Roles:
    """Teacher (``family.denoiser``, frozen, in ``family.frozen_dtype``), student and fake score (trainable weights
    in ``family.dtype``), discriminator. Full fine-tune with a lower-precision teacher: the student is the folder's
    weights loaded again in the model dtype and the fake score a copy of it. ``place``: puts a role on the run's
    device once its adapters exist (model_offload: all but the homed tensors; peft makes an adapter where its base
    layer is, which for a streamed block is the CPU)."""
    teacher = family.denoiser
    teacher.requires_grad_(False).eval()
    lora = cfg.model_lora_rank > 0
    if not lora and family.frozen_dtype != family.dtype:
        student = family.load_denoiser(family.dtype)
        fake_score = copy.deepcopy(student)
    else:
        clone = copy_sharing_frozen if shares_base(cfg) else copy.deepcopy
        student = clone(teacher)
        fake_score = clone(teacher)
    for net, name in ((student, "student"), (fake_score, "fake score")):
        name_part(net, name)
        net.train()
        if lora:
            add_lora(net, cfg.model_lora_rank, cfg.model_lora_alpha, family.dtype)
            if not trainable_parameters(net):
                raise FlashDMDError(f"LoRA found none of {LORA_TARGETS} in {type(net).__name__}")
        else:
            net.requires_grad_(True)
        if cfg.model_gradient_checkpointing and hasattr(net, "enable_gradient_checkpointing"):
            net.enable_gradient_checkpointing()
        if place is not None:
            place(net)
    # the fake score starts at the teacher; with LoRA both adapters start identical (same seed per role)
    if lora:
        adapters = {n: p for n, p in student.named_parameters() if p.requires_grad}
        fake_score.load_state_dict(adapters, strict=False)
    disc = _build_disc(cfg, family, fake_score)
    if cfg.model_gradient_checkpointing:
        # the generator's low-noise branch decodes x0 and runs the Pixel-GAN backbone with a graph: at 1024 px the
        # largest activations of a Flash-DMD step. Both checkpoint only while gradients are on.
        # (diffusers' VAEs without it -- Qwen-Image's video VAE -- raise from enable_gradient_checkpointing)
        vae_can = hasattr(family.vae, "enable_gradient_checkpointing")
        if getattr(family.vae, "_supports_gradient_checkpointing", vae_can):
            family.vae.enable_gradient_checkpointing()
        if cfg.disc_kind == "pixel" and not disc.enable_gradient_checkpointing():
            warnings.warn(f"disc_backbone {cfg.disc_backbone}: its backbone offers no gradient checkpointing "
                          "(enable_gradient_checkpointing); it runs without", stacklevel=2)
    return Roles(family=family, teacher=teacher, student=student, fake_score=fake_score, disc=disc)


# a denoiser's compiled units where its family names no blocks (SDXL's UNet): what its gradient checkpointing wraps
UNET_BLOCKS = ("BasicTransformerBlock", "ResnetBlock2D")


def check_compile(cfg, sharded: bool) -> None:
    """model_compile with FSDP2: one line, before anything is loaded (fully_shard's hooks on the compiled blocks are
    not a combination flashdmd has run)."""
    if sharded and cfg.model_compile != "none":
        raise FlashDMDError(f"model_compile {cfg.model_compile} with FSDP2 is not supported: run on one GPU or with "
                            "DDP, or set model_compile none")


def compile_roles(cfg, roles: Roles) -> list[str]:
    """``model_compile`` (networks/compiling.py): student and fake score block by block; ``all`` also the teacher's
    blocks, the VAE's, the text encoders (whole) and the Pixel-GAN backbone (whole). Call once the roles are built
    and before they are prepared. Returns ``part: n`` per compiled part (forwards compiled)."""
    if cfg.model_compile == "none":
        return []
    fam = roles.family
    blocks = tuple(fam.offload_blocks) or UNET_BLOCKS
    parts = {"student": (roles.student, blocks, False), "fake score": (roles.fake_score, blocks, False)}
    if cfg.model_compile == "all":
        parts["teacher"] = (roles.teacher, blocks, False)
        parts["VAE"] = (fam.vae, _vae_units(fam.vae), False)
        parts.update({f"text encoder {i + 1}": (e, (), True) for i, e in enumerate(fam.text_encoders) if e is not None})
        if cfg.disc_kind == "pixel":
            parts["Pixel-GAN backbone"] = (roles.disc.backbone, (), True)
    return [f"{name}: {compile_blocks(*part)}" for name, part in parts.items()]


def _vae_units(vae: nn.Module) -> tuple[str, ...]:
    """The VAE's compiled units: diffusers' encoder / decoder blocks, else (a VAE of other blocks: Qwen-Image's
    video VAE) its encoder and decoder whole."""
    if base_blocks(vae, VAE_BLOCKS):
        return VAE_BLOCKS
    return tuple(type(m).__name__ for m in (getattr(vae, "encoder", None), getattr(vae, "decoder", None))
                 if isinstance(m, nn.Module))


def _build_disc(cfg, family, fake_score) -> nn.Module | None:
    """The discriminator's trainable part in the model dtype, a pixel discriminator's frozen backbone in the frozen
    dtype (a plug-in's backbone and fresh heads come in torch's default)."""
    disc = _new_disc(cfg, family, fake_score)
    if disc is None:
        return None
    disc = disc.to(family.dtype)
    if cfg.disc_kind == "pixel":
        quantise(disc.backbone.to(family.frozen_dtype), cfg.disc_backbone_quant, keep=(family.denoiser,))
    return disc


def _new_disc(cfg, family, fake_score) -> nn.Module | None:
    if cfg.disc_kind == "none":
        return None
    if cfg.disc_kind == "pixel":
        cond_dim = family.null_conditioning(1).pooled_embeds.shape[-1] if cfg.disc_condition == "text" else 0
        return build_pixel_discriminator(cfg.disc_backbone, cfg.disc_backbone_path, head_channels=cfg.disc_head_channels,
                                         head=cfg.disc_head, cond_dim=cond_dim, on_meta=family.device.type == "meta")
    shape = bottleneck(family, fake_score, cfg.data_resolution or family.default_resolution)
    if family.device.type == "meta":  # `flashdmd plan`: the head without weights
        with torch.device("meta"):
            return LatentClassifierHead(*shape)
    return LatentClassifierHead(*shape)


@torch.no_grad()
def bottleneck(family, net, resolution: int | None = None) -> tuple[int, int]:
    """(channels, smaller side) of the deepest feature tap (the UNet mid block; the last transformer block) at
    ``resolution`` pixels (default: the teacher's): what DMD2's latent classifier head is sized for."""
    res = resolution or family.default_resolution
    x = torch.zeros((1,) + tuple(family.latent_shape(res, res)), device=family.device)
    t = torch.full((1,), float(family.default_student_timesteps[0]), device=family.device)
    f = family.features(net, x, t, family.null_conditioning(1))[-1]
    return int(f.shape[1]), int(min(f.shape[-2:]))
