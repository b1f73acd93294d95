"""``flashdmd world pretrain``: train the embedded world's generative models from Fashion-MNIST.

Stages (in this order; later ones read what earlier ones wrote into ``--out``):

==========  ==================================================================================
``text``    CLIP tokenizer files + two CLIP text encoders, contrastive against a small image tower
``vae``     AutoencoderKL (32x32 RGB <-> 8x8x4), reconstruction + small KL; latent scale/shift
``sdxl``    SDXL-style UNet teacher, eps-MSE at uniform t in [0, 999] (VP, scaled_linear betas)
``sd3``     SD3-style MMDiT teacher, rectified flow (target eps - x0) at SD3's shifted timesteps
``eval``    the evaluation / oracle / discriminator nets (:func:`flashdmd.world.evalnets.pretrain_eval`)
==========  ==================================================================================

Outputs: ``OUT/world-sdxl`` and ``OUT/world-sd3`` (standard diffusers pipeline folders), ``OUT/eval``,
``OUT/samples/*.png`` (sample grids) and ``OUT/pretrain_log.json`` (per stage: wall time, final loss,
settings). Long stages checkpoint weights, EMA and AdamW state as safetensors under ``OUT/_work`` every
``--checkpoint-every`` steps; rerunning the same command resumes there (the checkpoint is deleted when its
stage completes). A full run skips stages already logged as done unless ``--force``; ``--only`` always
runs the named stages. Batches and noise are drawn from generators seeded by (seed, stage, step), so a
resumed run sees the same data as an uninterrupted one.

Teacher conditioning follows the real pipelines exactly (see :mod:`flashdmd.world.models`); classifier-
free guidance is learned by replacing 10 % of prompts with the empty prompt "" (the SDXL folder sets
``force_zeros_for_empty_prompt=false`` so the pipeline's negative prompt is that same "").
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flashdmd import FlashDMDError, io
from flashdmd.world.tokenizer import MODEL_MAX_LENGTH

STAGES = ("text", "vae", "sdxl", "sd3", "eval")
SDXL_DIR, SD3_DIR = "world-sdxl", "world-sd3"
CFG_SCALE = 2.0  # guidance used for the sample grids (the recommended teacher CFG, see assets/README.md)
CAPTION_DROPOUT = 0.1
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

def _seeded(seed: int, stage: str, step: int) -> torch.Generator:
    """A generator determined by (seed, stage, step): resumed runs draw the same batches and noise."""
    salt = sum(ord(c) * 131 ** i for i, c in enumerate(stage)) % 1_000_003
    return torch.Generator().manual_seed((seed * 1_000_003 + salt) * 1_000_033 + step)


def _lr_at(cfg: StageConfig, step: int) -> float:
    """Linear warmup then cosine decay to 10 % of ``lr``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    frac = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))


def _ema_update(ema: nn.Module, model: nn.Module, decay: float, step: int) -> None:
    """EMA with warmup: decay_t = min(decay, (1 + t) / (10 + t))."""
    d = min(decay, (1 + step) / (10 + step))
    with torch.no_grad():
        torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - d)


def _training_data(limit: int | None):
    from flashdmd.world.data import load_split
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
        from safetensors.torch import save_file
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
        from safetensors import safe_open
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


