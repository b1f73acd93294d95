"""The roles of a distillation run, each its own object: frozen teacher (real score), student
(generator), fake score, discriminator. No "unified model" with mode flags."""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from flashdmd import FlashDMDError
from flashdmd.families import LORA_TARGETS


@dataclass
class Roles:
    family: object             # flashdmd.families.Family (VAE, text encoders, schedule, predict)
    teacher: nn.Module         # frozen real score
    student: nn.Module         # generator G_theta
    fake_score: nn.Module      # mu_fake^psi
    disc: nn.Module | None     # PixelDiscriminator | LatentClassifierHead | None


def add_lora(net: nn.Module, rank: int, alpha: float | None):
    from peft import LoraConfig
    net.requires_grad_(False)
    net.add_adapter(LoraConfig(r=rank, lora_alpha=alpha or rank, init_lora_weights="gaussian",
                               target_modules=LORA_TARGETS))


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
    return copy.deepcopy(net, memo)


def shares_base(cfg) -> bool:
    """Whether this run's student and fake score share the teacher's base weights (LoRA with model_shared_base)."""
    return cfg.model_lora_rank > 0 and cfg.model_shared_base


def build_roles(cfg, family) -> Roles:
    teacher = family.denoiser
    teacher.requires_grad_(False).eval()
    clone = copy_sharing_frozen if shares_base(cfg) else copy.deepcopy
    student = clone(teacher)
    fake_score = clone(teacher)
    for net in (student, fake_score):
        net.train()
        if cfg.model_lora_rank > 0:
            add_lora(net, cfg.model_lora_rank, cfg.model_lora_alpha)
            if not trainable_parameters(net):
                raise FlashDMDError(f"LoRA found none of {LORA_TARGETS} in {type(net).__name__}")
        else:
            net.requires_grad_(True)
        if cfg.model_gradient_checkpointing and hasattr(net, "enable_gradient_checkpointing"):
            net.enable_gradient_checkpointing()
    # the fake score starts at the teacher; with LoRA both adapters start identical (same seed per role)
    if cfg.model_lora_rank > 0:
        adapters = {n: p for n, p in student.named_parameters() if p.requires_grad}
        fake_score.load_state_dict(adapters, strict=False)
    return Roles(family=family, teacher=teacher, student=student, fake_score=fake_score,
                 disc=_build_disc(cfg, family, fake_score))


def _build_disc(cfg, family, fake_score) -> nn.Module | None:
    """The discriminator in the teacher's dtype (a plug-in's backbone and fresh heads come in torch's default)."""
    disc = _new_disc(cfg, family, fake_score)
    return None if disc is None else disc.to(family.dtype)


def _new_disc(cfg, family, fake_score) -> nn.Module | None:
    if cfg.disc_kind == "none":
        return None
    if cfg.disc_kind == "pixel":
        from flashdmd.networks.discriminator import build_pixel_discriminator
        return build_pixel_discriminator(cfg.disc_backbone, cfg.disc_backbone_path, head_channels=cfg.disc_head_channels,
                                         head=cfg.disc_head)
    from flashdmd.networks.discriminator import LatentClassifierHead
    return LatentClassifierHead(bottleneck_channels(family, fake_score))


@torch.no_grad()
def bottleneck_channels(family, net) -> int:
    """Channels of the deepest feature tap (the UNet mid block; the last transformer block)."""
    res = family.default_resolution
    x = torch.zeros((1,) + tuple(family.latent_shape(res, res)), device=family.device)
    t = torch.full((1,), float(family.default_student_timesteps[0]), device=family.device)
    return int(family.features(net, x, t, family.null_conditioning(1))[-1].shape[1])


@torch.no_grad()
def ema_pull_(target: nn.Module, source: nn.Module, lam: float) -> None:
    """Flash-DMD's stabilised score estimator: psi <- lam * psi + (1 - lam) * theta over the trainable
    parameters (all weights for a full fine-tune, the LoRA weights for LoRA), matched by name."""
    src = dict(source.named_parameters())
    for name, p in target.named_parameters():
        if p.requires_grad:
            p.lerp_(src[name].detach().to(p.dtype), 1.0 - lam)


class StudentEMA:
    """Exponential moving average of the student's trainable weights (``student_ema``), by canonical name; under
    FSDP2 each rank keeps the EMA of its own shards. Training continues on the raw weights; evaluations, grids
    and the saved student use these."""

    def __init__(self, student: nn.Module, decay: float):
        from flashdmd.training.parallel import canonical
        self.decay = decay
        self.params = {canonical(n): p.detach().clone() for n, p in student.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, student: nn.Module) -> None:
        from flashdmd.training.parallel import canonical
        for n, p in student.named_parameters():
            if p.requires_grad:
                self.params[canonical(n)].lerp_(p.detach().to(self.params[canonical(n)].dtype), 1.0 - self.decay)

    def full_state(self) -> dict:
        """Full CPU tensors (a collective under FSDP: every rank calls it)."""
        from flashdmd.training.parallel import full_tensor
        return {n: full_tensor(t) for n, t in self.params.items()}

    @torch.no_grad()
    def load_full_state(self, state: dict) -> None:
        from flashdmd.training.parallel import like
        for n, t in self.params.items():
            t.copy_(like(state[n], t))
