"""Preference pairs for the latent reward model: the file format, its loader and `flashdmd reward make-pairs`.

Pairs file format (JSONL, one pair per line; blank lines are skipped; docs/PAIRS.md is the full reference)::

    {"prompt": "a photo of a sneaker", "a": 0, "b": 1, "preferred": "a", "label": 7, "meta": {...}}

* ``prompt`` (str, required): the text both samples were generated for.
* ``a``, ``b`` (required): the two samples. An **int** is a row of the companion latents file; a **str**
  is a PNG path (relative to the pairs file's folder, or absolute), VAE-encoded on load with the family's
  posterior mean (resized to the family's default resolution when it differs).
* ``preferred`` (required): ``"a"`` or ``"b"``, the rater's choice.
* ``label`` (int, optional): the class the prompt names, written only by judges that know classes (the
  embedded world's oracle judges against it).
* ``meta`` (object, optional): provenance, ignored by the loader (make-pairs writes the judge's scores
  ``score_a`` / ``score_b``; the run's summary goes to ``FILE.meta.json``).

Companion latents: ``FILE.safetensors`` beside ``FILE.jsonl`` (same stem), holding one tensor
``latents`` (M, C, h, w) of *clean* latents in the family's latent convention (VAE scaling and shift
applied, what :meth:`Family.encode_images` returns and :meth:`Family.decode_latents` takes).

:func:`load_pairs` returns a :class:`PairSet` with winners / losers (N, C, h, w) already oriented by
``preferred``; every malformed input is one-line :class:`flashdmd.FlashDMDError` naming the line.

:func:`make_pairs` samples two models on the same prompts and lets a judge
(:mod:`flashdmd.evaluation.judges`: PickScore, HPSv2, ImageReward, CLIP from local weights, or a plug-in's own
judge) choose; :func:`judge_and_prompts` picks the judge and prompts of `flashdmd reward make-pairs`.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm

from flashdmd import FlashDMDError, io, plugins
from flashdmd.data import read_prompt_file
from flashdmd.evaluation.judges import JUDGES, Judge, choose, load_judge
from flashdmd.inference import load_model, sample_latent_chunks, teacher_spec

LATENTS_KEY = "latents"
REQUIRED = ("prompt", "a", "b", "preferred")


@dataclass
class PairSet:
    """N preference pairs: ``winners``/``losers`` (N, C, h, w) clean latents, ``prompts`` (N strings),
    ``labels`` (N ints or None)."""

    prompts: list[str]
    winners: Tensor
    losers: Tensor
    labels: list[int | None]

    def __len__(self) -> int:
        return len(self.prompts)

    @staticmethod
    def cat(sets: list["PairSet"]) -> "PairSet":
        """Concatenate pair sets (same latent shape) in order."""
        shapes = {tuple(s.winners.shape[1:]) for s in sets}
        if len(shapes) > 1:
            raise FlashDMDError(f"pairs files hold latents of different shapes {sorted(shapes)}")
        return PairSet([p for s in sets for p in s.prompts], torch.cat([s.winners for s in sets]),
                       torch.cat([s.losers for s in sets]), [y for s in sets for y in s.labels])

    def subset(self, idx) -> "PairSet":
        idx = torch.as_tensor(idx, dtype=torch.long)
        return PairSet([self.prompts[i] for i in idx.tolist()], self.winners[idx], self.losers[idx],
                       [self.labels[i] for i in idx.tolist()])


def companion_path(path: str | Path) -> Path:
    """``FILE.jsonl`` -> ``FILE.safetensors`` (the latents beside a pairs file)."""
    return Path(path).with_suffix(".safetensors")


def write_pairs(path: str | Path, records: list[dict], latents: Tensor | None) -> Path:
    """Write ``records`` (dicts of the schema) as JSONL and ``latents`` (M, C, h, w) to the companion file."""
    path = Path(path)
    if not path.parent.is_dir():
        raise FlashDMDError(f"folder {path.parent} for the pairs file does not exist")
    if latents is not None:
        tensors = {LATENTS_KEY: latents.detach().float().cpu().contiguous()}
        io.atomic_save(companion_path(path), lambda tmp: save_file(tensors, str(tmp)), "the pairs' latents",
                       tensors[LATENTS_KEY].numel() * 4)
    io.atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in records), "the pairs file")
    return path


def read_records(path: str | Path) -> list[dict]:
    """The pairs file's records, validated against the schema (not yet resolved to tensors)."""
    path = Path(path)
    if not path.is_file():
        raise FlashDMDError(f"pairs file {path} does not exist; make one with `flashdmd reward make-pairs`")
    records = []
    with path.open() as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except ValueError as e:
                raise FlashDMDError(f"{path}:{n}: malformed JSON ({e.msg} at column {e.colno})") from None
            _check_record(r, path, n)
            records.append(r)
    if not records:
        raise FlashDMDError(f"pairs file {path} holds no pairs")
    return records


