"""Training and storage of the embedded world's three frozen auxiliary networks.

- ``eval_classifier``: :class:`flashdmd.world.classifier.EvalClassifier`, used by the metrics only
  (FD, alignment, diversity), never as a training signal;
- ``oracle_judge``: :class:`flashdmd.world.oracle.JudgeNet`, the class term of the preference oracle;
- ``disc_encoder``: :class:`flashdmd.world.encoder.DiscEncoder`, the frozen Pixel-GAN discriminator backbone.

Each is stored as ``<stem>.safetensors`` (weights) + ``<stem>.json`` (constructor config plus
training facts; :mod:`flashdmd.world.netstore`). The three are trained separately with different seeds, architectures and objectives
(supervised classification, supervised classification with a different net, denoising autoencoding on
colour-jittered RGB), so the evaluation metric is not the oracle and neither is the GAN's feature space.

Train all three with :func:`pretrain_eval` (``flashdmd world pretrain --only eval``).
"""
from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from flashdmd import io
from flashdmd.world import classifier, encoder, oracle
from flashdmd.world.data import load_split
from flashdmd.world.metrics import compute_reference_stats
from flashdmd.world.netstore import resolve_dir, save_net


# ---------------------------------------------------------------------------------------------------
# Shared training helpers


def _augment_grey(x: Tensor, g: torch.Generator, shift: int = 2, noise: float = 0.1, flip: bool = False) -> Tensor:
    """Random translation by up to ``shift`` pixels (one per batch; pad with background -1), optional random
    horizontal flip and Gaussian pixel noise with a per-image std in [0, noise]. (N,1,32,32) -> same."""
    n = x.shape[0]
    if shift:
        p = F.pad(x, (shift,) * 4, value=-1.0)
        dx, dy = torch.randint(0, 2 * shift + 1, (2,), generator=g).tolist()  # one shift per batch: cheap
        x = p[:, :, dy:dy + 32, dx:dx + 32]
    if flip:
        f = torch.rand(n, generator=g) < 0.5
        x = torch.where(f[:, None, None, None], x.flip(-1), x)
    if noise:
        x = x + noise * torch.rand(n, 1, 1, 1, generator=g) * torch.randn(x.shape, generator=g)
    return x


@torch.no_grad()
def accuracy(logits_fn, images: Tensor, labels: Tensor, batch_size: int = 1000) -> float:
    """Top-1 accuracy of ``logits_fn`` ((B,1,32,32) -> (B,C)) on a labelled set."""
    hits = 0
    for i in range(0, len(labels), batch_size):
        hits += (logits_fn(images[i:i + batch_size]).argmax(1) == labels[i:i + batch_size]).sum().item()
    return hits / len(labels)


def _train_classifier(net: nn.Module, seed: int, epochs: float, batch_size: int, lr: float, desc: str,
                      max_steps: int | None, noise: float, shift: int) -> dict:
    """AdamW + one-cycle cosine lr, label smoothing 0.05, augmentation; returns facts for the json config."""
    train, test = load_split("train"), load_split("test")
    g = torch.Generator().manual_seed(seed)
    steps_per_epoch = len(train) // batch_size
    total = max(1, int(epochs * steps_per_epoch))
    if max_steps is not None:
        total = min(total, max_steps)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total, pct_start=0.15)
    t0 = time.time()
    net.train()
    perm = torch.randperm(len(train), generator=g)
    bar = tqdm(range(total), desc=desc, leave=False)
    for step in bar:
        j = step % steps_per_epoch
        if j == 0 and step:
            perm = torch.randperm(len(train), generator=g)
        idx = perm[j * batch_size:(j + 1) * batch_size]
        x = _augment_grey(train.images[idx], g, shift=shift, noise=noise)
        loss = F.cross_entropy(net(x), train.labels[idx], label_smoothing=0.05)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    net.eval()
    n_eval = len(test) if max_steps is None else 200
    acc = accuracy(net, test.images[:n_eval], test.labels[:n_eval])
    return {"seed": seed, "steps": total, "batch_size": batch_size, "epochs": round(total / steps_per_epoch, 3),
            "lr": lr, "augment": {"shift": shift, "noise": noise}, "train_seconds": round(time.time() - t0, 1),
            "test_accuracy": round(acc, 4),
            "test_images": n_eval}


# ---------------------------------------------------------------------------------------------------
# The three networks


