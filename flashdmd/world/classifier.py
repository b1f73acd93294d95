"""The frozen evaluation classifier of the embedded world (our stand-in for Inception in FID).

A small VGG-style CNN on 32x32 grey images in [-1, 1]. It is trained once by
:func:`flashdmd.world.evalnets.train_eval_classifier`, shipped under ``flashdmd/world/assets/eval/`` and
**never used as a training signal** (the oracle has its own judge network, the GAN its own encoder), so
metrics computed with it are not optimised against.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from flashdmd.world.netstore import read_net, resolve_dir

NAME = "eval_classifier"
TEST_STATS = f"{NAME}_test_stats.safetensors"  # metrics.ReferenceStats of the test split under these weights
DEFAULT_CONFIG = {"arch": "EvalClassifier", "channels": [16, 32, 64], "convs": [1, 2, 1], "feature_dim": 128,
                  "num_classes": 10}


class EvalClassifier(nn.Module):
    """Per level ``convs[i]`` x (3x3 conv, BatchNorm, ReLU) then 2x2 max-pool; flatten -> dropout -> linear
    ``feature_dim`` (ReLU) = features -> linear ``num_classes`` = logits.

    Input (N, 1, 32, 32) in [-1, 1]; :meth:`features` gives (N, feature_dim), :meth:`logits` (N, num_classes).
    """

    def __init__(self, channels=(16, 32, 64), convs=(1, 2, 1), feature_dim: int = 128, num_classes: int = 10, **_):
        super().__init__()
        layers, c_in = [], 1
        for c, n in zip(channels, convs):
            for _ in range(n):
                layers += [nn.Conv2d(c_in, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True)]
                c_in = c
            layers.append(nn.MaxPool2d(2))
        self.body = nn.Sequential(*layers)
        side = 32 // 2 ** len(channels)
        self.neck = nn.Sequential(nn.Flatten(), nn.Dropout(0.2), nn.Linear(c_in * side * side, feature_dim),
                                  nn.ReLU(inplace=True))
        self.head = nn.Linear(feature_dim, num_classes)
        self.feature_dim = feature_dim

    def features(self, x: Tensor) -> Tensor:
        """(N, 1, 32, 32) in [-1, 1] -> (N, feature_dim) penultimate (post-ReLU) features."""
        return self.neck(self.body(x))

    def logits(self, x: Tensor) -> Tensor:
        """(N, 1, 32, 32) in [-1, 1] -> (N, num_classes) class logits."""
        return self.head(self.features(x))

    forward = logits


def build_eval_classifier(config: dict | None = None) -> EvalClassifier:
    return EvalClassifier(**(config or DEFAULT_CONFIG))


@lru_cache(maxsize=4)
def _load_cached(directory: str, device: str) -> EvalClassifier:
    config, state = read_net(directory, NAME)
    net = build_eval_classifier(config)
    net.load_state_dict(state)
    stats = Path(directory) / TEST_STATS
    net.test_stats = load_file(str(stats)) if stats.is_file() else None
    return net.eval().requires_grad_(False).to(device)


def load_eval_classifier(dir=None, device: str | torch.device = "cpu") -> EvalClassifier:
    """The frozen classifier (eval mode, no parameter grads) from ``dir`` (default: the shipped assets).

    Loaded once per (dir, device) and shared: do not modify it in place. If ``dir`` holds
    ``eval_classifier_test_stats.safetensors`` (written at training time), its test-split statistics are attached
    as ``test_stats`` so the metrics need not recompute them.
    """
    return _load_cached(str(resolve_dir(dir)), str(device))
