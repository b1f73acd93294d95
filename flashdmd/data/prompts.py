"""Training prompt sources behind one protocol: a text file, the captions of the real images, or a plug-in.

A source draws one prompt per global sample from that sample's own ``random.Random`` (``rng.python(n)``, see
flashdmd.training.rng.SampleRNG), so the prompts do not depend on how the global batch is split over processes.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Callable, Protocol, Sequence, runtime_checkable

from flashdmd import FlashDMDError, plugins

MAX_PROMPT_CHARS = 2000


class SampleRNGLike(Protocol):
    def python(self, n: int) -> list[random.Random]: ...


@runtime_checkable
class PromptSource(Protocol):
    """``sample(n, rng)``: n prompts, prompt j drawn with ``rng.python(n)[j]`` (one Random per global sample).

    A source that can list every prompt it draws from also has ``prompts`` (a list): ``model_text_cache`` encodes
    them once at start; a source without it (a plug-in that generates prompts) cannot be cached."""

    def sample(self, n: int, rng: SampleRNGLike) -> list[str]: ...


def read_prompt_file(path: str | Path) -> list[str]:
    """Non-empty lines of a UTF-8 text file. One-line errors for missing, binary, empty or absurd files."""
    p = Path(path)
    if not p.is_file():
        raise FlashDMDError(f"prompt file {p} not found")
    raw = p.read_bytes()
    if b"\x00" in raw:
        raise FlashDMDError(f"prompt file {p} looks binary (contains NUL bytes): give a UTF-8 text file, one prompt per line")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise FlashDMDError(f"prompt file {p} is not UTF-8 text (byte {e.start}): re-save it as UTF-8") from None
    prompts = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not prompts:
        raise FlashDMDError(f"prompt file {p} has no prompts: write one prompt per line")
    for i, ln in enumerate(prompts):
        if len(ln) > MAX_PROMPT_CHARS:
            raise FlashDMDError(f"prompt file {p}: prompt {i + 1} has {len(ln)} characters (max {MAX_PROMPT_CHARS})")
    return prompts


class ListPromptSource:
    """A uniform draw (with replacement) from a fixed list of prompts, one draw per sample; ``prompts`` is the list."""

    def __init__(self, prompts: Sequence[str]):
        self.prompts = list(prompts)
        if not self.prompts:
            raise FlashDMDError("a prompt list must hold at least one prompt")

    def sample(self, n: int, rng: SampleRNGLike) -> list[str]:
        return [r.choice(self.prompts) for r in rng.python(n)]

    def __len__(self) -> int:
        return len(self.prompts)


def open_prompt_source(spec: str | Path, captions_of: Callable[[], list[str]] | None = None) -> PromptSource:
    """The source a ``data_prompts`` value names: a loaded plug-in with a prompt source; ``captions`` (the
    captions of the real images, from ``captions_of()``, e.g. ``RealImageStream.captions``); a prompt file."""
    spec = str(spec)
    if plugins.find(spec) is not None:
        return plugins.provider(spec, "prompt_source", "data_prompts")()
    if spec == "captions":
        if captions_of is None:
            raise FlashDMDError("data_prompts: captions needs real images (set data_real to captioned images)")
        return ListPromptSource(captions_of())
    path = Path(spec).expanduser()
    if path.exists() or path.suffix or "/" in spec:
        return ListPromptSource(read_prompt_file(path))
    loaded = ", ".join(plugins.registered()) or "none"
    raise FlashDMDError(f"data_prompts {spec!r} is neither a prompt file (UTF-8, one prompt per line), 'captions' "
                        f"(the captions of data_real) nor a loaded plug-in (loaded: {loaded})")
