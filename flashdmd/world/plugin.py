"""The embedded world as one plug-in (see :mod:`flashdmd.plugins`): what it provides, behind the same
interfaces a user's data, metrics, judges and backbones use.

    models         world-sdxl, world-sd3                 (the shipped teacher folders under assets/)
    prompt_source  class templates (training)            image_source   Fashion-MNIST train split, 32 px
    evaluator      FD / alignment / diversity / oracle   grid_prompts   the held-out evaluation prompts
    judge          the preference oracle                 pair_prompts   training templates over drawn classes
    disc_backbone  the world's frozen Pixel-GAN encoder  reward_model   the shipped LRM of a family's teacher

Only the face (cli.py, demo.py) and the tests call :func:`register`. Registering imports no more than the prompts (no
torch): every provider imports its own machinery when first called, so a command line checks its config before
torch, diffusers and transformers load.
"""
from __future__ import annotations

import random
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

from flashdmd import FlashDMDError, plugins
from flashdmd.world.prompts import EVAL_SPLITS, eval_prompts, prompt_for

if TYPE_CHECKING:
    from torch import Tensor

NAME = "world"
ASSETS = Path(__file__).resolve().parent / "assets"
MODELS = {"world-sdxl": ASSETS / "world-sdxl", "world-sd3": ASSETS / "world-sd3"}


class WorldPromptSource:
    """Training prompts: a uniformly drawn class, then a training template and synonym (one Random per sample)."""

    def sample(self, n: int, rng) -> list[str]:
        rngs = rng.python(n)
        labels = [r.randrange(10) for r in rngs]
        return [prompt_for(y, r) for y, r in zip(labels, rngs)]


@lru_cache(maxsize=1)
def _train_split():
    from flashdmd.world.data import load_split, to_rgb
    split = load_split("train")
    return to_rgb(split.images), split.labels


class WorldImageSource:
    """Fashion-MNIST's train split (60 000 grey images replicated to RGB, 32x32, in [-1, 1]; 12 MB in memory).
    Image i's caption is a training template of its class, fixed per index (seeded by i)."""

    def __len__(self) -> int:
        return len(_train_split()[1])

    def caption(self, i: int) -> str:
        return prompt_for(int(_train_split()[1][i]), random.Random(i))

    def read(self, i: int) -> tuple[Tensor, str]:
        return _train_split()[0][i], self.caption(i)

    def describe(self) -> str:
        return "the embedded world's Fashion-MNIST train split (60 000 images, 32 px)"


class WorldEvaluator:
    """The world's held-out metrics on its fixed evaluation prompts (flashdmd/world/metrics.py) of one split: test
    (the held-out templates; every reported figure) or val (the training templates; for choosing checkpoints)."""
    higher_is_better = {"fd": False, "alignment": True, "diversity": True, "oracle": True}
    splits = tuple(EVAL_SPLITS)

    def __init__(self, num_images: int = 500, device="cpu", split: str = "test"):
        if num_images < 20:
            raise FlashDMDError("the world's evaluation needs at least 20 images (two per class)")
        if split not in EVAL_SPLITS:
            raise FlashDMDError(f"the world's evaluation prompts have the splits {', '.join(EVAL_SPLITS)}, not "
                                f"{split!r}")
        self.num_images, self.split = num_images, split

    @property
    def prompts(self) -> list[str]:
        """The prompts an evaluation samples (model_text_cache encodes them in advance)."""
        return eval_prompts(self.num_images, self.split)[0]

    def evaluate(self, model, seed: int = 0, steps: int | None = None, guidance_scale: float | None = None,
                 progress: bool = False) -> dict:
        if model.family.default_resolution != 32:
            raise FlashDMDError(f"{model.family.path} works at {model.family.default_resolution}px, not the embedded "
                                "world's 32px: its metrics do not apply (give eval_prompts and metric backends)")
        from flashdmd.world.metrics import evaluate_world
        return evaluate_world(model, self.num_images, seed, steps, guidance_scale, progress=progress,
                              split=self.split)

    def floor(self, n: int, seed: int = 0) -> float:
        from flashdmd.world.metrics import floor
        return floor(n, seed)


def _disc_backbone(path: str | None = None):
    from flashdmd.world.encoder import load_disc_encoder
    return load_disc_encoder(path)


def _reward_model(family_name: str) -> Path:
    path = ASSETS / f"lrm-{family_name}"
    if not path.is_dir():
        raise FlashDMDError(f"the embedded world ships no latent reward model for {family_name} (only "
                            f"{', '.join(p.name for p in sorted(ASSETS.glob('lrm-*')))}); train one with "
                            "`flashdmd reward make-pairs` + `flashdmd reward train` and set rl_reward_model")
    return path


def _judge(device="cpu"):
    from flashdmd.world.judge import WorldJudge
    return WorldJudge(device=device)


def _pair_prompts(num: int, seed: int) -> list[str]:
    from flashdmd.world.judge import world_pair_prompts
    return world_pair_prompts(num, seed)


def plugin() -> plugins.Plugin:
    return plugins.Plugin(
        name=NAME, models=dict(MODELS), prompt_source=WorldPromptSource, image_source=WorldImageSource,
        evaluator=WorldEvaluator, grid_prompts=lambda n: eval_prompts(n)[0], judge=_judge,
        pair_prompts=_pair_prompts, disc_backbone=_disc_backbone, reward_model=_reward_model)


def register() -> plugins.Plugin:
    """Make the world resolvable by name (``world``, ``world-sdxl``, ``world-sd3``); idempotent."""
    return plugins.register(plugin())
