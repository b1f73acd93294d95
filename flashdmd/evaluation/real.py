"""`flashdmd eval` for real (non-world) models, and `flashdmd eval-stats`.

``flashdmd eval --model M --prompts FILE`` samples ``--num-images`` images (prompt i = line i mod the number
of lines) with :func:`flashdmd.inference.sample_images` and computes the metrics whose local weights
are given; the JSON holds ``{metric: value, seconds_per_image, nfe, num_images, ...}``:

* ``fid`` (``--fid-inception PT --fid-ref DIR|STATS``): Fréchet distance of pytorch-fid Inception pool3
  features (:mod:`flashdmd.evaluation.backends.fid`) to a folder of real images or precomputed statistics;
* ``clip_score`` (``--clip DIR``): mean of 100 * max(cos, 0) under a transformers CLIPModel;
* ``pickscore`` (``--pickscore DIR``), ``hpsv2`` (``--hpsv2 DIR``, 100 * cos), ``imagereward`` (``--imagereward DIR``).
Each score also gets ``<key>_std`` (the per-image standard deviation). What each backend expects on disk is
in docs/EVALUATION.md and the backend modules.

:class:`RealEvaluator` is the same evaluation as an :class:`flashdmd.evaluation.evaluator.Evaluator`: built
once from the paths (every backend loaded up front, so a wrong path fails before any sampling or training),
then ``evaluate(model)`` as often as wanted -- `flashdmd eval` uses it once, a training run every
``eval_every_steps``.

The paper's COCO-10k protocol is ONE command, given a local file with 10 000 COCO-2014 val captions (one per
line) and the statistics of the matching real images::

    flashdmd eval --model runs/sdxl --prompts coco10k_captions.txt --num-images 10000 --seed 0 \\
        --fid-inception pt_inception-2015-12-05-6726825d.pth --fid-ref coco10k_val2014_stats.safetensors \\
        --clip clip-vit-large-patch14/ --pickscore pickscore/ --hpsv2 hpsv2/ --imagereward imagereward/ \\
        --json coco10k.json

and the reference statistics, once, from the real images (resized/cropped beforehand to the resolution you
want to compare at, as is common: a centre crop resized to the model's resolution)::

    flashdmd eval-stats --images coco10k_val2014/ --fid-inception pt_inception-2015-12-05-6726825d.pth \\
        --out coco10k_val2014_stats.safetensors      # or .npz: pytorch-fid's own format

Sampling is streamed in chunks of :data:`CHUNK` images, so memory does not grow with N (10 000 SDXL images
never sit in memory together). Chunk c calls ``sample_images(model, its prompts, seed=seed + c * SEED_STRIDE)``;
so the images depend on (seed, N's prompts) only -- not on ``--batch-size`` -- and chunk 0 equals
``sample_images(model, prompts[:CHUNK], seed)``. ``seconds_per_image`` counts sampling (text encoding,
denoising, VAE decoding) only, not the metric networks.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from flashdmd import FlashDMDError, io
from flashdmd.data import read_prompt_file
from flashdmd.evaluation.backends import METRIC_KEYS, load_scorer, require_folder, scorer_class, score_batched
from flashdmd.evaluation.backends.fid import FIDInception, folder_features, image_files, reference_stats, save_stats
from flashdmd.evaluation.metrics import feature_stats, frechet_distance
from flashdmd.inference import DTYPES, load_model, nfe, sample_images

CHUNK = 100
SEED_STRIDE = 1_000_000
# every metric this module can compute -> whether higher is better (the ``<key>_std`` spreads are not metrics)
HIGHER_IS_BETTER = {"fid": False, "clip_score": True, "pickscore": True, "hpsv2": True, "imagereward": True}


def cycle_prompts(prompts: list[str], n: int) -> list[str]:
    """``n`` prompts: line i mod the number of lines."""
    if not prompts:
        raise FlashDMDError("no prompts to evaluate on")
    return [prompts[i % len(prompts)] for i in range(n)]


def check_backend_paths(fid_inception=None, fid_ref=None, scorers: dict[str, str | None] | None = None) -> None:
    """Cheap checks (no weights read) that every requested backend's path is there and has the files it needs:
    a typo fails at once, not after loading the others (or after hours of training)."""
    if (fid_inception is None) != (fid_ref is None):
        raise FlashDMDError("FID needs both fid_inception (--fid-inception: the Inception weights) and fid_ref "
                            "(--fid-ref: real images or their statistics)")
    if fid_inception is not None:
        for what, p in (("FID Inception weights", fid_inception), ("FID reference", fid_ref)):
            if not Path(p).expanduser().exists():
                raise FlashDMDError(f"{what} {p} not found")
    for name, path in (scorers or {}).items():
        if path:
            cls = scorer_class(name)
            require_folder(path, cls.WHAT, cls.NEEDS, cls.HINT)


def load_backends(fid_inception=None, fid_ref=None, scorers: dict[str, str | None] | None = None, device="cpu",
                  batch_size: int = 50, progress: bool = False) -> dict:
    """Load every requested backend up front (so a wrong path fails before any sampling).

    Returns {"fid": (FIDInception, mu, sigma) or None, "scorers": {name: backend}}; a reference folder
    ``fid_ref`` has its statistics computed here, once."""
    check_backend_paths(fid_inception, fid_ref, scorers)
    fid = None
    if fid_inception is not None:
        inception = FIDInception.from_file(fid_inception, device=device)
        is_folder = Path(fid_ref).expanduser().is_dir()
        bar = _bar("fid-ref", len(image_files(fid_ref)) if is_folder and progress else None, progress and is_folder)
        mu, sigma = reference_stats(fid_ref, inception, batch_size, bar)
        bar.close()
        fid = (inception, mu, sigma)
    loaded = {name: load_scorer(name, path, device) for name, path in (scorers or {}).items() if path}
    return {"fid": fid, "scorers": loaded}


def _bar(desc, total, enabled):
    return tqdm(total=total, desc=desc, unit="img", disable=not enabled)


def evaluate_real(model, prompts: list[str], num_images: int, backends: dict, seed: int = 0,
                  steps: int | None = None, guidance_scale: float | None = None, batch_size: int = 16,
                  metric_batch_size: int = 50, progress: bool = False) -> dict:
    """Sample ``num_images`` images for the cycled ``prompts`` and compute the loaded backends' metrics."""
    _check_num_images(num_images, backends.get("fid") is not None)
    fid = backends.get("fid")
    todo = cycle_prompts(prompts, num_images)
    feats, scores = [], {name: [] for name in backends.get("scorers", {})}
    bar = _bar("eval", num_images, progress)
    sample_s = 0.0
    for c, start in enumerate(range(0, num_images, CHUNK)):
        chunk = todo[start:start + CHUNK]
        t0 = time.perf_counter()
        images = sample_images(model, chunk, seed=seed + c * SEED_STRIDE, steps=steps, guidance_scale=guidance_scale,
                               batch_size=batch_size, progress=bar)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        sample_s += time.perf_counter() - t0
        if fid is not None:
            feats.append(fid[0].features(images, metric_batch_size))
        for name, scorer in backends.get("scorers", {}).items():
            scores[name].append(score_batched(scorer, images, chunk, metric_batch_size))
        del images
    bar.close()
    out: dict = {}
    if fid is not None:
        mu, sigma = feature_stats(torch.cat(feats))
        out["fid"] = frechet_distance(mu, sigma, fid[1], fid[2])
    for name, parts in scores.items():
        s = torch.cat(parts).double()
        key = METRIC_KEYS[name]
        out[key] = float(s.mean())
        out[f"{key}_std"] = float(s.std()) if s.numel() > 1 else 0.0
    out.update(seconds_per_image=sample_s / num_images, nfe=nfe(model, steps, guidance_scale), num_images=num_images)
    return out


