"""The four model stages of `flashdmd world pretrain` (see :mod:`flashdmd.world.pretrain`), each ``stage(out,
cfg, opts) -> log``:

* ``text``: CLIP tokenizer files + two CLIP text encoders, contrastive against a small image tower;
* ``vae``: AutoencoderKL (32x32 RGB <-> 8x8x4), reconstruction + small KL; latent scale / shift from statistics;
* ``sdxl``: SDXL-style UNet teacher, eps-MSE at uniform t in [0, 999] (VP, scaled_linear betas);
* ``sd3``: SD3-style MMDiT teacher, rectified flow (target eps - x0) at SD3's shifted timesteps.

Teacher conditioning follows the real pipelines exactly (see :mod:`flashdmd.world.models`); classifier-free
guidance is learned by replacing 10 % of prompts with the empty prompt "" (the SDXL folder sets
``force_zeros_for_empty_prompt=false`` so the pipeline's negative prompt is that same "").
"""
from __future__ import annotations

import hashlib
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from torch import Tensor, nn
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from flashdmd import FlashDMDError
from flashdmd.diffusion import FlowSchedule, VPSchedule, shift_sigma
from flashdmd.families import sd3
from flashdmd.world import models as M
from flashdmd.world.data import CLASS_NAMES, load_split, to_rgb
from flashdmd.world.pretrain_loop import (RunOptions, StageConfig, augment_prompts, frozen_copy, train_loop,
                                          training_data)
from flashdmd.world.prompts import prompts_for
from flashdmd.world.tokenizer import load_tokenizer, make_tokenizer, write_tokenizer_files

SDXL_DIR, SD3_DIR = "world-sdxl", "world-sd3"
CAPTION_DROPOUT = 0.1


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
    seed = opts.seed
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as d:
        tok = make_tokenizer(d)
    te1, te2 = M.build_text_encoders(tok)
    tower = ImageTower(te1.config.projection_dim, te2.config.projection_dim)
    images, labels = training_data(cfg.data_limit)
    module = nn.ModuleDict({"te1": te1, "te2": te2, "tower": tower})

    def loss_fn(step: int, g: torch.Generator) -> Tensor:
        idx = torch.randint(0, len(labels), (cfg.batch_size,), generator=g)
        prompts = augment_prompts(prompts_for(labels[idx].tolist(), seed=seed * 7919 + step), g)
        ids = tok(prompts, padding="max_length",
                  max_length=tok.model_max_length, truncation=True, return_tensors="pt").input_ids
        img1, img2 = tower(images[idx])
        return (clip_loss(img1, te1(ids).text_embeds, labels[idx], tower.logit_scale)
                + clip_loss(img2, te2(ids).text_embeds, labels[idx], tower.logit_scale))

    log = train_loop("text", out, cfg, opts, module, loss_fn)
    log["retrieval_accuracy"] = _text_retrieval_accuracy(tok, te1, te2, tower, 64 if cfg.data_limit else 1000)
    log["params"] = {"text_encoder": M.num_params(te1.text_model), "text_encoder_2": M.num_params(te2),
                     "text_projection_1": M.num_params(te1.text_projection)}
    _save_text(out, tok, te1.eval(), te2.eval())
    return log


@torch.no_grad()
def _text_retrieval_accuracy(tok, te1, te2, tower, n: int) -> float:
    """Test images classified by nearest class prompt ("a photo of a <class>") in encoder-2 space."""
    test = load_split("test")
    ids = tok([f"a photo of a {c}" for c in CLASS_NAMES], padding="max_length",
              max_length=tok.model_max_length, return_tensors="pt").input_ids
    txt = F.normalize(te2(ids).text_embeds, dim=-1)
    _, img2 = tower(test.images[:n])
    return round(float(((img2 @ txt.T).argmax(1) == test.labels[:n]).float().mean()), 4)


def _save_text(out: Path, tok, te1, te2) -> None:
    """SDXL folder: text_encoder = CLIPTextModel (no projection); SD3 folder: CLIPTextModelWithProjection."""
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
    seed = opts.seed
    torch.manual_seed(seed)
    model = M.build_vae()
    ema = frozen_copy(model)
    images, _ = training_data(cfg.data_limit)

    def loss_fn(step: int, g: torch.Generator) -> Tensor:
        idx = torch.randint(0, len(images), (cfg.batch_size,), generator=g)
        return vae_loss(model, to_rgb(images[idx]).contiguous(), g)

    log = train_loop("vae", out, cfg, opts, model, loss_fn, ema=ema if cfg.ema_decay else None)
    vae = (ema if cfg.ema_decay else model).eval()
    stats = latent_stats(vae, images[:10000], seed)
    log.update(stats, params=M.num_params(vae), test_recon_l1=_test_recon_l1(vae, 64 if cfg.data_limit else 500))
    _save_vae(out, vae, stats)
    return log


