"""What every stage of `flashdmd world pretrain` shares: its settings, seeded draws, the learning-rate and EMA
rules, a resumable checkpoint, the training loop, and the prompt augmentation of the text and teacher stages.

Batches and noise are drawn from generators seeded by (seed, stage, step) (:func:`seeded`), so a resumed run sees
the same data as an uninterrupted one.
"""
from __future__ import annotations

import copy
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from flashdmd import FlashDMDError, io
from flashdmd.training.ema import lerp_ as ema_lerp_
from flashdmd.world.data import load_split
from flashdmd.world.prompts import CLASS_WORDS, vocabulary
from flashdmd.world.tokenizer import MODEL_MAX_LENGTH

FILLER_PROB = 0.3  # share of training prompts that get 1-2 filler words inserted (see augment_prompts)


@dataclass(frozen=True)
class RunOptions:
    """Per-run settings shared by all stages."""

    seed: int = 0
    progress: bool = True
    checkpoint_every: int = 200


@dataclass(frozen=True)
class StageConfig:
    """Optimisation settings of one stage. ``steps`` optimizer steps of ``batch_size`` samples."""

    steps: int
    batch_size: int
    lr: float
    warmup_steps: int = 0
    ema_decay: float = 0.0  # 0 = no EMA; the shipped weights are the EMA weights otherwise
    data_limit: int | None = None  # use only the first N training images (quick mode)


# Sized for about 2.5 h on 2 CPU cores shared with other jobs (--threads 1; wall times in assets/README.md).
FULL = {
    "text": StageConfig(steps=400, batch_size=128, lr=2e-3, warmup_steps=20),
    "vae": StageConfig(steps=2500, batch_size=32, lr=1e-3, warmup_steps=100, ema_decay=0.999),
    "sdxl": StageConfig(steps=2500, batch_size=128, lr=5e-4, warmup_steps=100, ema_decay=0.999),
    "sd3": StageConfig(steps=2500, batch_size=128, lr=5e-4, warmup_steps=100, ema_decay=0.999),
}
QUICK = {name: StageConfig(steps=3, batch_size=8, lr=c.lr, warmup_steps=1, ema_decay=c.ema_decay, data_limit=64)
         for name, c in FULL.items()}



# ------------------------------------------------------------------------------------------- plumbing

def seeded(seed: int, stage: str, step: int) -> torch.Generator:
    """A generator determined by (seed, stage, step): resumed runs draw the same batches and noise."""
    salt = sum(ord(c) * 131 ** i for i, c in enumerate(stage)) % 1_000_003
    return torch.Generator().manual_seed((seed * 1_000_003 + salt) * 1_000_033 + step)