def _check_record(r, path: Path, n: int) -> None:
    where = f"{path}:{n}"
    if not isinstance(r, dict):
        raise FlashDMDError(f"{where}: each line must be a JSON object with keys {', '.join(REQUIRED)}")
    lacking = [k for k in REQUIRED if k not in r]
    if lacking:
        raise FlashDMDError(f"{where}: pair lacks {', '.join(lacking)}")
    if not isinstance(r["prompt"], str):
        raise FlashDMDError(f"{where}: prompt must be a string")
    if r["preferred"] not in ("a", "b"):
        raise FlashDMDError(f"{where}: preferred must be \"a\" or \"b\", got {r['preferred']!r}")
    for k in ("a", "b"):
        v = r[k]
        if isinstance(v, bool) or not isinstance(v, (int, str)) or (isinstance(v, int) and v < 0):
            raise FlashDMDError(f"{where}: {k} must be a latent row (int >= 0) or a PNG path (string), got {v!r}")
    if r.get("label") is not None and (isinstance(r["label"], bool) or not isinstance(r["label"], int)):
        raise FlashDMDError(f"{where}: label must be an int")


def load_pairs(path: str | Path, family=None) -> PairSet:
    """Read a pairs file (+ companion latents; PNG samples need ``family`` for the VAE) into a PairSet."""
    path = Path(path)
    records = read_records(path)
    rows = [r[k] for r in records for k in ("a", "b") if isinstance(r[k], int)]
    latents = _read_latents(path) if rows else None
    if latents is not None and max(rows) >= latents.shape[0]:
        bad = next(n for n, r in enumerate(records, 1) if max(_ints(r), default=-1) >= latents.shape[0])
        raise FlashDMDError(f"{path}: pair {bad} points at latent row {max(rows)} but "
                            f"{companion_path(path).name} has {latents.shape[0]} rows")
    pngs = sorted({r[k] for r in records for k in ("a", "b") if isinstance(r[k], str)})
    encoded = _encode_pngs(pngs, path.parent, family) if pngs else {}

    def sample(v) -> Tensor:
        return latents[v] if isinstance(v, int) else encoded[v]

    a = [sample(r["a"]) for r in records]
    b = [sample(r["b"]) for r in records]
    shapes = {tuple(x.shape) for x in a + b}
    if len(shapes) > 1:
        raise FlashDMDError(f"{path}: samples have different latent shapes {sorted(shapes)}")
    a, b = torch.stack(a).float(), torch.stack(b).float()
    pref_a = torch.tensor([r["preferred"] == "a" for r in records])[:, None, None, None]
    return PairSet([r["prompt"] for r in records], torch.where(pref_a, a, b), torch.where(pref_a, b, a),
                   [r.get("label") for r in records])


def _ints(r: dict) -> list[int]:
    return [r[k] for k in ("a", "b") if isinstance(r[k], int)]


def _read_latents(path: Path) -> Tensor:
    comp = companion_path(path)
    if not comp.is_file():
        raise FlashDMDError(f"{path} refers to latent rows but its companion {comp.name} is missing")
    try:
        state = load_file(str(comp))
    except Exception as e:  # truncated / not a safetensors file
        raise FlashDMDError(f"cannot read {comp}: {e}") from None
    if LATENTS_KEY not in state or state[LATENTS_KEY].ndim != 4:
        raise FlashDMDError(f"{comp} must hold one tensor {LATENTS_KEY!r} of shape (M, C, h, w)")
    return state[LATENTS_KEY]