@torch.no_grad()
def encode_posterior(vae, images: Tensor, batch: int = 500) -> tuple[Tensor, Tensor]:
    """Raw (unscaled) posterior mean and std (N, 4, 8, 8) of grey images (N, 1, 32, 32) in [-1, 1]."""
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
        _require(folder, ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"))
        self.vae = AutoencoderKL.from_pretrained(folder / "vae").eval()
        enc1_cls = CLIPTextModel if folder.name == SDXL_DIR else CLIPTextModelWithProjection
        self.tokenizer = load_tokenizer(folder / "tokenizer")
        self.te1 = enc1_cls.from_pretrained(folder / "text_encoder").eval()
        self.te2 = CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder_2").eval()
        self.images, self.labels = training_data(cfg.data_limit)
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
        idx = torch.randint(0, len(self.labels), (n,), generator=g)
        mean, std = self.mean[idx], self.std[idx]
        raw = mean + std * torch.randn(mean.shape, generator=g)
        prompts = augment_prompts(prompts_for(self.labels[idx].tolist(), seed=self.seed * 7919 + step), g)
        drop = torch.rand(n, generator=g) < CAPTION_DROPOUT
        return self.scale(raw), ["" if d else p for p, d in zip(prompts, drop.tolist())]

    def text(self, prompts: list[str]) -> dict[str, Tensor]:
        """Pipeline-exact text features, stacked (B, ...); each distinct prompt is encoded once."""
        new = sorted({p for p in prompts if p not in self._text})
        if new:
            enc = M.encode_text(self.tokenizer, self.te1, self.te2, new)
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
    seed = opts.seed
    torch.manual_seed(seed)
    data = TeacherData(out / SDXL_DIR, cfg, seed)
    unet = M.build_unet()
    ema = frozen_copy(unet)
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

    log = train_loop("sdxl", out, cfg, opts, unet, loss_fn, ema=ema)
    log["params"] = M.num_params(unet)
    pipe = _sdxl_pipeline(data, ema.eval())
    _save_teacher(out / SDXL_DIR, pipe, "unet", ema)
    return log


def _sdxl_pipeline(data: TeacherData, unet):
    from diffusers import StableDiffusionXLPipeline  # not at the top: see pretrain.load_pipeline
    return StableDiffusionXLPipeline(vae=data.vae, text_encoder=data.te1, text_encoder_2=data.te2,
                                     tokenizer=data.tokenizer, tokenizer_2=data.tokenizer, unet=unet,
                                     scheduler=M.sdxl_scheduler(), force_zeros_for_empty_prompt=False)


def _save_teacher(folder: Path, pipe, name: str, net: nn.Module) -> None:
    """model_index.json + scheduler + the teacher in fp16 safetensors (loads back as fp32 by default);
    the VAE, text encoders and tokenizers written by earlier stages stay untouched."""
    pipe.save_config(folder)
    pipe.scheduler.save_pretrained(folder / "scheduler")
    frozen_copy(net).to(torch.float16).save_pretrained(folder / name)


# -------------------------------------------------------------------------------------------- stage: sd3

def sd3_training_sigmas(n: int, g: torch.Generator, shift: float = 3.0, p_uniform: float = 0.25) -> Tensor:
    """SD3's training noise levels: u ~ logit-normal(0, 1), sigma = shift*u / (1 + (shift-1)*u) (shift 3,
    as the scheduler), with a fraction ``p_uniform`` of sigmas uniform in [0, 1] instead, so the low-noise
    end (rare after shift 3) is still trained at this tiny 8x8 latent size."""
    u = torch.sigmoid(torch.randn(n, generator=g))
    sigma = shift_sigma(u, shift)
    uniform = torch.rand(n, generator=g)
    return torch.where(torch.rand(n, generator=g) < p_uniform, uniform, sigma)


def stage_sd3(out: Path, cfg: StageConfig, opts: RunOptions) -> dict:
    """Train the SD3-style MMDiT with the rectified-flow loss ||u - (eps - x0)||^2; save the EMA weights.

    The context is the pipeline's: 16 CLIP tokens + 256 zero T5 tokens (75 % of steps; log-uniform 1..256
    otherwise), computed exactly through :class:`flashdmd.families.sd3.CountedZeroT5Processor`.
    """
    seed = opts.seed
    torch.manual_seed(seed)
    data = TeacherData(out / SD3_DIR, cfg, seed)
    net = M.build_transformer()
    ema = frozen_copy(net)
    sd3.use_counted_zero_t5(net)
    schedule = FlowSchedule(shift=M.SD3_SCHEDULER_CONFIG["shift"])
    n_img = M.image_tokens(net)

    def loss_fn(step: int, g: torch.Generator) -> Tensor:
        x0, prompts = data.batch(cfg.batch_size, g, step)
        clip, pooled = M.sd3_conditioning(data.text(prompts), net.config.joint_attention_dim)
        ctx, bias = sd3.count_zero_tokens(clip, n_img, M.log_uniform_counts(len(x0), generator=g))
        t = 1000.0 * sd3_training_sigmas(len(x0), g, schedule.shift)
        eps = torch.randn(x0.shape, generator=g)
        x_t = schedule.add_noise(x0, eps, t)
        pred = net(x_t, encoder_hidden_states=ctx, pooled_projections=pooled, timestep=t,
                   joint_attention_kwargs={"attention_mask": bias}).sample
        return F.mse_loss(pred, eps - x0)

    log = train_loop("sd3", out, cfg, opts, net, loss_fn, ema=ema)
    log["params"] = M.num_params(net)
    sd3.use_default_attention(ema)
    pipe = _sd3_pipeline(data, ema.eval())
    _save_teacher(out / SD3_DIR, pipe, "transformer", ema)
    return log


def _sd3_pipeline(data: TeacherData, transformer):
    from diffusers import StableDiffusion3Pipeline  # not at the top: see pretrain.load_pipeline
    return StableDiffusion3Pipeline(vae=data.vae, text_encoder=data.te1, text_encoder_2=data.te2,
                                    text_encoder_3=None, tokenizer=data.tokenizer, tokenizer_2=data.tokenizer,
                                    tokenizer_3=None, transformer=transformer, scheduler=M.sd3_scheduler())
