"""Training the latent reward model on preference pairs (LPO-style noisy-latent Bradley-Terry).

For a pair (x_w, x_l) of clean latents with prompt c, one draw of a timestep t and one noise eps are
shared by both members (as LPO does, so the pair differs only in content):

    x_w,t = alpha_t x_w + sigma_t eps,     x_l,t = alpha_t x_l + sigma_t eps
    L_BT  = -log sigmoid(s(x_w,t, t, c) - s(x_l,t, t, c))  = softplus(s_l - s_w)       per pair

t is drawn with the family schedule's ``sample_timesteps(n, lo, hi)`` (uniform integer steps in
[lo*T, hi*T) for VP; 1000*shift(u), u ~ U[lo, hi) for flow), so "fraction of the range" means the same
thing in training and in the held-out report. The report gives the pairwise accuracy
P(s_w > s_l) (ties count one half) on held-out pairs in three noise bands, :data:`NOISE_BANDS`.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from flashdmd import FlashDMDError, io
from flashdmd.families import Conditioning, load_family
from flashdmd.networks.reward import LatentRewardModel
from flashdmd.rewards.pairs import PairSet, load_pairs, read_records

FROZEN_DTYPES = ("auto", "float32", "bfloat16", "float16")
NOISE_BANDS = {"low": (0.1, 0.3), "mid": (0.4, 0.6), "high": (0.7, 0.95)}
TRAIN_T_RANGE = (0.02, 0.98)


def bradley_terry_loss(s_w: Tensor, s_l: Tensor) -> Tensor:
    """Per-pair Bradley-Terry loss -log sigmoid(s_w - s_l) = softplus(s_l - s_w), shape (B,)."""
    return F.softplus(s_l - s_w)


def noised_pair(schedule, x_w: Tensor, x_l: Tensor, t: Tensor, noise: Tensor) -> tuple[Tensor, Tensor]:
    """(x_w,t, x_l,t): both clean latents (B, C, h, w) noised to model timesteps t (B,) with the SAME noise."""
    return schedule.add_noise(x_w, noise, t), schedule.add_noise(x_l, noise, t)


def pair_scores(model, x_w: Tensor, x_l: Tensor, t: Tensor, noise: Tensor, cond,
                noise_l: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(s_w, s_l), each (B,): the LRM's scores of a noised pair, one batched forward of 2B rows. Both members
    get ``noise`` (LPO) unless ``noise_l`` is given for the loser (independent-noise evaluation)."""
    if noise_l is None:
        xw_t, xl_t = noised_pair(model.family.schedule, x_w, x_l, t, noise)
    else:
        sched = model.family.schedule
        xw_t, xl_t = sched.add_noise(x_w, noise, t), sched.add_noise(x_l, noise_l, t)
    s = model.score(torch.cat([xw_t, xl_t]), torch.cat([t, t]), Conditioning.cat([cond, cond]))
    return s.chunk(2)


class PromptBank:
    """Text conditioning of a pair set, encoded once (frozen text encoders): unique prompts + row index."""

    def __init__(self, family, prompts: list[str], batch_size: int = 256):
        unique = sorted(set(prompts))
        pos = {p: i for i, p in enumerate(unique)}
        self.rows = torch.tensor([pos[p] for p in prompts], dtype=torch.long)
        self.cond = Conditioning.cat([family.encode_prompts(unique[i:i + batch_size])
                                      for i in range(0, len(unique), batch_size)])

    def __getitem__(self, idx: Tensor):
        return self.cond[self.rows[idx].to(self.cond.prompt_embeds.device)]