def train_eval_classifier(out_dir=None, seed: int = 0, epochs: float = 2.5, batch_size: int = 128, lr: float = 3e-3,
                          max_steps: int | None = None, test_stats: bool | None = None) -> dict:
    """Train :class:`EvalClassifier` on the train split and write ``eval_classifier.*`` into ``out_dir``.

    ``test_stats`` (default: on for full runs, off when ``max_steps`` is set) also writes the test-split
    reference statistics of the metrics (``eval_classifier_test_stats.safetensors``).
    Returns the json config written (constructor args + seed, steps, wall time, test accuracy).
    """
    torch.manual_seed(seed)
    net = classifier.build_eval_classifier(classifier.DEFAULT_CONFIG)
    facts = _train_classifier(net, seed, epochs, batch_size, lr, "eval classifier", max_steps, noise=0.1, shift=1)
    config = {**classifier.DEFAULT_CONFIG, "training": facts, "params": sum(p.numel() for p in net.parameters())}
    if out_dir is not None:
        save_net(net, config, out_dir, classifier.NAME)
        if test_stats if test_stats is not None else max_steps is None:
            write_test_stats(net, out_dir)
    return config


def write_test_stats(net: nn.Module, out_dir) -> None:
    """Store the metrics' test-split statistics of the evaluation classifier ``net`` next to its weights."""
    net.eval()
    tensors = {k: v.contiguous() for k, v in compute_reference_stats(net).to_tensors().items()}
    io.atomic_save(Path(out_dir) / classifier.TEST_STATS, lambda tmp: save_file(tensors, str(tmp)))


def train_oracle_judge(out_dir=None, seed: int = 1, epochs: float = 1.25, batch_size: int = 128, lr: float = 3e-3,
                       max_steps: int | None = None) -> dict:
    """Train the oracle's :class:`JudgeNet` (its own architecture and seed) and write ``oracle_judge.*``.

    The json also stores the real-data statistics of the oracle's pixel preference terms (for their
    standardisation), measured on the train split.
    """
    torch.manual_seed(seed)
    net = oracle.JudgeNet(**oracle.DEFAULT_JUDGE_CONFIG)
    facts = _train_classifier(net, seed, epochs, batch_size, lr, "oracle judge", max_steps, noise=0.2, shift=2)
    ink, crisp = oracle.preference_terms(load_split("train").images[:10000])
    stats = {"ink_mean": ink.mean().item(), "ink_std": ink.std().item(),
             "crisp_mean": crisp.mean().item(), "crisp_std": crisp.std().item()}
    config = {**oracle.DEFAULT_JUDGE_CONFIG, "pixel_stats": stats, "training": facts,
              "params": sum(p.numel() for p in net.parameters())}
    if out_dir is not None:
        save_net(net, config, out_dir, oracle.NAME)
    return config


def random_colourise(x: Tensor, g: torch.Generator) -> Tensor:
    """(N,1,H,W) grey in [-1,1] -> (N,3,H,W) with a random per-image tint, brightness and slight colour noise,
    so the encoder is used to the colour casts a VAE decoder produces. Output clamped to [-1, 1]."""
    n = x.shape[0]
    u = (x + 1) / 2                                                     # [0, 1], ink = 1
    tint = 0.6 + 0.4 * torch.rand(n, 3, 1, 1, generator=g)              # per-channel gain
    grey = torch.rand(n, 1, 1, 1, generator=g) < 0.5                    # half stay exactly grey
    tint = torch.where(grey, torch.ones_like(tint), tint)
    y = u * tint + 0.03 * torch.randn(n, 3, *x.shape[2:], generator=g)
    return (2 * y - 1).clamp(-1, 1)


