"""The preference oracle: plays the human raters of the embedded world.

Formula (higher is better), for a grey image x in [-1, 1] (clamped) and prompted class y::

    score(x, y) = log p_judge(y | x)
                + w_ink   * (ink(x)   - mu_ink)   / sd_ink        "bold":  lots of bright ink
                + w_crisp * (crisp(x) - mu_crisp) / sd_crisp      "crisp": strong, sharp edges

    ink(x)   = mean over pixels of (x + 1) / 2                     (ink coverage x intensity, in [0, 1])
    crisp(x) = mean over pixels of (|x[i+1,j] - x[i,j]| + |x[i,j+1] - x[i,j]|) / 2   (edge contrast, in [0, 2])

* ``p_judge`` is a SECOND classifier (:class:`JudgeNet`: strided convs + GroupNorm + global pooling, its own
  seed and training run), not the evaluation classifier, so optimising the oracle does not directly optimise
  the metrics.
* ``mu_*``/``sd_*`` are the means/stds of the two pixel terms over 10 000 real training images (stored in
  ``oracle_judge.json``), so on real data each standardised term has mean 0 and std 1; with the default
  weights (0.5, 0.5) real images' scores spread by roughly one nat. Real items satisfy the preference to
  varying degrees (a dark sandal is neither bold nor crisp, a white coat is bold).
* The optimum lies partly outside the data: the pixel terms keep growing towards saturated, speckled,
  high-contrast images (crisp of a checkerboard is ~2, tens of standard deviations above real data) and the
  judge's log-probability can be pushed up adversarially. Unrestrained optimisation of the oracle therefore
  raises the score while the Fréchet distance / diversity measured with the evaluation classifier worsen:
  the world's honest analogue of reward hacking (see ``tests/test_oracle.py``).

``prefer(a, b, labels)`` is a rater's pairwise choice: deterministic (score(a) > score(b)) by default, or
Bradley-Terry noisy with ``temperature > 0`` (P(a preferred) = sigmoid((s_a - s_b) / temperature)).
"""
from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flashdmd import FlashDMDError
from flashdmd.world.netstore import read_net, resolve_dir
from flashdmd.world.prompts import class_of_prompt

NAME = "oracle_judge"
DEFAULT_JUDGE_CONFIG = {"arch": "JudgeNet", "channels": [16, 32, 64, 128], "groups": 8, "num_classes": 10}
DEFAULT_WEIGHTS = {"ink": 0.5, "crisp": 0.5}


