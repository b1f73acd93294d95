"""Plug-ins: named providers of models, data, metrics, judges and backbones, behind the general interfaces.

A plug-in (the embedded world is the one that ships) bundles what a user otherwise gives by path: model
folders under short names, a training-prompt source, a real-image source, a held-out evaluator, a preference
judge for reward pairs, a Pixel-GAN backbone and latent reward models. A config value or CLI argument that
names a plug-in (``data_real: world``, ``model_teacher: world-sdxl``) resolves here.

Only the face (``flashdmd.cli``, ``flashdmd.demo``) and the tests import a plug-in and :func:`register` it;
nothing below the face imports one (tests/test_layers.py), so a plug-in is never a special case inside the
loops. This module is the bottom layer: it imports nothing of flashdmd but the error type.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from flashdmd import FlashDMDError


@dataclass
class Plugin:
    """What one plug-in provides; every provider is optional and built lazily (called when first needed).

    ``name``            the config value that selects it (``data_real: NAME``, ``data_prompts: NAME``, ...)
    ``models``          model names -> diffusers pipeline folders (``world-sdxl`` -> its shipped folder)
    ``prompt_source``   () -> a training prompt source (``flashdmd.data.PromptSource`` protocol)
    ``image_source``    () -> a real-image source (``flashdmd.data.ImageSource`` protocol)
    ``evaluator``       (num_images: int, device) -> a held-out evaluator (``flashdmd.evaluation.Evaluator``)
    ``grid_prompts``    (n: int) -> prompts for the sample grids of a run
    ``judge``           (device) -> a preference judge (``flashdmd.evaluation.judges.Judge`` protocol)
    ``pair_prompts``    (num: int, seed: int) -> prompts for ``flashdmd reward make-pairs``
    ``disc_backbone``   (path or None) -> the Pixel-GAN's frozen encoder (``networks.discriminator`` protocol)
    ``reward_model``    (family name) -> folder of a latent reward model for that family's teacher
    """
    name: str
    models: dict[str, Path] = field(default_factory=dict)
    prompt_source: Callable[[], Any] | None = None
    image_source: Callable[[], Any] | None = None
    evaluator: Callable[..., Any] | None = None
    grid_prompts: Callable[[int], list[str]] | None = None
    judge: Callable[..., Any] | None = None
    pair_prompts: Callable[[int, int], list[str]] | None = None
    disc_backbone: Callable[[str | None], Any] | None = None
    reward_model: Callable[[str], Path] | None = None


_PLUGINS: dict[str, Plugin] = {}


def register(plugin: Plugin) -> Plugin:
    """Make ``plugin`` resolvable by its name and its model names (idempotent: re-registering replaces)."""
    _PLUGINS[plugin.name] = plugin
    return plugin


def find(name: str | None) -> Plugin | None:
    """The plug-in registered as ``name``, or None."""
    return _PLUGINS.get(str(name)) if name is not None else None


def registered() -> list[str]:
    return sorted(_PLUGINS)


def provider(name: str, what: str, setting: str) -> Callable:
    """The ``what`` provider of plug-in ``name``; a one-line error naming ``setting`` when there is none."""
    plugin = find(name)
    if plugin is None:
        loaded = ", ".join(registered()) or "none"
        raise FlashDMDError(f"{setting}: {name!r} is neither a path nor a loaded plug-in (loaded: {loaded}); "
                            "give a local path (the embedded world's names work through the flashdmd command)")
    fn = getattr(plugin, what)
    if fn is None:
        raise FlashDMDError(f"{setting}: plug-in {name!r} provides no {what.replace('_', ' ')}")
    return fn


def model_folder(name: str | Path) -> Path | None:
    """The folder a plug-in registered under model name ``name``, or None (then ``name`` is a path or hub id)."""
    for plugin in _PLUGINS.values():
        if str(name) in plugin.models:
            return plugin.models[str(name)]
    return None


def model_owner(name: str | Path) -> Plugin | None:
    """The plug-in whose model names include ``name`` (or whose folders include the path ``name``)."""
    for plugin in _PLUGINS.values():
        if str(name) in plugin.models:
            return plugin
        try:
            resolved = Path(name).expanduser().resolve()
        except (OSError, RuntimeError):
            continue
        if any(resolved == Path(p).resolve() for p in plugin.models.values()):
            return plugin
    return None


def check_split(owner: Plugin | None, split: str | None, setting: str) -> None:
    """``split`` (None: the evaluator's default) names a prompt split of ``owner``'s evaluator, else a one-line error
    that names ``setting`` (``--split`` or ``config: eval_split``) and the splits there are."""
    evaluator = getattr(owner, "evaluator", None)
    splits = getattr(evaluator, "splits", ())
    if split is not None and split not in splits:
        name = f"the {owner.name} evaluator's" if evaluator is not None else "this teacher's evaluator's"
        raise FlashDMDError(f"{setting} {split!r} is not one of {name} prompt splits ({', '.join(splits) or 'none'})")


def model_name(path: str | Path) -> str | None:
    """The registered model name of a folder (so run files name ``world-sdxl``, not an install path), or None."""
    try:
        resolved = Path(path).expanduser().resolve()
    except (OSError, RuntimeError):
        return None
    for plugin in _PLUGINS.values():
        for name, folder in plugin.models.items():
            if Path(folder).resolve() == resolved:
                return name
    return None