@torch.no_grad()
def _encode_pngs(names: list[str], root: Path, family) -> dict[str, Tensor]:
    """PNG paths -> clean latents (C, h, w) through the family's VAE (posterior mean)."""
    if family is None:
        raise FlashDMDError("the pairs file names PNG samples; pass the teacher (--family-model) to VAE-encode them")
    res = family.default_resolution
    out = {}
    for name in names:
        p = Path(name) if Path(name).is_absolute() else root / name
        if not p.is_file():
            raise FlashDMDError(f"sample image {p} does not exist")
        try:
            img = Image.open(p).convert("RGB")
        except Exception as e:  # not an image
            raise FlashDMDError(f"cannot read sample image {p}: {e}") from None
        if img.size != (res, res):
            img = img.resize((res, res), Image.BICUBIC)
        x = torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1.0
        out[name] = family.encode_images(x[None].to(family.device))[0].cpu()
    return out


# ---------------------------------------------------------------------------------------------------
# make-pairs: sample two models on the same prompts, let a judge choose


@torch.no_grad()
def sample_model_latents(model, prompts: list[str], seed: int, steps: int | None = None,
                         guidance_scale: float | None = None, batch_size: int = 64, progress=None) -> Tensor:
    """Clean latents (N, C, h, w) of a :class:`flashdmd.inference.Model` -- the same sampling rules and
    per-image noise seeding (seed, i) as :func:`flashdmd.inference.sample_images`."""
    return torch.cat([lat.float().cpu() for lat in
                      sample_latent_chunks(model, prompts, seed, steps, guidance_scale, batch_size, progress)])


def _check_request(num: int, out: str | Path) -> Path:
    if num < 1:
        raise FlashDMDError("--num must be >= 1")
    out = Path(out)
    if not out.parent.is_dir():
        raise FlashDMDError(f"folder {out.parent} for --out does not exist")
    return out


def judge_info(judge) -> dict:
    """What the summary records about a judge: its ``name`` and ``path`` (weights folder, or None)."""
    return {"name": getattr(judge, "name", type(judge).__name__), "path": getattr(judge, "path", None)}