def _train_loop(stage: str, out: Path, cfg: StageConfig, opts: RunOptions, model: nn.Module, loss_fn,
                ema: nn.Module | None = None) -> dict:
    """Generic loop: AdamW, warmup+cosine lr, grad clip 1, EMA, periodic checkpoints, tqdm with ETA.

    ``loss_fn(step, generator) -> scalar loss``. Returns {"final_loss", "wall_s", "steps"}.
    """
    from tqdm.auto import tqdm
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.01, betas=(0.9, 0.99))
    ckpt = Checkpoint(out, stage)
    start, wall, smooth = ckpt.load(model, ema, opt)
    t0 = time.time() - wall
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc=f"pretrain {stage}",
               disable=not opts.progress, dynamic_ncols=True)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = _lr_at(cfg, step)
        loss = loss_fn(step, _seeded(opts.seed, stage, step))
        if not torch.isfinite(loss):
            raise FlashDMDError(f"pretrain {stage}: loss became {loss.item()} at step {step}; lower the lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if ema is not None:
            _ema_update(ema, model, cfg.ema_decay, step)
        smooth = loss.item() if math.isnan(smooth) else 0.98 * smooth + 0.02 * loss.item()
        bar.set_postfix(loss=f"{smooth:.4f}")
        if (step + 1) % opts.checkpoint_every == 0 and step + 1 < cfg.steps:
            ckpt.save(step + 1, time.time() - t0, smooth, model, ema, opt)
    bar.close()
    return {"final_loss": round(smooth, 6), "wall_s": round(time.time() - t0, 1), "steps": cfg.steps}


def filler_words() -> list[str]:
    """World vocabulary words that name no class ("close", "dark", "image", ...)."""
    import re
    from flashdmd.world.prompts import CLASS_WORDS, vocabulary
    class_words = {w for ws in CLASS_WORDS.values() for p in ws for w in re.findall(r"[a-z]+", p)}
    return [w for w in vocabulary() if w not in class_words]


def augment_prompts(prompts: list[str], g: torch.Generator, p: float = FILLER_PROB) -> list[str]:
    """Insert 1-2 random filler words (see :func:`_filler`) at random word positions into a share ``p`` of the prompts.

    Without it the text encoders and teachers only ever see the 8 training templates, and words of the
    world's vocabulary that no training template uses keep random token embeddings; prompts phrased
    differently (e.g. the held-out evaluation templates) then lose class alignment (measured 0.96 -> 0.82
    for the SDXL teacher). The class word is never touched, so the prompt keeps its class.
    """
    from flashdmd.world.prompts import CLASS_WORDS
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
    import re
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


def _copy_model(model: nn.Module) -> nn.Module:
    import copy
    return copy.deepcopy(model).requires_grad_(False)


# ------------------------------------------------------------------------------------------- stage: text

class ImageTower(nn.Module):
    """(N, 1, 32, 32) in [-1, 1] -> two L2-normalised embeddings (N, d1), (N, d2), one per text encoder."""

    def __init__(self, d1: int, d2: int, width: int = 32):
        super().__init__()
        self.logit_scale = nn.Parameter(torch.tensor(math.log(10.0)))  # CLIP temperature, learned
        self.body = nn.Sequential(
            nn.Conv2d(1, width, 3, 2, 1), nn.SiLU(), nn.Conv2d(width, 2 * width, 3, 2, 1), nn.SiLU(),
            nn.Conv2d(2 * width, 2 * width, 3, 2, 1), nn.SiLU(), nn.Flatten(), nn.Linear(2 * width * 16, 128),
            nn.SiLU())
        self.head1, self.head2 = nn.Linear(128, d1), nn.Linear(128, d2)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = self.body(x)
        return F.normalize(self.head1(h), dim=-1), F.normalize(self.head2(h), dim=-1)


def clip_loss(img: Tensor, txt: Tensor, labels: Tensor, logit_scale: Tensor) -> Tensor:
    """Symmetric CLIP loss with soft targets: every same-class pair is a positive (classes repeat in a batch)."""
    logits = logit_scale.exp().clamp(max=100) * img @ F.normalize(txt, dim=-1).T
    same = (labels[:, None] == labels[None, :]).float()
    target = same / same.sum(1, keepdim=True)
    return 0.5 * (torch.sum(-target * logits.log_softmax(1), 1).mean()
                  + torch.sum(-target * logits.log_softmax(0).T, 1).mean())


def stage_text(out: Path, cfg: StageConfig, opts: RunOptions) -> dict:
    """Write tokenizers and contrastively pretrain both text encoders; save them into both folders."""
    from flashdmd.world import models as M
    from flashdmd.world.prompts import prompts_for
    from flashdmd.world.tokenizer import make_tokenizer
    seed = opts.seed
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as d:
        tok = make_tokenizer(d)
    te1, te2 = M.build_text_encoders(tok)
    tower = ImageTower(te1.config.projection_dim, te2.config.projection_dim)
    images, labels = _training_data(cfg.data_limit)
    module = nn.ModuleDict({"te1": te1, "te2": te2, "tower": tower})

    def loss_fn(step: int, g: torch.Generator) -> Tensor:
        idx = torch.randint(0, len(labels), (cfg.batch_size,), generator=g)
        prompts = augment_prompts(prompts_for(labels[idx].tolist(), seed=seed * 7919 + step), g)
        ids = tok(prompts, padding="max_length",
                  max_length=tok.model_max_length, truncation=True, return_tensors="pt").input_ids
        img1, img2 = tower(images[idx])
        return (clip_loss(img1, te1(ids).text_embeds, labels[idx], tower.logit_scale)
                + clip_loss(img2, te2(ids).text_embeds, labels[idx], tower.logit_scale))

    log = _train_loop("text", out, cfg, opts, module, loss_fn)
    log["retrieval_accuracy"] = _text_retrieval_accuracy(tok, te1, te2, tower, 64 if cfg.data_limit else 1000)
    log["params"] = {"text_encoder": M.num_params(te1.text_model), "text_encoder_2": M.num_params(te2),
                     "text_projection_1": M.num_params(te1.text_projection)}
    _save_text(out, tok, te1.eval(), te2.eval())
    return log


@torch.no_grad()
def _text_retrieval_accuracy(tok, te1, te2, tower, n: int) -> float:
    """Test images classified by nearest class prompt ("a photo of a <class>") in encoder-2 space."""
    from flashdmd.world.data import CLASS_NAMES, load_split
    test = load_split("test")
    ids = tok([f"a photo of a {c}" for c in CLASS_NAMES], padding="max_length",
              max_length=tok.model_max_length, return_tensors="pt").input_ids
    txt = F.normalize(te2(ids).text_embeds, dim=-1)
    _, img2 = tower(test.images[:n])
    return round(float(((img2 @ txt.T).argmax(1) == test.labels[:n]).float().mean()), 4)


def _save_text(out: Path, tok, te1, te2) -> None:
    """SDXL folder: text_encoder = CLIPTextModel (no projection); SD3 folder: CLIPTextModelWithProjection."""
    from flashdmd.world import models as M
    from flashdmd.world.tokenizer import write_tokenizer_files
    for folder in (SDXL_DIR, SD3_DIR):
        for name in ("tokenizer", "tokenizer_2"):
            d = out / folder / name
            shutil.rmtree(d, ignore_errors=True)
            write_tokenizer_files(d)
        te2.save_pretrained(out / folder / "text_encoder_2")
    M.without_projection(te1).save_pretrained(out / SDXL_DIR / "text_encoder")
    te1.save_pretrained(out / SD3_DIR / "text_encoder")


# -------------------------------------------------------------------------------------------- stage: vae

def vae_loss(vae, x: Tensor, g: torch.Generator, kl_weight: float = 1e-6) -> Tensor:
    """L1 + MSE reconstruction (per-pixel means) + kl_weight * KL (summed over latent elements, mean over batch)."""
    post = vae.encode(x).latent_dist
    rec = vae.decode(post.sample(generator=g)).sample
    return (rec - x).abs().mean() + (rec - x).square().mean() + kl_weight * post.kl().mean()


def stage_vae(out: Path, cfg: StageConfig, opts: RunOptions) -> dict:
    """Train the AutoencoderKL on RGB Fashion-MNIST; set scaling (and SD3 shift) from latent statistics.
    The shipped weights are the EMA weights."""
    from flashdmd.world import models as M
    from flashdmd.world.data import to_rgb
    seed = opts.seed
    torch.manual_seed(seed)
    model = M.build_vae()
    ema = _copy_model(model)
    images, _ = _training_data(cfg.data_limit)

    def loss_fn(step: int, g: torch.Generator) -> Tensor:
        idx = torch.randint(0, len(images), (cfg.batch_size,), generator=g)
        return vae_loss(model, to_rgb(images[idx]).contiguous(), g)

    log = _train_loop("vae", out, cfg, opts, model, loss_fn, ema=ema if cfg.ema_decay else None)
    vae = (ema if cfg.ema_decay else model).eval()
    stats = latent_stats(vae, images[:10000], seed)
    log.update(stats, params=M.num_params(vae), test_recon_l1=_test_recon_l1(vae, 64 if cfg.data_limit else 500))
    _save_vae(out, vae, stats)
    return log


@torch.no_grad()
def encode_posterior(vae, images: Tensor, batch: int = 500) -> tuple[Tensor, Tensor]:
    """Raw (unscaled) posterior mean and std (N, 4, 8, 8) of grey images (N, 1, 32, 32) in [-1, 1]."""
    from flashdmd.world.data import to_rgb
    means, stds = [], []
    for i in range(0, len(images), batch):
        post = vae.encode(to_rgb(images[i:i + batch]).contiguous()).latent_dist
        means.append(post.mean)
        stds.append(post.std)
    return torch.cat(means), torch.cat(stds)


@torch.no_grad()
def latent_stats(vae, images: Tensor, seed: int) -> dict:
    """Mean and std of posterior samples over all elements: scaling_factor = 1/std, SD3 shift = mean."""
    mean, std = encode_posterior(vae, images)
    z = mean + std * torch.randn(mean.shape, generator=torch.Generator().manual_seed(seed))
    return {"latent_mean": round(float(z.mean()), 5), "latent_std": round(float(z.std()), 5),
            "scaling_factor": round(1.0 / float(z.std()), 5), "shift_factor": round(float(z.mean()), 5),
            "posterior_std_mean": round(float(std.mean()), 5)}


@torch.no_grad()
def _test_recon_l1(vae, n: int) -> float:
    from flashdmd.world.data import load_split, to_rgb
    x = to_rgb(load_split("test").images[:n]).contiguous()
    return round(float((vae.decode(vae.encode(x).latent_dist.mode()).sample - x).abs().mean()), 5)


def _save_vae(out: Path, vae, stats: dict) -> None:
    """Same weights into both folders; SDXL scales only, SD3 also shifts."""
    vae.register_to_config(scaling_factor=stats["scaling_factor"], shift_factor=None)
    vae.save_pretrained(out / SDXL_DIR / "vae")
    vae.register_to_config(shift_factor=stats["shift_factor"])
    vae.save_pretrained(out / SD3_DIR / "vae")


# ---------------------------------------------------------------------------------- shared teacher data

class TeacherData:
    """Cached raw VAE posteriors of the training images + prompt embeddings for one family folder.

    ``batch(n, g, step)`` -> (scaled latents x0 (n, 4, 8, 8), prompts (n,) with filler-word augmentation and
    10 % "" dropout); latents
    are posterior samples (mean + std * noise), scaled as the folder's VAE config says.
    """

    _posterior_cache: dict = {}

    def __init__(self, folder: Path, cfg: StageConfig, seed: int):
        from diffusers import AutoencoderKL
        from transformers import CLIPTextModel, CLIPTextModelWithProjection
        from flashdmd.world.tokenizer import load_tokenizer
        _require(folder, ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"))
        self.vae = AutoencoderKL.from_pretrained(folder / "vae").eval()
        enc1_cls = CLIPTextModel if folder.name == SDXL_DIR else CLIPTextModelWithProjection
        self.tokenizer = load_tokenizer(folder / "tokenizer")
        self.te1 = enc1_cls.from_pretrained(folder / "text_encoder").eval()
        self.te2 = CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder_2").eval()
        self.images, self.labels = _training_data(cfg.data_limit)
        self.mean, self.std = self._posteriors(folder, cfg)
        self.seed = seed
        self._text: dict[str, dict[str, Tensor]] = {}

    def _posteriors(self, folder: Path, cfg: StageConfig) -> tuple[Tensor, Tensor]:
        """Encode the training set once per process (same weights in both folders: keyed by file stamp)."""
        w = folder / "vae" / "diffusion_pytorch_model.safetensors"
        key = (hashlib.sha1(w.read_bytes()).hexdigest(), cfg.data_limit)
        if key not in self._posterior_cache:
            self._posterior_cache.clear()
            t0 = time.time()
            self._posterior_cache[key] = encode_posterior(self.vae, self.images)
            print(f"encoded {len(self.images)} training images to latents in {time.time() - t0:.0f} s",
                  file=sys.stderr)
        return self._posterior_cache[key]

    def scale(self, raw: Tensor) -> Tensor:
        c = self.vae.config
        return (raw - (c.shift_factor or 0.0)) * c.scaling_factor

    def batch(self, n: int, g: torch.Generator, step: int) -> tuple[Tensor, list[str]]:
        from flashdmd.world.prompts import prompts_for
        idx = torch.randint(0, len(self.labels), (n,), generator=g)
        mean, std = self.mean[idx], self.std[idx]
        raw = mean + std * torch.randn(mean.shape, generator=g)
        prompts = augment_prompts(prompts_for(self.labels[idx].tolist(), seed=self.seed * 7919 + step), g)
        drop = torch.rand(n, generator=g) < CAPTION_DROPOUT
        return self.scale(raw), ["" if d else p for p, d in zip(prompts, drop.tolist())]

    def text(self, prompts: list[str]) -> dict[str, Tensor]:
        """Pipeline-exact text features, stacked (B, ...); each distinct prompt is encoded once."""
        from flashdmd.world.models import encode_text
        new = sorted({p for p in prompts if p not in self._text})
        if new:
            enc = encode_text(self.tokenizer, self.te1, self.te2, new)
            for i, p in enumerate(new):
                self._text[p] = {k: v[i] for k, v in enc.items() if v is not None}
        return {k: torch.stack([self._text[p][k] for p in prompts]) for k in self._text[prompts[0]]}


def _require(folder: Path, parts) -> None:
    missing = [p for p in parts if not (folder / p).is_dir()]
    if missing:
        raise FlashDMDError(f"{folder} lacks {', '.join(missing)}: run `flashdmd world pretrain --out "
                            f"{folder.parent} --only text,vae` first")


# ------------------------------------------------------------------------------------------- stage: sdxl

def stage_sdxl(out: Path, cfg: StageConfig, opts: RunOptions) -> dict:
    """Train the SDXL-style UNet with eps-MSE at uniform integer t in [0, 999]; save the EMA weights."""
    from flashdmd.diffusion import VPSchedule
    from flashdmd.world import models as M
    seed = opts.seed
    torch.manual_seed(seed)
    data = TeacherData(out / SDXL_DIR, cfg, seed)
    unet = M.build_unet()
    ema = _copy_model(unet)
    schedule = VPSchedule()

    def loss_fn(step: int, g: torch.Generator) -> Tensor:
        x0, prompts = data.batch(cfg.batch_size, g, step)
        text = data.text(prompts)
        t = torch.randint(0, 1000, (len(x0),), generator=g)
        eps = torch.randn(x0.shape, generator=g)
        x_t = schedule.add_noise(x0, eps, t)
        cond = {"text_embeds": text["pooled_2"], "time_ids": M.sdxl_time_ids(len(x0))}
        pred = unet(x_t, t, encoder_hidden_states=text["tokens"], added_cond_kwargs=cond).sample
        return F.mse_loss(pred, eps)

    log = _train_loop("sdxl", out, cfg, opts, unet, loss_fn, ema=ema)
    log["params"] = M.num_params(unet)
    pipe = _sdxl_pipeline(data, ema.eval())
    _save_teacher(out / SDXL_DIR, pipe, "unet", ema)
    return log


def _sdxl_pipeline(data: TeacherData, unet):
    from diffusers import StableDiffusionXLPipeline
    from flashdmd.world import models as M
    return StableDiffusionXLPipeline(vae=data.vae, text_encoder=data.te1, text_encoder_2=data.te2,
                                     tokenizer=data.tokenizer, tokenizer_2=data.tokenizer, unet=unet,
                                     scheduler=M.sdxl_scheduler(), force_zeros_for_empty_prompt=False)


def _save_teacher(folder: Path, pipe, name: str, net: nn.Module) -> None:
    """model_index.json + scheduler + the teacher in fp16 safetensors (loads back as fp32 by default);
    the VAE, text encoders and tokenizers written by earlier stages stay untouched."""
    pipe.save_config(folder)
    pipe.scheduler.save_pretrained(folder / "scheduler")
    _copy_model(net).to(torch.float16).save_pretrained(folder / name)


# -------------------------------------------------------------------------------------------- stage: sd3

def sd3_training_sigmas(n: int, g: torch.Generator, shift: float = 3.0, p_uniform: float = 0.25) -> Tensor:
    """SD3's training noise levels: u ~ logit-normal(0, 1), sigma = shift*u / (1 + (shift-1)*u) (shift 3,
    as the scheduler), with a fraction ``p_uniform`` of sigmas uniform in [0, 1] instead, so the low-noise
    end (rare after shift 3) is still trained at this tiny 8x8 latent size."""
    from flashdmd.diffusion import shift_sigma
    u = torch.sigmoid(torch.randn(n, generator=g))
    sigma = shift_sigma(u, shift)
    uniform = torch.rand(n, generator=g)
    return torch.where(torch.rand(n, generator=g) < p_uniform, uniform, sigma)


def stage_sd3(out: Path, cfg: StageConfig, opts: RunOptions) -> dict:
    """Train the SD3-style MMDiT with the rectified-flow loss ||u - (eps - x0)||^2; save the EMA weights.

    The context is the pipeline's: 16 CLIP tokens + 256 zero T5 tokens (75 % of steps; log-uniform 1..256
    otherwise), computed exactly through :class:`flashdmd.world.models.PadCountJointAttnProcessor`.
    """
    from flashdmd.diffusion import FlowSchedule
    from flashdmd.world import models as M
    seed = opts.seed
    torch.manual_seed(seed)
    data = TeacherData(out / SD3_DIR, cfg, seed)
    net = M.build_transformer()
    ema = _copy_model(net)
    M.use_pad_count_attention(net)
    schedule = FlowSchedule(shift=M.SD3_SCHEDULER_CONFIG["shift"])
    n_img = M.image_tokens(net)

    def loss_fn(step: int, g: torch.Generator) -> Tensor:
        x0, prompts = data.batch(cfg.batch_size, g, step)
        clip, pooled = M.sd3_conditioning(data.text(prompts), net.config.joint_attention_dim)
        ctx, bias = M.pad_count_context(clip, n_img, M.log_uniform_counts(len(x0), generator=g))
        t = 1000.0 * sd3_training_sigmas(len(x0), g, schedule.shift)
        eps = torch.randn(x0.shape, generator=g)
        x_t = schedule.add_noise(x0, eps, t)
        pred = net(x_t, encoder_hidden_states=ctx, pooled_projections=pooled, timestep=t,
                   joint_attention_kwargs={"attention_mask": bias}).sample
        return F.mse_loss(pred, eps - x0)

    log = _train_loop("sd3", out, cfg, opts, net, loss_fn, ema=ema)
    log["params"] = M.num_params(net)
    M.use_default_attention(ema)
    pipe = _sd3_pipeline(data, ema.eval())
    _save_teacher(out / SD3_DIR, pipe, "transformer", ema)
    return log


def _sd3_pipeline(data: TeacherData, transformer):
    from diffusers import StableDiffusion3Pipeline
    from flashdmd.world import models as M
    return StableDiffusion3Pipeline(vae=data.vae, text_encoder=data.te1, text_encoder_2=data.te2,
                                    text_encoder_3=None, tokenizer=data.tokenizer, tokenizer_2=data.tokenizer,
                                    tokenizer_3=None, transformer=transformer, scheduler=M.sd3_scheduler())


# ------------------------------------------------------------------------------------------ sample grids

@torch.no_grad()
def sample_grid(folder: Path, path: Path, steps: int, per_class: int = 6, guidance_scale: float = CFG_SCALE,
                seed: int = 0) -> Path:
    """Load ``folder`` with its diffusers pipeline and save a grid (rows: samples, columns: 10 classes)."""
    import numpy as np
    from PIL import Image
    from flashdmd.world.data import CLASS_NAMES
    pipe = load_pipeline(folder)
    pipe.set_progress_bar_config(disable=True)
    prompts = [f"a photo of a {c}" for _ in range(per_class) for c in CLASS_NAMES]
    img = pipe(prompt=prompts, num_inference_steps=steps, guidance_scale=guidance_scale, height=32, width=32,
               generator=torch.Generator().manual_seed(seed), output_type="np").images
    grid = img.reshape(per_class, 10, 32, 32, 3).transpose(0, 2, 1, 3, 4).reshape(per_class * 32, 320, 3)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((grid * 255).round().clip(0, 255).astype(np.uint8)).resize((640, per_class * 64),
                                                                                Image.NEAREST).save(path)
    return path


def load_pipeline(folder: Path):
    """``StableDiffusionXLPipeline`` or ``StableDiffusion3Pipeline`` (without T5) from a world folder."""
    from diffusers import StableDiffusion3Pipeline, StableDiffusionXLPipeline
    index = Path(folder) / "model_index.json"
    if not index.is_file():
        raise FlashDMDError(f"{folder} has no model_index.json: run `flashdmd world pretrain` for it first")
    cls = io.read_json(index).get("_class_name")
    if cls == "StableDiffusionXLPipeline":
        return StableDiffusionXLPipeline.from_pretrained(folder)
    if cls == "StableDiffusion3Pipeline":
        return StableDiffusion3Pipeline.from_pretrained(folder, text_encoder_3=None, tokenizer_3=None)
    raise FlashDMDError(f"{index}: unsupported pipeline class {cls!r}")


# -------------------------------------------------------------------------------------------------- CLI

STAGE_FNS = {"text": stage_text, "vae": stage_vae, "sdxl": stage_sdxl, "sd3": stage_sd3}
TEACHER_FOLDERS = {"sdxl": SDXL_DIR, "sd3": SD3_DIR}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="folder to write world-sdxl/, world-sd3/, eval/ and "
                        "pretrain_log.json into")
    parser.add_argument("--only", default=None, help=f"comma-separated stages to run, from {','.join(STAGES)} "
                        "(default: all, skipping stages already done)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--quick", action="store_true", help="a few iterations per stage on 64 images (tests)")
    parser.add_argument("--force", action="store_true", help="rerun stages already logged as done")
    parser.add_argument("--checkpoint-every", type=int, default=200, help="steps between resumable checkpoints")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's; 1 is "
                        "faster on a CPU shared with other jobs)")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    parser.add_argument("--no-samples", action="store_true", help="skip the sample grids after teacher stages")


