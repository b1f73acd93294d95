"""The embedded world's preference judge and pair prompts: the plug-in's ``judge`` and ``pair_prompts``.

:class:`WorldJudge` puts the preference oracle (:class:`flashdmd.world.oracle.Oracle`) behind the
:class:`flashdmd.evaluation.judges.Judge` protocol: an image is scored against the class its prompt names
(:func:`flashdmd.world.prompts.class_of_prompt`), so every prompt must name one of the ten classes.
:func:`world_pair_prompts` draws the prompts `flashdmd reward make-pairs` uses for the world's models:
uniformly drawn classes written with the training templates.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from flashdmd import FlashDMDError
from flashdmd.evaluation.judges import JudgeBase
from flashdmd.world.netstore import resolve_dir
from flashdmd.world.oracle import Oracle
from flashdmd.world.prompts import class_of_prompt, prompts_for

NUM_CLASSES = 10


class WorldJudge(JudgeBase):
    """The world's oracle as a judge: ``score`` = oracle score of (image, class named by the prompt); records
    the class as the pair's ``label`` (``label_of``)."""

    name = "world-oracle"

    def __init__(self, device="cpu", directory: str | Path | None = None):
        self.path = str(resolve_dir(directory))
        self.oracle = Oracle.load(directory, device=device)

    def label_of(self, prompt: str) -> int | None:
        return class_of_prompt(prompt)

    def check_prompts(self, prompts: list[str]) -> None:
        for p in prompts:
            if class_of_prompt(p) is None:
                raise FlashDMDError(f"the world's oracle cannot judge prompt {p!r}: it names none of the world's "
                                    "ten classes (t-shirt, trouser, pullover, dress, coat, sandal, shirt, sneaker, "
                                    "bag, ankle boot)")

    @torch.no_grad()
    def score(self, images: Tensor, prompts: list[str]) -> Tensor:
        self.check_prompts(prompts)
        labels = [class_of_prompt(p) for p in prompts]
        return self.oracle.score(images, labels).float().cpu()


def world_pair_prompts(num: int, seed: int) -> list[str]:
    """``num`` prompts: classes drawn uniformly (torch generator seeded ``seed``), each written with a training
    template and synonym (``random.Random(seed)``) -- the prompts make-pairs has always used for the world."""
    g = torch.Generator().manual_seed(seed)
    return prompts_for(torch.randint(0, NUM_CLASSES, (num,), generator=g).tolist(), seed)