def make_pairs(model_a_spec: str, model_b_spec: str | None, prompts: list[str], judge: Judge, num: int,
               out: str | Path, seed: int = 0, steps_a: int | None = None, steps_b: int | None = None,
               cfg_a: float | None = None, cfg_b: float | None = None, batch_size: int = 64,
               temperature: float = 0.0, device="cpu", prompts_source: str | None = None,
               progress: bool = True) -> dict:
    """Sample ``num`` pairs of two models on the same prompts, let ``judge`` choose; write FILE.jsonl + latents.

    Pair i's prompt is ``prompts[i % len(prompts)]``. Sample a: ``model_a_spec`` (its own steps / CFG unless
    ``steps_a`` / ``cfg_a``) at noise seed ``2*seed``; sample b: ``model_b_spec`` (a distill run folder or any
    model spec; default: ``model_a_spec`` again) at noise seed ``2*seed + 1`` (per-image noise as in
    ``sample_images``). Both are decoded (clamped to [-1, 1]) and scored once by ``judge.score``; the choice is
    :func:`flashdmd.evaluation.judges.choose` of the two scores (``temperature`` > 0: a noisy Bradley-Terry rater
    drawing from a generator seeded ``seed + 2``), i.e. ``judge.prefer``. Records carry ``label`` only when the
    judge has ``label_of``. The summary (also written to FILE.meta.json) names the judge and the prompts.
    """

    out = _check_request(num, out)
    if not prompts:
        raise FlashDMDError("make-pairs needs at least one prompt")
    prompts = [prompts[i % len(prompts)] for i in range(num)]
    if hasattr(judge, "check_prompts"):
        judge.check_prompts(prompts)
    label_of = getattr(judge, "label_of", None)
    labels = [label_of(p) for p in prompts] if label_of is not None else None
    t0 = time.perf_counter()
    model_a = load_model(model_a_spec, device=device)
    model_b = model_a if model_b_spec in (None, model_a_spec) else load_model(model_b_spec, device=device)
    fam = model_a.family
    if model_b.family.name != fam.name or model_b.family.latent_channels != fam.latent_channels \
            or model_b.family.default_resolution != fam.default_resolution:
        raise FlashDMDError(f"{model_b_spec} is not in the latent space of {model_a_spec} (family or latent shape differs)")
    bar = tqdm(total=2 * num, desc="sampling", unit="img", disable=not progress)
    # the two sides use disjoint noise streams: image i of side a (b) uses seed 2*seed (2*seed+1), index i
    lat_a = sample_model_latents(model_a, prompts, 2 * seed, steps_a, cfg_a, batch_size, progress=bar)
    lat_b = sample_model_latents(model_b, prompts, 2 * seed + 1, steps_b, cfg_b, batch_size, progress=bar)
    bar.close()
    bar = tqdm(total=num, desc="judging", unit="pair", disable=not progress)
    pref, score_a, score_b = _judge_pairs(fam, model_b.family, lat_a, lat_b, prompts, judge, temperature,
                                          torch.Generator().manual_seed(seed + 2), batch_size, bar)
    bar.close()
    latents = torch.stack([lat_a, lat_b], dim=1).flatten(0, 1)  # rows 2i (a), 2i+1 (b)
    src_a = {"model": model_a_spec, "kind": model_a.kind, "steps": steps_a, "cfg": cfg_a, "seed": seed * 2}
    src_b = {"model": model_b_spec or model_a_spec, "kind": model_b.kind, "steps": steps_b, "cfg": cfg_b,
             "seed": seed * 2 + 1}
    write_pairs(out, _pair_records(prompts, labels, pref, score_a, score_b), latents)
    summary = {"pairs": num, "out": str(out), "latents": str(companion_path(out)), "a": src_a, "b": src_b,
               "judge": judge_info(judge), "prompts": prompts_source, "a_preferred": sum(pref) / num,
               "temperature": temperature, "mean_score_a": sum(score_a) / num, "mean_score_b": sum(score_b) / num,
               "wall_seconds": time.perf_counter() - t0}
    io.atomic_write_text(out.with_suffix(".meta.json"), json.dumps(summary, indent=2) + "\n")
    return summary


@torch.no_grad()
def _judge_pairs(fam_a, fam_b, lat_a: Tensor, lat_b: Tensor, prompts: list[str], judge: Judge, temperature: float,
                 rater: torch.Generator, batch_size: int, progress=None) -> tuple[list[bool], list[float], list[float]]:
    """(a preferred, score of a, score of b) per pair: both sides decoded (clamped to [-1, 1]) and scored in chunks
    of ``batch_size``, the choice drawn from ``rater`` (see :func:`flashdmd.evaluation.judges.choose`); ``progress``
    (a tqdm bar) counts the pairs judged."""
    pref, score_a, score_b = [], [], []
    for start in range(0, len(prompts), batch_size):
        sl, chunk = slice(start, start + batch_size), prompts[start:start + batch_size]
        pa = fam_a.decode_latents(lat_a[sl].to(fam_a.device)).clamp(-1, 1)
        pb = fam_b.decode_latents(lat_b[sl].to(fam_a.device)).clamp(-1, 1)
        sa, sb = judge.score(pa, chunk), judge.score(pb, chunk)
        score_a += sa.tolist()
        score_b += sb.tolist()
        pref += choose(sa, sb, temperature, generator=rater).tolist()
        if progress is not None:
            progress.update(len(chunk))
    return pref, score_a, score_b


def _pair_records(prompts: list[str], labels: list | None, pref: list[bool], score_a: list[float],
                  score_b: list[float]) -> list[dict]:
    """The pairs file's records: pair i is latents 2i (a) and 2i+1 (b)."""
    records = []
    for i, p in enumerate(prompts):
        r = {"prompt": p, "a": 2 * i, "b": 2 * i + 1, "preferred": "a" if pref[i] else "b"}
        if labels is not None:
            r["label"] = labels[i]
        r["meta"] = {"score_a": round(score_a[i], 5), "score_b": round(score_b[i], 5)}
        records.append(r)
    return records