def lr_at(cfg: StageConfig, step: int) -> float:
    """Linear warmup then cosine decay to 10 % of ``lr``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    frac = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))


def ema_update(ema: nn.Module, model: nn.Module, decay: float, step: int) -> None:
    """EMA with warmup: decay_t = min(decay, (1 + t) / (10 + t))."""
    d = min(decay, (1 + step) / (10 + step))
    ema_lerp_(ema.parameters(), model.parameters(), d)


def training_data(limit: int | None):
    """Fashion-MNIST train images (N, 1, 32, 32) and labels, the first ``limit`` only in quick mode."""
    split = load_split("train")
    if limit:
        return split.images[:limit], split.labels[:limit]
    return split.images, split.labels


class Checkpoint:
    """Resumable state of one stage in ``OUT/_work/<stage>.safetensors`` (safetensors only, no pickle).

    Tensors: ``model.*``, ``ema.*`` and ``opt.<param index>.<name>`` (AdamW moments and step); metadata:
    step, accumulated wall seconds, last smoothed loss.
    """

    def __init__(self, out: Path, stage: str):
        self.path = out / "_work" / f"{stage}.safetensors"

    def save(self, step: int, wall: float, loss: float, model: nn.Module, ema: nn.Module | None,
             opt: torch.optim.Optimizer) -> None:
        tensors = {f"model.{k}": v.detach().contiguous() for k, v in model.state_dict().items()}
        if ema is not None:
            tensors.update({f"ema.{k}": v.detach().contiguous() for k, v in ema.state_dict().items()})
        for i, st in opt.state_dict()["state"].items():
            tensors.update({f"opt.{i}.{n}": torch.as_tensor(v).contiguous() for n, v in st.items()})
        self.path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"step": str(step), "wall": str(wall), "loss": str(loss)}
        io.atomic_save(self.path, lambda tmp: save_file(tensors, str(tmp), metadata=meta), "a pretraining checkpoint")

    def load(self, model: nn.Module, ema: nn.Module | None, opt: torch.optim.Optimizer) -> tuple[int, float, float]:
        """Restore into the given objects; returns (step, wall seconds, loss), or (0, 0, nan) if none."""
        if not self.path.is_file():
            return 0, 0.0, float("nan")
        with safe_open(str(self.path), "pt") as f:
            meta = f.metadata()
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        if ema is not None:
            ema.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
        state: dict[int, dict[str, Tensor]] = {}
        for k, v in tensors.items():
            if k.startswith("opt."):
                _, i, name = k.split(".", 2)
                state.setdefault(int(i), {})[name] = v
        opt.load_state_dict({"state": state, "param_groups": opt.state_dict()["param_groups"]})
        return int(meta["step"]), float(meta["wall"]), float(meta["loss"])

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def train_loop(stage: str, out: Path, cfg: StageConfig, opts: RunOptions, model: nn.Module, loss_fn,
                ema: nn.Module | None = None) -> dict:
    """Generic loop: AdamW, warmup+cosine lr, grad clip 1, EMA, periodic checkpoints, tqdm with ETA.

    ``loss_fn(step, generator) -> scalar loss``. Returns {"final_loss", "wall_s", "steps"}.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.01, betas=(0.9, 0.99))
    ckpt = Checkpoint(out, stage)
    start, wall, smooth = ckpt.load(model, ema, opt)
    t0 = time.time() - wall
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc=f"pretrain {stage}",
               disable=not opts.progress, dynamic_ncols=True)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr_at(cfg, step)
        loss = loss_fn(step, seeded(opts.seed, stage, step))
        if not torch.isfinite(loss):
            raise FlashDMDError(f"pretrain {stage}: loss became {loss.item()} at step {step}; lower the lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if ema is not None:
            ema_update(ema, model, cfg.ema_decay, step)
        smooth = loss.item() if math.isnan(smooth) else 0.98 * smooth + 0.02 * loss.item()
        bar.set_postfix(loss=f"{smooth:.4f}")
        if (step + 1) % opts.checkpoint_every == 0 and step + 1 < cfg.steps:
            ckpt.save(step + 1, time.time() - t0, smooth, model, ema, opt)
    bar.close()
    return {"final_loss": round(smooth, 6), "wall_s": round(time.time() - t0, 1), "steps": cfg.steps}


def filler_words() -> list[str]:
    """World vocabulary words that name no class ("close", "dark", "image", ...)."""
    class_words = {w for ws in CLASS_WORDS.values() for p in ws for w in re.findall(r"[a-z]+", p)}
    return [w for w in vocabulary() if w not in class_words]


def augment_prompts(prompts: list[str], g: torch.Generator, p: float = FILLER_PROB) -> list[str]:
    """Insert 1-2 random filler words (see :func:`_filler`) at random word positions into a share ``p`` of the prompts.

    Without it the text encoders and teachers only ever see the 8 training templates, and words of the
    world's vocabulary that no training template uses keep random token embeddings; prompts phrased
    differently (e.g. the held-out evaluation templates) then lose class alignment (measured 0.96 -> 0.82
    for the SDXL teacher). The class word is never touched, so the prompt keeps its class.
    """
    words = filler_words()
    phrases = [w for ws in CLASS_WORDS.values() for w in ws if " " in w]  # kept whole ("ankle boot")
    out = []
    for prompt in prompts:
        if float(torch.rand(1, generator=g)) >= p:
            out.append(prompt)
            continue
        for ph in phrases:
            prompt = prompt.replace(ph, ph.replace(" ", "\0"))
        tokens = prompt.split(" ")
        for _ in range(1 + int(torch.randint(0, 2, (1,), generator=g))):
            pos = int(torch.randint(0, len(tokens) + 1, (1,), generator=g))
            filler = _filler(words, g)
            if _num_tokens(" ".join(tokens + [filler])) <= MODEL_MAX_LENGTH:  # never truncate the class away
                tokens.insert(pos, filler)
        out.append(" ".join(tokens).replace("\0", " "))
    return out


def _num_tokens(prompt: str) -> int:
    """Token count with BOS/EOS under the world tokenizer (each world word and punctuation mark is one token)."""
    return len(re.findall(r"[a-z]+|[^\sa-z\0]", prompt)) + 2


def _filler(words: list[str], g: torch.Generator) -> str:
    """A filler word (60 %), a hyphenated pair "w1-w2" (25 %) or a word with a comma "w," (15 %).

    The punctuation forms matter: "-" otherwise only ever occurs inside "t-shirt", and the teachers learn
    the hyphen token itself as a t-shirt cue (every "a close-up photo of a <class>" became a t-shirt).
    """
    def word() -> str:
        return words[int(torch.randint(0, len(words), (1,), generator=g))]
    u = float(torch.rand(1, generator=g))
    if u < 0.6:
        return word()
    return f"{word()}-{word()}" if u < 0.85 else f"{word()},"


def frozen_copy(model: nn.Module) -> nn.Module:
    """A deep copy without gradients (the EMA weights, a saved teacher)."""
    return copy.deepcopy(model).requires_grad_(False)