def _parse_stages(only: str | None) -> tuple[list[str], bool]:
    if not only:
        return list(STAGES), False
    stages = [s.strip() for s in only.split(",") if s.strip()]
    bad = [s for s in stages if s not in STAGES]
    if bad or not stages:
        raise FlashDMDError(f"--only {only!r}: unknown stage(s) {bad}; choose from {', '.join(STAGES)}")
    return [s for s in STAGES if s in stages], True


def _read_log(out: Path) -> dict:
    p = out / "pretrain_log.json"
    return io.read_json(p) if p.is_file() else {}


def _write_log(out: Path, log: dict) -> None:
    io.atomic_write_text(out / "pretrain_log.json", json.dumps(log, indent=2, sort_keys=True) + "\n")


def _run_eval(out: Path, seed: int, quick: bool) -> dict:
    try:
        from flashdmd.world.evalnets import pretrain_eval
    except ImportError as e:
        raise FlashDMDError(f"stage eval needs flashdmd.world.evalnets ({e}); run the other stages with --only") from None
    t0 = time.time()
    pretrain_eval(out_dir=out / "eval", seed=seed, quick=quick)
    return {"wall_s": round(time.time() - t0, 1), "final_loss": None}


def _run_stage(stage: str, out: Path, args) -> dict:
    cfg = (QUICK if args.quick else FULL).get(stage)
    if stage == "eval":
        entry = _run_eval(out, args.seed, args.quick)
    else:
        opts = RunOptions(seed=args.seed, progress=not args.no_progress, checkpoint_every=args.checkpoint_every)
        entry = STAGE_FNS[stage](out, cfg, opts)
        entry["config"] = asdict(cfg)
        Checkpoint(out, stage).remove()
    if stage in TEACHER_FOLDERS and not args.no_samples:
        entry["samples"] = _write_samples(out, stage, args.quick)
    return entry


