"""Text prompts for the embedded world, built from class names with templates.

Every prompt names exactly one class, so the class is recoverable from the prompt
(:func:`class_of_prompt`) for alignment and the oracle.
"""
from __future__ import annotations

import random
import re

from flashdmd.world.data import CLASS_NAMES

# Synonyms are unambiguous: each word maps to exactly one class.
CLASS_WORDS = {
    0: ("t-shirt", "tee"), 1: ("trouser", "pair of pants"), 2: ("pullover", "sweater"),
    3: ("dress",), 4: ("coat", "jacket"), 5: ("sandal",), 6: ("shirt",),
    7: ("sneaker", "running shoe"), 8: ("bag", "handbag"), 9: ("ankle boot", "boot"),
}
TEMPLATES = (
    "a photo of a {}", "a {}, product shot", "a picture of a {}", "a black and white photo of a {}",
    "a {} on a dark background", "a small {}", "a centered {}", "an image of a {}",
)
# Held-out templates: used for evaluation prompts only, never for training.
EVAL_TEMPLATES = ("a close-up photo of a {}", "a catalogue image of a {}")


def prompt_for(label: int, rng: random.Random | None = None, templates=TEMPLATES) -> str:
    rng = rng or random
    word = rng.choice(CLASS_WORDS[label])
    return rng.choice(templates).format(word)


def prompts_for(labels, seed: int = 0, templates=TEMPLATES) -> list[str]:
    rng = random.Random(seed)
    return [prompt_for(int(y), rng, templates) for y in labels]


# Evaluation prompt splits: "test", the held-out templates every reported figure uses; "val", the training templates
# (prompt strings disjoint from test's), for choosing a checkpoint without looking at test.
EVAL_SPLITS = {"test": EVAL_TEMPLATES, "val": TEMPLATES}


def eval_prompts(num: int, split: str = "test") -> tuple[list[str], list[int]]:
    """A fixed evaluation set: classes in round-robin, the split's templates in turn, canonical class name."""
    templates = EVAL_SPLITS[split]
    labels = [i % len(CLASS_NAMES) for i in range(num)]
    prompts = [templates[(i // len(CLASS_NAMES)) % len(templates)].format(CLASS_NAMES[y])
               for i, y in enumerate(labels)]
    return prompts, labels


_PATTERNS = sorted(((w, c) for c, ws in CLASS_WORDS.items() for w in ws), key=lambda p: -len(p[0]))


def class_of_prompt(prompt: str) -> int | None:
    """The class a prompt names, longest match first ("t-shirt" before "shirt"); None if none."""
    p = prompt.lower()
    for word, c in _PATTERNS:
        if re.search(rf"(?<![\w-]){re.escape(word)}(?![\w-])", p):
            return c
    return None


def vocabulary() -> list[str]:
    """Every word any prompt may contain (for writing the tokenizer's merges)."""
    words = set()
    for t in TEMPLATES + EVAL_TEMPLATES:
        words.update(re.findall(r"[a-z]+", t.lower()))
    for ws in CLASS_WORDS.values():
        for w in ws:
            words.update(re.findall(r"[a-z]+", w))
    for n in CLASS_NAMES:
        words.update(re.findall(r"[a-z]+", n))
    return sorted(words)
