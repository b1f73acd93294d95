"""Can the Pixel-GAN tell real images from a student's? (BENCHMARKS.md section 3, issue 8)

In the Flash-DMD runs the Pixel-GAN's D(real) and D(fake) logits move together and its hinge loss stays near
chance (2.0), so the low-noise student step gets little adversarial signal. This probe asks whether that is the
discriminator's capacity or its training: on a fixed set of student samples and real training images it trains
fresh Pixel-GAN heads (the same frozen world encoder, the same heads and hinge loss as in training) for as many
updates as a default run gives them, at two learning rates, and reports held-out real-vs-fake accuracy; and, as
references, linear probes (logistic regression) on the disc encoder's pooled features and on the evaluation
classifier's features (the ones FD is computed on). With ``--variants`` it also asks whether the gap to the linear
probe is the heads' form or their training budget: the same heads trained 5x longer, and an MLP head on the
encoder's globally pooled, per-channel standardised features (statistics of the real training images), both on
the frozen encoder's features computed once.

    .venv/bin/python benchmarks/disc_probe.py --run benchmarks/runs/convergence_sdxl/flash_ttur1 \
        --run benchmarks/runs/convergence_sdxl/dmd2 --variants --out benchmarks/results/disc_probe.json
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_threads_arg, parse  # noqa: E402


def accuracy(logits_real, logits_fake) -> float:
    return float(((logits_real > 0).float().mean() + (logits_fake <= 0).float().mean()) / 2)


def _mean_logit(logits):
    """A list of logit maps (B, 1, h, w) -> one logit per image: the mean over positions and heads."""
    import torch
    return torch.stack([x.flatten(1).mean(1) for x in logits]).mean(0)


def pooled_head(real_feats, channels):
    """The library's pooled head (``disc_head: pooled``, hidden 256) calibrated on the real training features."""
    from flashdmd.networks.discriminator import PooledHead
    head = PooledHead(channels, 256)
    head.calibrate(PooledHead.pool(real_feats))
    return (lambda feats: [head(feats)]), head.parameters()


def patch_heads():
    """Fresh Pixel-GAN heads as a run builds them, applied to precomputed features."""
    from flashdmd.networks.discriminator import build_pixel_discriminator
    heads = build_pixel_discriminator("world").heads
    return (lambda feats: [h(f) for h, f in zip(heads, feats)]), heads.parameters()