def _write_samples(out: Path, stage: str, quick: bool) -> list[str]:
    folder = out / TEACHER_FOLDERS[stage]
    steps = (2,) if quick else (50, 4)
    return [str(sample_grid(folder, out / "samples" / f"{stage}_{s}steps_cfg{CFG_SCALE:g}.png", s,
                            per_class=1 if quick else 6).relative_to(out)) for s in steps]


def run(args) -> int:
    """Run the requested stages; each stage's wall time and final loss land in OUT/pretrain_log.json."""
    out = Path(args.out)
    stages, explicit = _parse_stages(args.only)
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    out.mkdir(parents=True, exist_ok=True)
    log = _read_log(out)
    for stage in stages:
        if not explicit and not args.force and log.get(stage, {}).get("done") and log[stage].get("quick") == args.quick:
            print(f"pretrain {stage}: already done (see pretrain_log.json); --force reruns it", file=sys.stderr)
            continue
        entry = _run_stage(stage, out, args)
        entry.update(done=True, seed=args.seed, quick=args.quick, finished=time.strftime("%Y-%m-%d %H:%M:%S"))
        log = _read_log(out)
        log[stage] = entry
        _write_log(out, log)
        print(f"pretrain {stage}: {entry['wall_s']} s, final loss {entry['final_loss']}", file=sys.stderr)
    work = out / "_work"
    if work.is_dir() and not any(work.iterdir()):
        work.rmdir()
    return 0


def main(argv=None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    parser = argparse.ArgumentParser(prog="python -m flashdmd.world.pretrain", description=__doc__.split("\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except FlashDMDError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
