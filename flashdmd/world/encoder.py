"""The frozen pixel-space backbone of the embedded world's Pixel-GAN discriminator.

Plays the role a pretrained vision encoder (e.g. SAM's ViT via ``SamVisionModel(output_hidden_states=True)``)
plays for a real pixel-space GAN: ``encoder(pixels) -> list of multi-level feature maps``, on which a
discriminator puts trainable heads. It is pretrained by the project as a **denoising autoencoder** on
colour-jittered RGB Fashion-MNIST (see :func:`flashdmd.world.evalnets.train_disc_encoder`): a different
objective, architecture and seed from both the evaluation classifier and the oracle's judge.

Input: VAE-decoded RGB images (N, 3, 32, 32) in [-1, 1] (grey (N, 1, ...) is replicated).
Output: ``[ (N, 16, 32, 32), (N, 32, 16, 16), (N, 64, 8, 8) ]`` with the default config
(``feature_channels``, ``feature_strides``).
"""
from __future__ import annotations

from functools import lru_cache

import torch
import torch.utils.checkpoint
from torch import Tensor, nn

from flashdmd import FlashDMDError
from flashdmd.world.netstore import read_net, resolve_dir

NAME = "disc_encoder"
DEFAULT_CONFIG = {"arch": "DiscEncoder", "channels": [16, 32, 64], "groups": 4, "in_channels": 3}


def _conv(c_in, c_out, groups, stride=1):
    return [nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1), nn.GroupNorm(min(groups, c_out), c_out), nn.SiLU()]


class DiscEncoder(nn.Module):
    """Level 0: one conv at full resolution; each later level: [conv stride 2, conv]; GroupNorm + SiLU after
    every conv. The level outputs are the features."""

    def __init__(self, channels=(16, 32, 64), groups: int = 4, in_channels: int = 3, **_):
        super().__init__()
        self.levels = nn.ModuleList()
        c_in = in_channels
        for i, c in enumerate(channels):
            layers = _conv(c_in, c, groups) if i == 0 else _conv(c_in, c, groups, 2) + _conv(c, c, groups)
            self.levels.append(nn.Sequential(*layers))
            c_in = c
        self.in_channels = in_channels
        self.feature_channels = tuple(channels)
        self.feature_strides = tuple(2 ** i for i in range(len(channels)))
        self.gradient_checkpointing = False

    def enable_gradient_checkpointing(self) -> None:
        """Checkpoint every level while gradients are on (torch.utils.checkpoint, non-reentrant)."""
        self.gradient_checkpointing = True

    def forward(self, pixels: Tensor) -> list[Tensor]:
        """(N, 3, H, W) in [-1, 1] -> [(N, feature_channels[i], H / stride_i, W / stride_i) for each level]."""
        if pixels.ndim != 4 or pixels.shape[1] not in (1, self.in_channels):
            raise FlashDMDError(f"disc encoder expects (N, {self.in_channels}, H, W) pixels, got {tuple(pixels.shape)}")
        h = pixels.expand(-1, self.in_channels, -1, -1) if pixels.shape[1] == 1 else pixels
        feats = []
        checkpoint = self.gradient_checkpointing and torch.is_grad_enabled()
        for level in self.levels:
            h = torch.utils.checkpoint.checkpoint(level, h, use_reentrant=False) if checkpoint else level(h)
            feats.append(h)
        return feats


class DiscEncoderDecoder(nn.Module):
    """Pretraining wrapper: the encoder plus a light decoder from the deepest level back to pixels (DAE):
    conv, SiLU, conv to in_channels * stride^2 channels, pixel shuffle."""

    def __init__(self, encoder: DiscEncoder):
        super().__init__()
        self.encoder = encoder
        c, r = encoder.feature_channels[-1], encoder.feature_strides[-1]
        self.decoder = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.SiLU(),
                                     nn.Conv2d(c, encoder.in_channels * r * r, 3, padding=1), nn.PixelShuffle(r))

    def forward(self, pixels: Tensor) -> Tensor:
        return self.decoder(self.encoder(pixels)[-1])


@lru_cache(maxsize=4)
def _read(directory: str):
    return read_net(directory, NAME)


def load_disc_encoder(dir=None, device: str | torch.device = "cpu") -> DiscEncoder:
    """A fresh frozen copy (eval mode, parameters requires_grad=False; gradients still flow to the input)."""
    config, state = _read(str(resolve_dir(dir)))
    enc = DiscEncoder(**config)
    enc.load_state_dict(state)
    return enc.eval().requires_grad_(False).to(device)