def _check_num_images(num_images: int, fid: bool) -> None:
    if num_images < 1:
        raise FlashDMDError(f"the number of evaluation images must be >= 1, got {num_images}")
    if fid and num_images < 2:
        raise FlashDMDError("FID needs at least 2 evaluation images (a covariance)")


# ---------------------------------------------------------------------------------------------------
# The Evaluator of real models


class RealEvaluator:
    """Held-out metrics of a model on a prompt file, from local metric weights (the Evaluator protocol of
    :mod:`flashdmd.evaluation.evaluator`).

    Every :meth:`evaluate` samples the same ``num_images`` prompts (line i mod the number of lines) from the
    same noise (``seed``), so evaluations over training compare like with like. :attr:`higher_is_better` holds
    exactly the metrics it computes (``fid`` lower; ``clip_score`` / ``pickscore`` / ``hpsv2`` / ``imagereward``
    higher); the result also carries each score's ``<key>_std`` and ``seconds_per_image`` / ``nfe`` /
    ``num_images``. The caller hands in an inference :class:`flashdmd.inference.Model` ready to sample (its
    network in eval mode); the evaluator never changes it.
    """

    def __init__(self, prompts: list[str], num_images: int, backends: dict, batch_size: int = 16,
                 metric_batch_size: int = 50):
        _check_num_images(num_images, backends.get("fid") is not None)
        cycle_prompts(prompts, 1)
        self.prompts, self.num_images, self.backends = list(prompts), num_images, backends
        self.batch_size, self.metric_batch_size = batch_size, metric_batch_size
        keys = (["fid"] if backends.get("fid") is not None else []) + \
            [METRIC_KEYS[name] for name in backends.get("scorers", {})]
        self.higher_is_better: dict[str, bool] = {k: HIGHER_IS_BETTER[k] for k in keys}

    @staticmethod
    def check_paths(prompts_file, num_images: int, *, clip=None, pickscore=None, hpsv2=None, imagereward=None,
                    fid_inception=None, fid_ref=None) -> list[str]:
        """Cheap checks of everything :meth:`from_paths` reads (the prompt file is read, no weights are):
        one-line FlashDMDErrors for a missing path or a bad count. Returns the prompts."""
        prompts = read_prompt_file(prompts_file)
        _check_num_images(num_images, fid_inception is not None or fid_ref is not None)
        check_backend_paths(fid_inception, fid_ref, _scorers(clip, pickscore, hpsv2, imagereward))
        return prompts

    @classmethod
    def from_paths(cls, prompts_file, num_images: int, *, clip=None, pickscore=None, hpsv2=None, imagereward=None,
                   fid_inception=None, fid_ref=None, device="cpu", batch_size: int = 16, metric_batch_size: int = 50,
                   progress: bool = False) -> "RealEvaluator":
        """Read the prompt file and load every requested backend now (a wrong path fails here, before any
        sampling or training). ``fid_ref`` is a folder of real images (its statistics are computed here, once)
        or a statistics file of `flashdmd eval-stats` / pytorch-fid; FID needs ``fid_inception`` as well."""
        prompts = cls.check_paths(prompts_file, num_images, clip=clip, pickscore=pickscore, hpsv2=hpsv2,
                                  imagereward=imagereward, fid_inception=fid_inception, fid_ref=fid_ref)
        backends = load_backends(fid_inception, fid_ref, _scorers(clip, pickscore, hpsv2, imagereward), device,
                                 metric_batch_size, progress=progress)
        return cls(prompts, num_images, backends, batch_size, metric_batch_size)

    def evaluate(self, model, seed: int = 0, steps: int | None = None, guidance_scale: float | None = None,
                 progress: bool = False) -> dict:
        return evaluate_real(model, self.prompts, self.num_images, self.backends, seed, steps, guidance_scale,
                             batch_size=self.batch_size, metric_batch_size=self.metric_batch_size, progress=progress)