def train_heads(make_head, real, fake, test_real, test_fake, lr: float, steps: int, batch: int, seed: int) -> dict:
    """Train the head ``make_head()`` gives (forward: list of feature maps -> list of logit maps, parameters) with
    the hinge loss, as a run trains its heads, on precomputed features of the frozen encoder (it is frozen, so
    encoding every batch again would give the same features); held-out accuracy at six points."""
    import torch

    from flashdmd.losses import d_loss
    torch.manual_seed(seed)
    head, params = make_head()
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.0, 0.999), weight_decay=0.01)
    g = torch.Generator().manual_seed(seed)
    curve = []
    for step in range(1, steps + 1):
        i = torch.randint(len(real[0]), (batch,), generator=g)
        j = torch.randint(len(fake[0]), (batch,), generator=g)
        loss = d_loss(head([f[i] for f in real]), head([f[j] for f in fake]), "hinge").mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % (steps // 6) == 0 or step == steps:
            with torch.no_grad():
                acc = accuracy(_mean_logit(head(test_real)), _mean_logit(head(test_fake)))
            curve.append({"step": step, "train_loss": float(loss.detach()), "test_accuracy": acc})
    return {"lr": lr, "steps": steps, "final_test_accuracy": curve[-1]["test_accuracy"], "curve": curve}


def linear_probe(train_x, train_y, test_x, test_y, steps: int = 500) -> float:
    import torch
    mu, sd = train_x.mean(0), train_x.std(0) + 1e-6
    a, b = (train_x - mu) / sd, (test_x - mu) / sd
    w = torch.zeros(a.shape[1], requires_grad=True)
    c = torch.zeros((), requires_grad=True)
    opt = torch.optim.LBFGS([w, c], max_iter=steps)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(a @ w + c, train_y) + 1e-3 * w.square().sum()
        loss.backward()
        return loss
    opt.step(closure)
    with torch.no_grad():
        return float((((b @ w + c) > 0).float() == test_y).float().mean())


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", action="append", required=True, help="a finished distill run folder (repeatable)")
    p.add_argument("--num", type=int, default=1024, help="student samples and real images per set")
    p.add_argument("--steps", type=int, default=300, help="head updates (a default Stage-1 run gives 300)")
    p.add_argument("--lrs", type=float, nargs="+", default=[1e-4, 1e-3])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--variants", action="store_true",
                   help="also train the heads 5x longer and a pooled standardised MLP head (frozen features)")
    add_threads_arg(p)
    p.add_argument("--out", required=True)
    a = parse(p)
    import torch
    from flashdmd.world.classifier import load_eval_classifier
    from flashdmd.inference import load_model, sample_images
    from flashdmd.networks.discriminator import PooledHead
    from flashdmd.world.data import load_split, to_grey, to_rgb
    from flashdmd.world.encoder import load_disc_encoder
    from flashdmd.world.prompts import eval_prompts

    n_test = a.num // 4
    split = load_split("train")
    idx = torch.randperm(len(split.images), generator=torch.Generator().manual_seed(0))[:a.num]
    real = to_rgb(split.images[idx]).contiguous()
    enc, clf = load_disc_encoder(), load_eval_classifier()

    results = {}
    for run in a.run:
        t0 = time.time()
        model = load_model(run)
        prompts, _ = eval_prompts(a.num)
        fake = sample_images(model, prompts, seed=7)
        tr, te = slice(n_test, None), slice(0, n_test)
        with torch.no_grad():
            fr, ff = enc(real), enc(fake)
            cr, cf = (clf.eval().features(to_grey(x)) for x in (real, fake))
        sl = lambda fs, s: [f[s] for f in fs]  # noqa: E731
        split_feats = (sl(fr, tr), sl(ff, tr), sl(fr, te), sl(ff, te))
        row = {"heads": [train_heads(patch_heads, *split_feats, lr, a.steps, a.batch, 0) for lr in a.lrs]}
        er, ef = PooledHead.pool(fr), PooledHead.pool(ff)  # each level's global average
        y = torch.cat([torch.ones(a.num - n_test), torch.zeros(a.num - n_test)])
        yt = torch.cat([torch.ones(n_test), torch.zeros(n_test)])
        row["linear_probe_disc_encoder"] = linear_probe(torch.cat([er[tr], ef[tr]]), y, torch.cat([er[te], ef[te]]), yt)
        row["linear_probe_eval_classifier"] = linear_probe(torch.cat([cr[tr], cf[tr]]), y, torch.cat([cr[te], cf[te]]), yt)
        if a.variants:
            pooled_mlp = lambda: pooled_head(split_feats[0], enc.feature_channels)  # noqa: E731
            row["variants"] = [
                {"head": name, "lr": lr, "steps": steps,
                 "test_accuracy": train_heads(make, *split_feats, lr, steps, a.batch, 0)["final_test_accuracy"]}
                for lr in a.lrs
                for name, make, steps in (("patch heads (as in a run)", patch_heads, 5 * a.steps),
                                          ("pooled standardised MLP", pooled_mlp, a.steps))]
        row["seconds"] = time.time() - t0
        results[run] = row
        print(run, json.dumps({k: v for k, v in row.items() if k != "heads"}),
              [(h["lr"], h["final_test_accuracy"]) for h in row["heads"]],
              [(v["head"], v["lr"], v["steps"], v["test_accuracy"]) for v in row.get("variants", [])], flush=True)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"num": a.num, "test_per_class": n_test, "runs": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