class JudgeNet(nn.Module):
    """Strided-conv classifier: conv(stride 1) then [conv stride 2, conv] per level, GroupNorm + SiLU,
    global average pooling, linear. (N, 1, 32, 32) in [-1, 1] -> (N, num_classes) logits."""

    def __init__(self, channels=(16, 32, 64, 128), groups: int = 8, num_classes: int = 10, **_):
        super().__init__()

        def block(c_in, c_out, stride):
            return [nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1), nn.GroupNorm(min(groups, c_out), c_out),
                    nn.SiLU()]

        layers = block(1, channels[0], 1)
        for c_in, c_out in zip(channels[:-1], channels[1:]):
            layers += block(c_in, c_out, 2) + (block(c_out, c_out, 1) if c_out != channels[-1] else [])
        self.body = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(channels[-1], num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


def preference_terms(images: Tensor) -> tuple[Tensor, Tensor]:
    """The raw pixel preference terms ``(ink, crisp)``, each (N,), of (N, 1|3, H, W) images in [-1, 1]."""
    x = _grey(images).clamp(-1, 1)
    ink = ((x + 1) / 2).mean(dim=(1, 2, 3))
    dh = (x[..., 1:, :] - x[..., :-1, :]).abs().mean(dim=(1, 2, 3))
    dw = (x[..., :, 1:] - x[..., :, :-1]).abs().mean(dim=(1, 2, 3))
    return ink, (dh + dw) / 2


def _grey(images: Tensor) -> Tensor:
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise FlashDMDError(f"oracle expects images of shape (N, 1 or 3, H, W), got {tuple(images.shape)}")
    return images.mean(dim=1, keepdim=True) if images.shape[1] == 3 else images


def _labels(labels, n: int, device) -> Tensor:
    """Class ids (N,) from a tensor / list of ints or a list of prompts."""
    if isinstance(labels, (list, tuple)) and labels and isinstance(labels[0], str):
        ids = [class_of_prompt(p) for p in labels]
        if None in ids:
            raise FlashDMDError(f"prompt {labels[ids.index(None)]!r} names no class of the world")
        labels = ids
    y = torch.as_tensor(labels, dtype=torch.long, device=device).reshape(-1)
    if y.numel() != n:
        raise FlashDMDError(f"got {y.numel()} labels for {n} images")
    return y


class Oracle(nn.Module):
    """Differentiable preference score of (image, prompted class); see the module docstring for the formula."""

    def __init__(self, judge: JudgeNet, pixel_stats: dict, weights: dict | None = None):
        super().__init__()
        self.judge = judge.eval().requires_grad_(False)
        self.pixel_stats = dict(pixel_stats)
        self.weights = {**DEFAULT_WEIGHTS, **(weights or {})}

    @classmethod
    def load(cls, dir=None, device: str | torch.device = "cpu", weights: dict | None = None) -> "Oracle":
        """The oracle from shipped weights (``dir`` default: ``flashdmd/world/assets/eval``)."""
        config, state = _load_judge(str(resolve_dir(dir)))
        judge = JudgeNet(**config)
        judge.load_state_dict(state)
        return cls(judge, config["pixel_stats"], weights).to(device)

    def terms(self, images: Tensor, labels) -> dict[str, Tensor]:
        """The score's parts, each (N,): ``logp`` (judge), ``ink`` and ``crisp`` (standardised), ``score``."""
        x = _grey(images).clamp(-1, 1)
        y = _labels(labels, x.shape[0], x.device)
        logp = F.log_softmax(self.judge(x).float(), dim=1).gather(1, y[:, None])[:, 0]
        ink, crisp = preference_terms(x)
        s = self.pixel_stats
        z_ink = (ink - s["ink_mean"]) / s["ink_std"]
        z_crisp = (crisp - s["crisp_mean"]) / s["crisp_std"]
        score = logp + self.weights["ink"] * z_ink + self.weights["crisp"] * z_crisp
        return {"logp": logp, "ink": z_ink, "crisp": z_crisp, "score": score}

    def score(self, images: Tensor, labels) -> Tensor:
        """(N, 1|3, 32, 32) in [-1, 1] and N class ids (or prompts) -> (N,) score, differentiable w.r.t. images."""
        return self.terms(images, labels)["score"]

    forward = score

    def prefer(self, a: Tensor, b: Tensor, labels, temperature: float = 0.0,
               generator: torch.Generator | None = None) -> Tensor:
        """(N,) bool: True where the rater prefers ``a`` over ``b`` for the same prompt.

        ``temperature=0``: deterministic, score(a) > score(b). ``temperature>0``: a noisy rater drawing
        P(a) = sigmoid((score(a) - score(b)) / temperature) (Bradley-Terry), using ``generator`` if given.
        """
        if a.shape != b.shape:
            raise FlashDMDError(f"prefer() needs a and b of the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
        with torch.no_grad():
            d = self.score(a, labels) - self.score(b, labels)
        if temperature <= 0:
            return d > 0
        u = torch.rand(d.shape, generator=generator, device="cpu").to(d.device)
        return u < torch.sigmoid(d / temperature)


@lru_cache(maxsize=4)
def _load_judge(directory: str) -> tuple[dict, dict[str, Tensor]]:
    config, state = read_net(directory, NAME)
    if "pixel_stats" not in config:
        raise FlashDMDError(f"{directory}/{NAME}.json has no pixel_stats: run `flashdmd world pretrain --only eval`")
    return config, state
