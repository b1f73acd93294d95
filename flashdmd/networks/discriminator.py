"""Discriminators.

* :class:`PixelDiscriminator` -- Flash-DMD's Pixel-GAN: a *frozen* pretrained image encoder (SAM's vision
  encoder in the paper; the world's own encoder on CPU) and trainable heads on several of its feature
  levels. Input: VAE-decoded pixels (B, 3, H, W) in [-1, 1]. Output: a list of logit maps (B, 1, h_i, w_i).
  Gradients flow *through* the frozen encoder to the pixels. Two head designs: ``patch`` (the paper's, as far
  as stated: one 2D conv head per level, ADM design, patch logits) and ``pooled`` (:class:`PooledHead`, not in
  the paper: one MLP on every level's globally pooled, standardised features, one logit per image).
* :class:`LatentClassifierHead` -- DMD2's GAN classifier on the fake score's bottleneck (mid-block)
  features of noised latents (``diffusion_gan``); used by the DMD2 baseline.

Dtypes: the frozen backbone may be held in a lower precision than the heads (``model_frozen_dtype``): the pixels
are cast to the backbone's dtype, each feature map to its head's.
:meth:`PixelDiscriminator.enable_gradient_checkpointing` checkpoints the backbone's blocks (recomputed in backward;
same gradients, fewer saved activations).
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn
from transformers import SamConfig, SamModel, SamVisionConfig, SamVisionModel

from flashdmd import FlashDMDError, io, plugins
from flashdmd.families import network_call

# SAM's image processor normalisation (pixel values in [0, 1] space).
SAM_MEAN = (0.485, 0.456, 0.406)
SAM_STD = (0.229, 0.224, 0.225)


class SamBackbone(nn.Module):
    """transformers' SamVisionModel as a multi-level feature extractor.

    Pixels in [-1, 1] are mapped to [0, 1], resized to the encoder's ``image_size`` (the real SAM expects
    1024) and normalised with SAM's mean/std. ``layers`` picks hidden states (channels-last in SAM) which
    are returned as (B, C, h, w); the neck output is appended as the last level."""

    def __init__(self, model, layers: Sequence[int] | None = None):
        super().__init__()
        self.model = model
        cfg = model.config
        n = cfg.num_hidden_layers
        self.layers = list(layers) if layers is not None else sorted({max(1, n // 3), max(1, 2 * n // 3), n})
        if any(not 0 <= i <= n for i in self.layers):
            raise FlashDMDError(f"SAM feature layers {self.layers} outside 0..{n}")
        self.image_size = cfg.image_size
        self.feature_channels = [cfg.hidden_size] * len(self.layers) + [cfg.output_channels]
        self.gradient_checkpointing = False
        self.register_buffer("mean", torch.tensor(SAM_MEAN).reshape(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(SAM_STD).reshape(1, 3, 1, 1), persistent=False)

    @classmethod
    def from_pretrained(cls, path: str | Path, layers: Sequence[int] | None = None,
                        on_meta: bool = False) -> "SamBackbone":
        """From a local SamModel or SamVisionModel folder (by its config's ``architectures``). ``on_meta``: the
        same encoder built on the meta device from the config alone (no weights read: `flashdmd plan`)."""
        p = Path(path)
        if not (p / "config.json").is_file():
            raise FlashDMDError(f"SAM encoder folder {p} has no config.json: give a local transformers "
                                "SamModel or SamVisionModel folder (e.g. a download of facebook/sam-vit-base)")
        arch = io.read_json(p / "config.json").get("architectures") or []
        whole = "SamModel" in arch  # the full SAM (its vision encoder is the backbone), else its vision model
        try:
            if on_meta:
                with torch.device("meta"):
                    model = SamModel(SamConfig.from_pretrained(p)).vision_encoder if whole else \
                        SamVisionModel(SamVisionConfig.from_pretrained(p))
            elif whole:
                model = SamModel.from_pretrained(p, use_safetensors=True).vision_encoder
            else:
                model = SamVisionModel.from_pretrained(p, use_safetensors=True)
        except OSError as e:
            raise FlashDMDError(f"cannot load SAM encoder from {p}: {str(e).splitlines()[0]}") from None
        return cls(model, layers)

    def forward(self, pixels: Tensor) -> list[Tensor]:
        x = (pixels + 1) / 2
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        x = (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        if self.gradient_checkpointing and torch.is_grad_enabled():
            hidden, last = self._checkpointed(x)
        else:
            out = self.model(pixel_values=x, output_hidden_states=True)
            hidden, last = out.hidden_states, out.last_hidden_state
        feats = [hidden[i].permute(0, 3, 1, 2) for i in self.layers]
        return feats + [last]

    def enable_gradient_checkpointing(self) -> None:
        """Checkpoint every encoder layer while gradients are on. transformers' own switch
        (``gradient_checkpointing_enable``) acts only in training mode, and the backbone stays in eval mode, so
        the layers are checkpointed here (:meth:`_checkpointed`)."""
        self.gradient_checkpointing = True

    def _checkpointed(self, x: Tensor) -> tuple[list[Tensor], Tensor]:
        """SamVisionEncoder's forward (patch embedding + absolute positions, layers, neck) with every layer under
        torch.utils.checkpoint (non-reentrant): (hidden states: the embedding, then each layer's output; the neck's
        output) -- the same tensors as ``model(pixel_values=x, output_hidden_states=True)``."""
        enc = getattr(self.model, "vision_encoder", self.model)
        h = enc.patch_embed(x)
        if enc.pos_embed is not None:
            h = h + enc.pos_embed
        hidden = [h]
        for layer in enc.layers:
            out = torch.utils.checkpoint.checkpoint(layer, h, use_reentrant=False)
            h = out[0] if isinstance(out, tuple) else out
            hidden.append(h)
        return hidden, enc.neck(h)


class DiscHead(nn.Module):
    """One trainable 2D head: conv3x3 -> GroupNorm -> LeakyReLU -> conv1x1 to patch logits."""

    def __init__(self, in_channels: int, hidden: int = 64):
        super().__init__()
        groups = 8 if hidden % 8 == 0 else 1
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, hidden, 3, padding=1), nn.GroupNorm(groups, hidden), nn.LeakyReLU(0.2),
            nn.Conv2d(hidden, 1, 1))

    def forward(self, f: Tensor) -> Tensor:
        return self.net(f)


class PooledHead(nn.Module):
    """An MLP (Linear, LeakyReLU, Linear) on the concatenated global averages of every feature level, each
    channel standardised by fixed statistics of real images (buffers set by :meth:`calibrate`; saved with the
    run). Globally pooled features are far less spread than per-position ones and their channels' scales
    differ by ~10x; standardising them is what lets a head trained for a run's few hundred updates use them
    (``benchmarks/disc_probe.py``).

    ``cond_dim`` > 0 makes it a projection discriminator (Miyato & Koyama 2018): the logit gains
    ``<W c, h>``, h the MLP's hidden activations and c a (B, cond_dim) condition (the family's pooled text
    embedding, scaled to unit RMS per sample), so it judges image and caption together. W starts at zero: the
    head starts unconditional."""

    def __init__(self, feature_channels: Sequence[int], hidden: int = 256, cond_dim: int = 0):
        super().__init__()
        n = sum(feature_channels)
        self.register_buffer("mean", torch.zeros(n))
        self.register_buffer("std", torch.ones(n))
        self.net = nn.Sequential(nn.Linear(n, hidden), nn.LeakyReLU(0.2), nn.Linear(hidden, 1))
        self.embed = nn.Linear(cond_dim, hidden, bias=False) if cond_dim > 0 else None
        if self.embed is not None:
            nn.init.zeros_(self.embed.weight)

    @staticmethod
    def pool(feats: Sequence[Tensor]) -> Tensor:
        return torch.cat([f.float().mean(dim=(2, 3)) for f in feats], 1)

    @torch.no_grad()
    def calibrate(self, pooled: Tensor) -> None:
        """``pooled``: (N, sum C) pooled features of N >= 2 real images."""
        self.mean.copy_(pooled.mean(0))
        self.std.copy_(pooled.std(0) + 1e-4)

    def forward(self, feats: Sequence[Tensor], cond: Tensor | None = None) -> Tensor:
        if (cond is None) != (self.embed is None):
            raise FlashDMDError("a conditional pooled head needs its condition, an unconditional one takes none")
        z = (self.pool(feats) - self.mean) / self.std
        h = self.net[1](self.net[0](z.to(self.net[0].weight.dtype)))
        logit = self.net[2](h)
        if self.embed is not None:
            c = cond.float()
            c = c / c.pow(2).mean(1, keepdim=True).sqrt().clamp_min(1e-6)  # unit RMS: text encoders' scales differ
            logit = logit + (self.embed(c.to(h.dtype)) * h).sum(1, keepdim=True)
        return logit.view(-1, 1, 1, 1)


class PixelDiscriminator(nn.Module):
    """Frozen backbone + trainable heads: ``patch`` (one :class:`DiscHead` per feature level) or ``pooled`` (one
    :class:`PooledHead` over all levels; call :meth:`calibrate` with real images before training). The heads'
    parameters are the trainable ones. ``cond_dim`` > 0 (pooled heads only): a projection head that takes a
    (B, cond_dim) condition with the pixels."""

    def __init__(self, backbone: nn.Module, head_channels: int = 64, head: str = "patch", cond_dim: int = 0):
        super().__init__()
        self.backbone = backbone
        self.backbone.requires_grad_(False)
        self.backbone.eval()
        if cond_dim and head != "pooled":
            raise FlashDMDError("a conditional Pixel-GAN head (disc_condition: text) needs disc_head: pooled")
        if head == "patch":
            self.heads = nn.ModuleList([DiscHead(c, head_channels) for c in backbone.feature_channels])
        elif head == "pooled":
            self.heads = nn.ModuleList([PooledHead(backbone.feature_channels, head_channels, cond_dim)])
        else:
            raise FlashDMDError(f"unknown disc_head {head!r}; use 'patch' or 'pooled'")
        self.head = head
        self.conditional = cond_dim > 0

    def train(self, mode: bool = True):  # the backbone stays frozen in eval mode (no dropout / BN updates)
        super().train(mode)
        self.backbone.eval()
        return self

    def trainable_parameters(self):
        return self.heads.parameters()

    def backbone_dtype(self) -> torch.dtype:
        return next(self.backbone.parameters()).dtype

    def enable_gradient_checkpointing(self) -> bool:
        """Checkpoint the backbone's blocks (SamBackbone's layers; a plug-in backbone's own
        ``enable_gradient_checkpointing``). Returns False when the backbone offers none."""
        enable = getattr(self.backbone, "enable_gradient_checkpointing", None)
        if enable is None:
            return False
        enable()
        return True

    @torch.no_grad()
    def calibrate(self, real_chunks: Iterable[Tensor]) -> None:
        """Fix a pooled head's standardisation from real images (chunks of (b, 3, H, W) in [-1, 1], >= 2 images in
        all; chunked so that the calibration set never sits in memory whole); a no-op for patch heads."""
        if self.head != "pooled":
            return
        device = self.heads[0].mean.device
        with network_call("Pixel-GAN backbone", self.backbone):
            pooled = [PooledHead.pool(self.backbone(chunk.to(device, self.backbone_dtype()))) for chunk in real_chunks]
        self.heads[0].calibrate(torch.cat(pooled))

    def forward(self, pixels: Tensor, cond: Tensor | None = None) -> list[Tensor]:
        """Logits per head; ``cond`` (B, cond_dim): the condition of a conditional head (required there)."""
        with network_call("Pixel-GAN backbone", self.backbone, pixels):
            feats = self.backbone(pixels.to(self.backbone_dtype()))
        with network_call("Pixel-GAN heads", self.heads, *feats):
            if self.head == "pooled":
                return [self.heads[0](feats, cond)]
            return [h(f.to(next(h.parameters()).dtype)) for h, f in zip(self.heads, feats)]


def build_pixel_discriminator(backbone: str, path: str | None = None, layers: Sequence[int] | None = None,
                              head_channels: int = 64, head: str = "patch", cond_dim: int = 0,
                              on_meta: bool = False) -> PixelDiscriminator:
    """``backbone``: "sam" (``path`` = local SamModel / SamVisionModel folder) or the name of a plug-in that
    provides a frozen encoder (the embedded world's, ``world``; ``path`` overrides its folder). ``head``:
    "patch" or "pooled"; ``cond_dim`` > 0: a conditional (projection) pooled head. ``on_meta``: built on the meta
    device without weights (`flashdmd plan`; a plug-in's encoder is built, then moved there)."""
    if backbone == "sam":
        if not path:
            raise FlashDMDError("disc_backbone 'sam' needs disc_backbone_path: a local SAM folder "
                                "(e.g. facebook/sam-vit-base downloaded with huggingface-cli)")
        encoder = SamBackbone.from_pretrained(path, layers, on_meta=on_meta)
    else:
        encoder = plugins.provider(backbone, "disc_backbone", "disc_backbone")(path)
    if not on_meta:
        return PixelDiscriminator(encoder, head_channels, head, cond_dim)
    encoder = encoder.to("meta")
    with torch.device("meta"):
        return PixelDiscriminator(encoder, head_channels, head, cond_dim)


class LatentClassifierHead(nn.Module):
    """DMD2's classifier (``cls_pred_branch`` of DMD2's main/sd_guidance.py) on the fake score's bottleneck features
    (B, C, h, w) -> one logit (B, 1):

        [Conv4x4 s2 p1 -> GroupNorm(32) -> SiLU] x n,  Conv4x4 s4 -> GroupNorm(32) -> SiLU,  Conv1x1 -> 1

    with C channels throughout. ``side`` is the bottleneck's side at the training resolution; n halvings bring it
    to 4x4 (at most 3): DMD2's SDXL head is n = 3 for its 32x32 bottleneck at 1024 px (104.9 M parameters on 1280
    channels), its SD1.5 head n = 1 for 8x8. A map that is not 4x4 after them (a side that is not 4 x 2^n; the
    embedded world's 4x4 bottleneck needs none) is average-pooled to 4x4 before the stride-4 block."""

    def __init__(self, in_channels: int, side: int = 32):
        super().__init__()
        c = in_channels
        groups = 32 if c % 32 == 0 else (8 if c % 8 == 0 else 1)
        n, s = 0, side
        while s > 4 and n < 3:
            n, s = n + 1, (s + 1) // 2

        def block(k: int, stride: int, pad: int):
            return nn.Sequential(nn.Conv2d(c, c, k, stride=stride, padding=pad), nn.GroupNorm(groups, c), nn.SiLU())
        self.down = nn.Sequential(*[block(4, 2, 1) for _ in range(n)])
        self.last = block(4, 4, 0)
        self.out = nn.Conv2d(c, 1, 1)

    def forward(self, f: Tensor) -> Tensor:
        with network_call("DMD2 latent classifier head", self, f):
            # a lower-precision (frozen-dtype) fake-score base gives its features in that dtype
            f = self.down(f.to(self.out.weight.dtype))
            if tuple(f.shape[-2:]) != (4, 4):
                f = F.adaptive_avg_pool2d(f, 4)
            return self.out(self.last(f)).flatten(1)