def split_indices(n: int, val_frac: float, seed: int = 0) -> tuple[Tensor, Tensor]:
    """A seeded random (train, held-out) split of range(n); held-out gets round(val_frac*n), at least 1
    when val_frac > 0 and n >= 2."""
    if not 0 <= val_frac < 1:
        raise FlashDMDError(f"--val-frac must be in [0, 1), got {val_frac}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = min(n - 1, max(1, round(val_frac * n))) if val_frac > 0 and n >= 2 else 0
    return perm[n_val:].sort().values, perm[:n_val].sort().values


@torch.no_grad()
def pairwise_accuracy(model, pairs, bank: PromptBank, idx: Tensor, band: tuple[float, float], draws: int = 2,
                      seed: int = 0, batch_size: int = 64, shared_noise: bool = True) -> float:
    """P(s_w > s_l) (ties 1/2) over pairs ``idx`` x ``draws`` (t, eps) draws with t in the fraction ``band``;
    seeded, so the same model always gets the same number. ``shared_noise`` (the training protocol): both
    members get the same eps, so x_w,t - x_l,t = alpha_t (x_w - x_l) exactly; False draws a separate eps
    for the loser (a harder check: the noise no longer cancels)."""
    was_training = model.training
    model.eval()
    g = torch.Generator().manual_seed(seed)
    dev = model.family.device
    hits, total = 0.0, 0
    for _ in range(draws):
        for start in range(0, len(idx), batch_size):
            rows = idx[start:start + batch_size]
            x_w, x_l = pairs.winners[rows].to(dev), pairs.losers[rows].to(dev)
            t = model.family.schedule.sample_timesteps(len(rows), *band, generator=g).float().to(dev)
            noise = torch.randn(x_w.shape, generator=g).to(dev)
            noise_l = None if shared_noise else torch.randn(x_w.shape, generator=g).to(dev)
            s_w, s_l = pair_scores(model, x_w, x_l, t, noise, bank[rows], noise_l)
            hits += float((s_w > s_l).sum() + 0.5 * (s_w == s_l).sum())
            total += len(rows)
    model.train(was_training)
    return hits / max(total, 1)


def band_accuracies(model, pairs, bank, idx, draws: int = 2, seed: int = 0,
                    shared_noise: bool = True) -> dict[str, float]:
    return {name: pairwise_accuracy(model, pairs, bank, idx, band, draws, seed + k, shared_noise=shared_noise)
            for k, (name, band) in enumerate(NOISE_BANDS.items())}


def train_lrm(model, pairs, steps: int = 500, batch_size: int = 32, lr: float = 1e-3,
              backbone_lr: float | None = None, weight_decay: float = 0.0, t_range=TRAIN_T_RANGE,
              val_frac: float = 0.1, seed: int = 0, eval_draws: int = 2, log_every: int = 50,
              grad_clip: float = 1.0, report_before: bool = True, report_train: bool = True,
              print_fn=print, progress: bool = False) -> dict:
    """Train ``model`` (a LatentRewardModel) on a PairSet with the noisy Bradley-Terry loss; AdamW, heads at
    ``lr``, trainable backbone weights (full or LoRA) at ``backbone_lr`` (default lr/10).

    Returns metrics: held-out accuracy per noise band after (and, with ``report_before``, before) training,
    the same after training with independent noise per pair member,
    with ``report_train`` a train-split accuracy on as many pairs as are held out (overfitting check), the
    loss curve, sizes and wall time. ``progress``: a progress bar over the updates (with the time left); the log
    lines then go through ``tqdm.write``.
    """
    if steps < 0 or batch_size < 1:
        raise FlashDMDError("--steps must be >= 0 and --batch >= 1")
    if len(pairs) < 2:
        raise FlashDMDError(f"need at least 2 pairs to train and hold some out, got {len(pairs)}")
    fam = model.family
    t0 = time.perf_counter()
    bank = PromptBank(fam, pairs.prompts)
    train_idx, val_idx = split_indices(len(pairs), val_frac, seed)
    eval_idx = val_idx if len(val_idx) else train_idx
    before = band_accuracies(model, pairs, bank, eval_idx, eval_draws, seed + 100) if report_before else None
    if before is not None:
        print_fn("held-out accuracy before training: " + _fmt(before))

    opt, params = _optimizer(model, lr, backbone_lr, weight_decay)
    bar = tqdm(total=steps, desc="reward train", unit="step", disable=not progress, dynamic_ncols=True)
    try:
        curve = _fit(model, pairs, bank, train_idx, opt, params, steps, batch_size, t_range,
                     torch.Generator().manual_seed(seed + 1), grad_clip, log_every, t0,
                     tqdm.write if progress and print_fn is print else print_fn, bar)
    finally:
        bar.close()
    after = band_accuracies(model, pairs, bank, eval_idx, eval_draws, seed + 100)
    n_check = len(eval_idx)
    train_acc = band_accuracies(model, pairs, bank, train_idx[:n_check], eval_draws, seed + 200) \
        if report_train else None
    independent = band_accuracies(model, pairs, bank, eval_idx, eval_draws, seed + 100, shared_noise=False)
    print_fn("held-out accuracy after training:  " + _fmt(after))
    print_fn("  same, independent noise per member: " + _fmt(independent))
    return {"heldout_accuracy": after, "heldout_accuracy_before": before, "train_accuracy": train_acc,
            "heldout_accuracy_independent_noise": independent,
            "bands": {k: list(v) for k, v in NOISE_BANDS.items()}, "num_pairs": len(pairs),
            "num_train": len(train_idx), "num_heldout": len(val_idx), "heldout_is_train": not len(val_idx),
            "eval_draws": eval_draws, "steps": steps, "batch_size": batch_size, "lr": lr,
            "backbone_lr": backbone_lr, "t_range": list(t_range), "seed": seed, "loss_curve": curve,
            "wall_seconds": time.perf_counter() - t0}


def _optimizer(model, lr: float, backbone_lr: float | None, weight_decay: float):
    """AdamW with the heads at ``lr`` and the trainable backbone weights at ``backbone_lr`` (default lr/10); returns
    it and the parameters it trains (heads first)."""
    head, back = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (back if name.startswith("backbone.") else head).append(p)
    groups = [{"params": head, "lr": lr}]
    if back:
        groups.append({"params": back, "lr": backbone_lr if backbone_lr is not None else lr / 10})
    return torch.optim.AdamW(groups, weight_decay=weight_decay), head + back


def _fit(model, pairs, bank, train_idx: Tensor, opt, params, steps: int, batch_size: int, t_range,
         g: torch.Generator, grad_clip: float, log_every: int, t0: float, print_fn, bar) -> list[dict]:
    """``steps`` updates on batches of train pairs noised at t ~ ``t_range`` (draws from ``g``), each counted on
    ``bar``; the loss curve."""
    fam, dev = model.family, model.family.device
    curve, window = [], []
    model.train()
    for step in range(1, steps + 1):
        rows = train_idx[torch.randint(0, len(train_idx), (batch_size,), generator=g)]
        x_w, x_l = pairs.winners[rows].to(dev), pairs.losers[rows].to(dev)
        t = fam.schedule.sample_timesteps(batch_size, *t_range, generator=g).float().to(dev)
        noise = torch.randn(x_w.shape, generator=g).to(dev)
        s_w, s_l = pair_scores(model, x_w, x_l, t, noise, bank[rows])
        loss = bradley_terry_loss(s_w, s_l).mean()
        if not torch.isfinite(loss):
            raise FlashDMDError(f"LRM loss became {loss.item()} at step {step}; lower --lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        opt.step()
        bar.update(1)
        window.append((loss.item(), float((s_w > s_l).float().mean())))
        if step % log_every == 0 or step == steps:
            l, a = (sum(v) / len(window) for v in zip(*window))
            curve.append({"step": step, "loss": l, "train_batch_accuracy": a,
                          "logit_scale": model.logit_scale.detach().exp().item(), "seconds": time.perf_counter() - t0})
            print_fn(f"step {step}/{steps}  loss {l:.4f}  batch acc {a:.3f}  scale {curve[-1]['logit_scale']:.1f}  "
                     f"{curve[-1]['seconds']:.0f}s")
            window = []
    model.eval()
    return curve


def _fmt(acc: dict[str, float]) -> str:
    return "  ".join(f"{k} {v:.3f}" for k, v in acc.items())


# ---------------------------------------------------------------------------------------------------
# CLI: flashdmd reward train

BACKBONE_CHOICES = {"frozen": False, "full": True, "lora": "lora"}


def add_train_arguments(p) -> None:
    p.add_argument("--pairs", required=True, nargs="+", metavar="FILE",
                   help="pairs file(s) (JSONL + companion .safetensors latents); several are concatenated")
    p.add_argument("--family-model", required=True,
                   help="teacher folder or world name: initialises the backbone, encodes prompts")
    p.add_argument("--out", required=True, help="LRM folder to write (lrm.json, lrm.safetensors, metrics.json)")
    p.add_argument("--init", default=None, help="start from a saved LRM folder instead of fresh heads")
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--batch", type=int, default=32, help="pairs per step (2x rows per forward)")
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate of the heads")
    p.add_argument("--backbone-lr", type=float, default=None, help="learning rate of the backbone (default lr/10)")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--backbone", choices=sorted(BACKBONE_CHOICES), default="frozen",
                   help="frozen teacher (heads only; small files), full copy, or LoRA on the copy")
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--proj-dim", type=int, default=256)
    p.add_argument("--hidden-dim", type=int, default=512)
    p.add_argument("--time-embed-dim", type=int, default=0, help="append a t embedding to the pooled features (0: LPO)")
    p.add_argument("--feature-cfg-scale", type=float, default=None,
                   help="LPO visual feature enhancement on the deepest tap (e.g. 7.5; doubles the cost)")
    p.add_argument("--t-range", type=float, nargs=2, default=list(TRAIN_T_RANGE), metavar=("LO", "HI"),
                   help="training noise levels as fractions of the schedule's range")
    p.add_argument("--val-frac", type=float, default=0.1, help="held-out fraction of the pairs")
    p.add_argument("--eval-draws", type=int, default=2, help="(t, noise) draws per held-out pair per band")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's own)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--frozen-dtype", choices=FROZEN_DTYPES, default="auto",
                   help="dtype of the frozen teacher parts (backbone, text encoders, VAE), as distill's "
                        "model_frozen_dtype: auto = bfloat16 on CUDA, else float32. The heads, a trained backbone "
                        "copy or its LoRA adapters and the optimiser state stay float32; the LRM loads under any "
                        "frozen dtype later (its teacher fingerprint is the weight files')")