def train_disc_encoder(out_dir=None, seed: int = 2, epochs: float = 0.4, batch_size: int = 128, lr: float = 2e-3,
                       max_steps: int | None = None) -> dict:
    """Pretrain :class:`DiscEncoder` as a denoising autoencoder on colourised RGB 32x32 and write ``disc_encoder.*``.

    Objective: x_noisy = x + s*eps (s ~ U[0.05, 0.6] per image, plus random 8x8 cut-outs on a quarter of the
    images); the decoder sees only the deepest level and predicts x. Only the encoder is kept.
    """
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    train, test = load_split("train"), load_split("test")
    enc = encoder.DiscEncoder(**encoder.DEFAULT_CONFIG)
    model = encoder.DiscEncoderDecoder(enc)
    steps_per_epoch = len(train) // batch_size
    total = max(1, int(epochs * steps_per_epoch))
    if max_steps is not None:
        total = min(total, max_steps)
    t0 = time.time()
    _train_dae(model, train, g, total, steps_per_epoch, batch_size, lr)
    mse_out, mse_in = _dae_test_mse(model, test, 500 if max_steps is None else 100)
    facts = {"seed": seed, "steps": total, "batch_size": batch_size, "epochs": round(total / steps_per_epoch, 3),
             "lr": lr, "train_seconds": round(time.time() - t0, 1), "objective": "denoising autoencoder",
             "test_mse_at_noise_0.3": round(mse_out, 5), "input_mse_at_noise_0.3": round(mse_in, 5)}
    config = {**encoder.DEFAULT_CONFIG, "training": facts, "params": sum(p.numel() for p in enc.parameters())}
    if out_dir is not None:
        save_net(enc, config, out_dir, encoder.NAME)
    return config


def _corrupt(x: Tensor, g: torch.Generator) -> Tensor:
    """The denoising autoencoder's input: x + s*eps, s ~ U[0.05, 0.6] per image, an 8x8 cut-out on a quarter."""
    n = x.shape[0]
    s = 0.05 + 0.55 * torch.rand(n, 1, 1, 1, generator=g)
    xn = x + s * torch.randn(x.shape, generator=g)
    cut = torch.rand(n, generator=g) < 0.25
    i, j = torch.randint(0, 25, (2,), generator=g).tolist()
    xn[cut, :, i:i + 8, j:j + 8] = 0.0
    return xn


def _train_dae(model: nn.Module, train, g: torch.Generator, total: int, steps_per_epoch: int, batch_size: int,
               lr: float) -> None:
    """``total`` AdamW steps (one-cycle cosine lr) of the DAE on colourised, flipped, shifted train images."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total, pct_start=0.1)
    model.train()
    perm = torch.randperm(len(train), generator=g)
    bar = tqdm(range(total), desc="disc encoder (DAE)", leave=False)
    for step in bar:
        j = step % steps_per_epoch
        if j == 0 and step:
            perm = torch.randperm(len(train), generator=g)
        idx = perm[j * batch_size:(j + 1) * batch_size]
        x = random_colourise(_augment_grey(train.images[idx], g, noise=0, flip=True), g)
        loss = F.mse_loss(model(_corrupt(x, g)), x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 20 == 0:
            bar.set_postfix(mse=f"{loss.item():.4f}")
    model.eval()


@torch.no_grad()
def _dae_test_mse(model: nn.Module, test, n: int) -> tuple[float, float]:
    """(reconstruction MSE, input MSE) of ``n`` colourised test images at noise 0.3."""
    gt = torch.Generator().manual_seed(12345)
    x = random_colourise(test.images[:n], gt)
    s = 0.3
    xn = x + s * torch.randn(x.shape, generator=gt)
    return F.mse_loss(model(xn), x).item(), s * s


def pretrain_eval(out_dir=None, seed: int = 0, quick: bool = False) -> dict:
    """Train all three networks (seeds ``seed``, ``seed+1``, ``seed+2``) into ``out_dir`` (default: shipped assets).

    ``quick=True`` runs a few optimisation steps each (for an end-to-end test); the result loads but is useless.
    Returns {name: json config}.
    """
    out_dir = resolve_dir(out_dir)
    kw = {"max_steps": 2, "batch_size": 32} if quick else {}
    t0 = time.time()
    configs = {
        "eval_classifier": train_eval_classifier(out_dir, seed=seed, **kw),
        "oracle_judge": train_oracle_judge(out_dir, seed=seed + 1, **kw),
        "disc_encoder": train_disc_encoder(out_dir, seed=seed + 2, **kw),
    }
    for name, c in configs.items():
        t = c["training"]
        acc = t.get("test_accuracy", t.get("test_mse_at_noise_0.3"))
        tqdm.write(f"{name}: {c['params']} params, {t['steps']} steps, {t['train_seconds']} s, "
                   f"{'test acc' if 'test_accuracy' in t else 'test mse'} {acc}")
    tqdm.write(f"eval networks written to {out_dir} in {time.time() - t0:.0f} s")
    return configs