def _scorers(clip, pickscore, hpsv2, imagereward) -> dict[str, str | None]:
    return {"clip": clip, "pickscore": pickscore, "hpsv2": hpsv2, "imagereward": imagereward}


def default_device(name: str | None) -> str:
    if name:
        return name
    return "cuda" if torch.cuda.is_available() else "cpu"


def run_eval(args) -> dict:
    """The real-model branch of `flashdmd eval` (called by runner.run)."""
    if args.prompts is None:
        raise FlashDMDError("give --prompts FILE (one prompt per line) to evaluate with the metric backends")
    if args.num_images < 1:
        raise FlashDMDError("--num-images must be >= 1")
    if args.steps is not None and args.steps < 1:
        raise FlashDMDError("--steps must be >= 1")
    out = Path(args.json)
    if not out.parent.exists():
        raise FlashDMDError(f"folder {out.parent} for --json does not exist")
    device = default_device(getattr(args, "device", None))
    progress = not getattr(args, "no_progress", False)
    evaluator = RealEvaluator.from_paths(
        args.prompts, args.num_images, clip=args.clip, pickscore=args.pickscore, hpsv2=args.hpsv2,
        imagereward=args.imagereward, fid_inception=args.fid_inception, fid_ref=args.fid_ref, device=device,
        batch_size=args.batch_size, metric_batch_size=args.metric_batch_size, progress=progress)
    model = load_model(args.model, device=device, dtype=DTYPES[getattr(args, "dtype", "fp32")])
    metrics = evaluator.evaluate(model, args.seed, args.steps, args.cfg, progress=progress)
    if not evaluator.higher_is_better:
        print("note: no metric backend given (--fid-inception/--fid-ref, --clip, --pickscore, --hpsv2, "
              "--imagereward): only speed is reported")
    metrics.update(model=args.model, kind=model.kind, steps=args.steps, cfg=args.cfg,
                   guidance_scale=model.guidance_scale if args.cfg is None else args.cfg, seed=args.seed,
                   prompts=str(args.prompts), num_prompts=len(evaluator.prompts), device=device,
                   fid_ref=None if args.fid_ref is None else str(args.fid_ref))
    write_json(out, metrics)
    return metrics