def add_make_pairs_arguments(p) -> None:
    p.add_argument("--model", required=True,
                   help="sample a: teacher folder, hub id, a plug-in model name (world-sdxl) or a distill run folder")
    p.add_argument("--student", default=None,
                   help="sample b: a distill run folder or model spec (default: --model again, other seed)")
    p.add_argument("--prompts", default=None, metavar="FILE",
                   help="prompts, one per line; pair i uses line i mod the number of lines (default: the prompts "
                        "of the plug-in that owns --model; required for other models)")
    p.add_argument("--judge", default=None, choices=JUDGES,
                   help="judge from local weights (needs --judge-model); default: the judge of the plug-in that "
                        "owns --model (the embedded world's oracle for world-sdxl / world-sd3)")
    p.add_argument("--judge-model", default=None, metavar="PATH",
                   help="local folder of the --judge weights (see docs/EVALUATION.md for what each holds)")
    p.add_argument("--num", type=int, required=True, help="number of pairs")
    p.add_argument("--out", required=True, help="pairs file FILE.jsonl (latents go to FILE.safetensors)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps-a", type=int, default=None, help="sampling steps of a (default: the model's own)")
    p.add_argument("--steps-b", type=int, default=None, help="sampling steps of b (default: the model's own)")
    p.add_argument("--cfg-a", type=float, default=None, help="guidance scale of a (default: the model's own)")
    p.add_argument("--cfg-b", type=float, default=None, help="guidance scale of b (default: the model's own)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0,
                   help="rater noise: 0 = the higher score wins, >0 = Bradley-Terry draws at this temperature")
    p.add_argument("--device", default="cpu", help="torch device for the models and the judge (default cpu)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's own)")


def judge_and_prompts(model: str, judge_name: str | None, judge_model: str | None, prompts_file: str | None,
                      num: int, seed: int, device="cpu") -> tuple[Judge, list[str], str]:
    """The judge, the prompts and where the prompts came from, for sampling ``model`` -- all checked before any
    sampling. Without ``judge_name`` / ``prompts_file`` they come from the plug-in that owns ``model`` (for a
    run folder: its teacher); a model of no plug-in needs both (one-line errors say so)."""
    owner = plugins.model_owner(teacher_spec(model))
    if judge_name is None:
        if judge_model is not None:
            raise FlashDMDError(f"--judge-model needs --judge {'|'.join(JUDGES)} (which scorer its weights are)")
        if owner is None or owner.judge is None:
            raise FlashDMDError(f"make-pairs needs a judge for {model}: --judge {'|'.join(JUDGES)} "
                                "--judge-model PATH (local weights)")
    elif judge_name not in JUDGES:
        raise FlashDMDError(f"unknown judge {judge_name!r}; choose one of {', '.join(JUDGES)}")
    elif judge_model is None:
        raise FlashDMDError(f"--judge {judge_name} needs --judge-model PATH: the local folder of its weights")
    if prompts_file is not None:
        prompts, source = read_prompt_file(prompts_file), str(prompts_file)
    elif owner is not None and owner.pair_prompts is not None:
        prompts, source = list(owner.pair_prompts(num, seed)), f"plug-in {owner.name}"
    else:
        raise FlashDMDError(f"make-pairs needs prompts for {model}: give --prompts FILE (one prompt per line)")
    if judge_name is None:
        judge = owner.judge(device)
    else:
        try:
            judge = load_judge(judge_name, judge_model, device=device)
        except FlashDMDError as e:
            raise FlashDMDError(f"--judge-model: {e}") from None
    return judge, prompts, source


def run_make_pairs(args) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    _check_request(args.num, args.out)
    judge, prompts, source = judge_and_prompts(args.model, args.judge, args.judge_model, args.prompts, args.num,
                                               args.seed, device=args.device)
    summary = make_pairs(args.model, args.student, prompts, judge, args.num, args.out, seed=args.seed,
                         steps_a=args.steps_a, steps_b=args.steps_b, cfg_a=args.cfg_a, cfg_b=args.cfg_b,
                         batch_size=args.batch_size, temperature=args.temperature, device=args.device,
                         prompts_source=source, progress=not args.no_progress)
    print(json.dumps(summary, indent=2))