def run_train(args) -> dict:
    lo, hi = args.t_range
    if not 0 <= lo < hi <= 1:
        raise FlashDMDError(f"--t-range must satisfy 0 <= LO < HI <= 1, got {lo} {hi}")
    out = Path(args.out)
    if not out.parent.exists():
        raise FlashDMDError(f"folder {out.parent} for --out does not exist")
    if args.threads:
        torch.set_num_threads(args.threads)
    paths = [Path(p) for p in args.pairs]
    for p in paths:
        read_records(p)  # a missing / empty / malformed file fails before the (slow) model load
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    frozen = torch.bfloat16 if args.frozen_dtype == "auto" and device.type == "cuda" else \
        getattr(torch, "float32" if args.frozen_dtype == "auto" else args.frozen_dtype)
    family = load_family(args.family_model, device=device, frozen_dtype=frozen)
    pairs = PairSet.cat([load_pairs(p, family) for p in paths])
    expected = tuple(family.latent_shape(family.default_resolution, family.default_resolution))
    if tuple(pairs.winners.shape[1:]) != expected:
        raise FlashDMDError(f"pairs hold latents of shape {tuple(pairs.winners.shape[1:])} but {args.family_model} "
                            f"uses {expected}")
    torch.manual_seed(args.seed)
    if args.init:
        model = LatentRewardModel.load(args.init, family)
    else:
        model = LatentRewardModel(family, proj_dim=args.proj_dim, hidden_dim=args.hidden_dim,
                                  train_backbone=BACKBONE_CHOICES[args.backbone], lora_rank=args.lora_rank,
                                  time_embed_dim=args.time_embed_dim, feature_cfg_scale=args.feature_cfg_scale)
    metrics = train_lrm(model, pairs, steps=args.steps, batch_size=args.batch, lr=args.lr,
                        backbone_lr=args.backbone_lr, weight_decay=args.weight_decay, t_range=(lo, hi),
                        val_frac=args.val_frac, seed=args.seed, eval_draws=args.eval_draws, log_every=args.log_every,
                        progress=not args.no_progress)
    metrics.update(pairs=[str(p) for p in paths], family_model=args.family_model, backbone=args.backbone)
    model.save(out, extra_config={"training": {k: metrics[k] for k in ("steps", "batch_size", "lr", "num_pairs",
                                                                          "heldout_accuracy")}})
    io.atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    print(json.dumps({"heldout_accuracy": metrics["heldout_accuracy"], "out": str(out),
                      "wall_seconds": round(metrics["wall_seconds"], 1)}, indent=2))
    return metrics