def write_json(out: Path, metrics: dict) -> None:
    io.atomic_write_text(out, json.dumps(metrics, indent=2), f"the metrics {out.name}")
    print(json.dumps(metrics, indent=2))


# ---------------------------------------------------------------------------------------------------
# `flashdmd eval-stats`

def add_stats_arguments(p):
    p.add_argument("--images", required=True, help="folder of real images (searched recursively)")
    p.add_argument("--fid-inception", required=True, help="pytorch-fid weights pt_inception-2015-12-05-6726825d.pth "
                   "(or a .safetensors conversion)")
    p.add_argument("--out", required=True, help="statistics file: .safetensors (mu, sigma) or .npz (pytorch-fid's)")
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_stats(args) -> Path:
    out = Path(args.out)
    if out.suffix not in (".safetensors", ".npz"):
        raise FlashDMDError(f"--out {out} must end in .safetensors or .npz")
    if not out.parent.is_dir():
        raise FlashDMDError(f"folder {out.parent} for --out does not exist")
    n = len(image_files(args.images))
    if n < 2:
        raise FlashDMDError(f"{args.images} holds {n} image; statistics need at least 2")
    inception = FIDInception.from_file(args.fid_inception, device=default_device(args.device))
    bar = _bar("eval-stats", n, not args.no_progress)
    feats = folder_features(inception, args.images, args.batch_size, bar)
    bar.close()
    mu, sigma = feature_stats(feats)
    save_stats(out, mu, sigma, n)
    print(f"wrote {out}: mu {tuple(mu.shape)}, sigma {tuple(sigma.shape)} from {n} images")
    return out
