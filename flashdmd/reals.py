"""`flashdmd make-reals`: a teacher's own images as the real-image folder of the Pixel-GAN (``data_real``).

    flashdmd make-reals --model TEACHER --prompts prompts.txt --num 10000 --out reals/
    flashdmd distill --config ... --set data_real=reals/

Image i (0 <= i < N) is prompt ``i mod P`` of the prompt file, drawn by the teacher's own sampler at its default
steps and guidance (what :func:`flashdmd.inference.load_model` gives a teacher: its scheduler's 50 steps and its
recommended guidance; ``--steps`` / ``--cfg`` override them) from its own generator seeded
:func:`image_seed` ``(seed, i) = seed * MAX_NUM + i`` -- diffusers' draw order (:func:`flashdmd.sample.sample_latents`),
so ``OUT/{i:08d}.png`` is also what a one-prompt diffusers pipeline call with that seed draws. ``metadata.jsonl``
holds ``{"file_name", "text", "seed"}`` per image: the captions of an image folder (HF ``imagefolder``,
:class:`flashdmd.data.ImageFolderSource`), so OUT is a ``data_real`` as it stands.

Resumable: each PNG is written atomically (a file under its final name is complete), so a call into a folder that
holds some of the images draws only the missing ones (and one into a finished folder does not load the teacher). The images of one process are drawn in fixed batches (its
indices in order, ``--batch-size`` at a time) and a batch with any image missing is drawn whole: an interrupted call
run again with the same settings gives the same bytes as one that never stopped. (Another ``--batch-size`` or number
of processes gives the same images up to floating-point round-off of other batch shapes.) ``make-reals.json``
records the settings; a call with other settings (model, prompts, seed, steps, guidance, dtype) into the same folder
is refused, and so is a folder that holds other files.

Sharded: under ``accelerate launch`` (or torchrun) process r of W draws the images with ``i mod W == r`` on its own
device; the main process writes ``make-reals.json`` before and ``metadata.jsonl`` after every process has finished
(atomically, all N lines: a folder without it is not finished).
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import PartialState
from tqdm.auto import tqdm

from flashdmd import FlashDMDError, io, runfolder
from flashdmd.data import read_prompt_file
from flashdmd.families import resolve_path
from flashdmd.inference import DTYPES, load_model
from flashdmd.sample import (DEFAULT_BATCH, METADATA, check_not_export, plan, prepare_out, sample_latents, save_png,
                             write_metadata)

MAX_NUM = 10 ** 8       # file names have 8 digits; image seeds are seed * MAX_NUM + i
MANIFEST = "make-reals.json"
KIND = "flashdmd-make-reals"
NAME = re.compile(r"^(\d{8})\.png$")


def image_name(i: int) -> str:
    return f"{i:08d}.png"


def image_seed(seed: int, i: int) -> int:
    """The generator seed of image i: a pure function of (seed, i), disjoint between seeds."""
    return seed * MAX_NUM + i


@dataclass(frozen=True)
class Request:
    """What a make-reals call draws: every field but ``num`` and ``batch_size`` must match a folder's record."""
    model: str
    prompts: tuple[str, ...]
    num: int
    seed: int = 0
    steps: int | None = None
    cfg: float | None = None
    dtype: str = "fp32"
    batch_size: int = DEFAULT_BATCH

    def prompt(self, i: int) -> str:
        return self.prompts[i % len(self.prompts)]

    def settings(self) -> dict:
        """The record of ``make-reals.json`` that a resume must match."""
        digest = hashlib.sha256("\n".join(self.prompts).encode("utf-8")).hexdigest()
        return {"kind": KIND, "model": str(resolve_path(self.model)), "prompts_sha256": digest,
                "num_prompts": len(self.prompts), "seed": self.seed, "steps": self.steps, "cfg": self.cfg,
                "dtype": self.dtype}


def check_request(req: Request) -> None:
    """Every check that needs no model: the numbers, then the teacher spec (not a student)."""
    if not 1 <= req.num < MAX_NUM:
        raise FlashDMDError(f"--num must be between 1 and {MAX_NUM - 1}, got {req.num}")
    if req.batch_size < 1:
        raise FlashDMDError(f"--batch-size must be >= 1, got {req.batch_size}")
    if req.seed < 0 or image_seed(req.seed, MAX_NUM) >= 2 ** 63:
        raise FlashDMDError(f"--seed must be between 0 and {2 ** 63 // MAX_NUM - 2}, got {req.seed}")
    if req.steps is not None and req.steps < 1:
        raise FlashDMDError(f"--steps must be >= 1, got {req.steps}")
    if req.dtype not in DTYPES:
        raise FlashDMDError(f"--dtype must be one of {', '.join(DTYPES)}, got {req.dtype!r}")
    path = resolve_path(req.model)
    if not path.exists():
        raise FlashDMDError(f"teacher {req.model} not found: give a diffusers pipeline folder, a hub id in the local "
                            "cache (or HF_HUB_OFFLINE=0) or a plug-in model name")
    if runfolder.is_run(path):
        raise FlashDMDError(f"{req.model} is a distill run (a student); make-reals draws from a teacher: give "
                            f"--model {runfolder.read_record(path)['teacher']}")
    check_not_export(req.model)


def is_leftover(f: Path) -> bool:
    """An interrupted atomic write of one of make-reals' files (``NAME.tmp``)."""
    return f.name.endswith(".tmp") and (f.name[:-4] in (MANIFEST, METADATA) or bool(NAME.match(f.name[:-4])))


def check_folder(out: Path, req: Request) -> dict | None:
    """The folder's earlier record (None for a new folder) once it is known to hold nothing but this request's
    files: images of index < num, leftovers of interrupted atomic writes (``*.tmp``), the record (same settings),
    the metadata, and hidden files (an image folder skips them)."""
    prepare_out(out)
    for f in sorted(out.iterdir()):
        m = NAME.match(f.name) if f.is_file() else None
        ours = f.name in (MANIFEST, METADATA) or is_leftover(f) or (m is not None and int(m.group(1)) < req.num)
        if ours or f.name.startswith("."):  # hidden: image folders skip them (prepare_out's probe of another process)
            continue
        why = f"an image of index >= --num {req.num}" if m else "not written by make-reals"
        raise FlashDMDError(f"--out {out} holds {f.name} ({why}): give an empty or new folder, or the folder of an "
                            "earlier make-reals call with its settings")
    if not (out / MANIFEST).is_file():
        if any(NAME.match(f.name) for f in out.iterdir()):
            raise FlashDMDError(f"--out {out} holds images but no {MANIFEST}: give an empty or new folder")
        return None
    record = io.read_json(out / MANIFEST)
    want = req.settings()
    differ = [k for k in want if record.get(k) != want[k]]
    if differ:
        k = differ[0]
        raise FlashDMDError(f"--out {out} holds make-reals of other settings ({k}: {record.get(k)!r} there, "
                            f"{want[k]!r} now): give a new folder or the same settings")
    return record


def shard(num: int, rank: int, world: int, batch_size: int) -> list[list[int]]:
    """Process ``rank`` of ``world``'s images (``i mod world == rank``) in its fixed batches."""
    mine = list(range(rank, num, world))
    return [mine[k:k + batch_size] for k in range(0, len(mine), batch_size)]


def draw_shard(model, req: Request, out: Path, rank: int = 0, world: int = 1, progress: bool = True) -> int:
    """Draw and write this process's missing images; returns how many it wrote. A batch with any image missing is
    drawn whole (its other images are not rewritten), so the bytes do not depend on where an earlier call stopped."""
    batches = shard(req.num, rank, world, req.batch_size)
    missing = [[i for i in b if not (out / image_name(i)).is_file()] for b in batches]
    total = sum(len(b) for b in batches)
    bar = tqdm(total=total, initial=total - sum(len(m) for m in missing), desc="make-reals", unit="img",
               disable=not progress, dynamic_ncols=True)
    written = 0
    try:
        for batch, todo in zip(batches, missing):
            if not todo:
                continue
            gens = [torch.Generator().manual_seed(image_seed(req.seed, i)) for i in batch]
            lat = sample_latents(model, [req.prompt(i) for i in batch], gens, req.steps, req.cfg)
            pixels = model.family.decode_latents(lat).clamp(-1, 1).cpu()
            for i, px in zip(batch, pixels):
                if i in todo:
                    save_png(px, out / image_name(i))
                    written += 1
                    bar.update(1)
    finally:
        bar.close()
    return written


def finish(out: Path, req: Request) -> None:
    """``metadata.jsonl`` with all N images, once every one is there (else one line saying how many are missing)."""
    absent = [i for i in range(req.num) if not (out / image_name(i)).is_file()]
    if absent:
        raise FlashDMDError(f"{len(absent)} of the {req.num} images are missing in {out} (e.g. "
                            f"{image_name(absent[0])}): run the same make-reals command again to finish them")
    write_metadata(out, [{"file_name": image_name(i), "text": req.prompt(i), "seed": image_seed(req.seed, i)}
                         for i in range(req.num)])


def make_reals(req: Request, out: str | Path, progress: bool = True, state: PartialState | None = None) -> dict:
    """Draw ``req`` into ``out`` on this process's shard (``state``: accelerate's process state, default the
    launch's own); every check runs before the teacher loads. Returns the summary the main process prints."""
    out = Path(out)
    state = state or launch_state()
    check_request(req)
    record = check_folder(out, req)
    model = None
    if record is not None and all((out / image_name(i)).is_file() for i in range(req.num)):
        summary = {**record, "num": req.num}  # every image is there: the teacher is not loaded
    else:
        model = load_model(req.model, device=state.device, dtype=DTYPES[req.dtype])
        guidance = req.cfg if req.cfg is not None else model.guidance_scale
        summary = {**req.settings(), "num": req.num, "sampler_steps": len(plan(model, req.steps)[0]),
                   "guidance_scale": guidance, "resolution": model.image_size}
    if state.is_main_process:
        for leftover in filter(is_leftover, out.glob("*.tmp")):  # an interrupted write: no process writes yet
            leftover.unlink()
        io.atomic_write_text(out / MANIFEST, json.dumps(summary, indent=2) + "\n")  # the same settings, this num
    state.wait_for_everyone()
    written = 0 if model is None else draw_shard(model, req, out, state.process_index, state.num_processes,
                                                 progress and state.is_main_process)
    state.wait_for_everyone()
    if state.is_main_process:
        finish(out, req)
    return {**summary, "written_by_this_process": written, "out": str(out)}


def launch_state() -> PartialState:
    """This process's place in an `accelerate launch` / torchrun launch (one process without one); CPU processes
    join over gloo, as training's do."""
    return PartialState(cpu=not torch.cuda.is_available())


# ---------------------------------------------------------------------------------------------------
# CLI

def add_arguments(p) -> None:
    p.add_argument("--model", required=True, help="the teacher: a diffusers pipeline folder, a hub id or a plug-in "
                   "model name (world-sdxl / world-sd3)")
    p.add_argument("--prompts", required=True, metavar="FILE",
                   help="UTF-8 text file, one prompt per line; image i uses line i mod the number of lines")
    p.add_argument("--num", "--num-images", dest="num", type=int, required=True,
                   help="number of images (--num-images: the same, for torchrun, whose own options take --num)")
    p.add_argument("--out", required=True, help="folder for the PNGs, metadata.jsonl and make-reals.json (created; "
                   "an unfinished one is continued)")
    p.add_argument("--seed", type=int, default=0, help=f"image i uses the generator seed SEED*{MAX_NUM}+i (default 0)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the teacher's own)")
    p.add_argument("--cfg", type=float, default=None, help="guidance scale (default: the teacher's own)")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH, help="images per network batch (default "
                   f"{DEFAULT_BATCH})")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="fp32",
                   help="dtype of the teacher's networks (bf16 / fp16 on a GPU: faster; default fp32)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args) -> dict:
    req = Request(args.model, tuple(read_prompt_file(args.prompts)), args.num, args.seed, args.steps, args.cfg,
                  args.dtype, args.batch_size)
    state = launch_state()
    summary = make_reals(req, args.out, progress=not args.no_progress, state=state)
    if state.is_main_process:
        print(f"{req.num} images and {METADATA} in {args.out} ({summary['sampler_steps']} steps, guidance "
              f"{summary['guidance_scale']}, {state.num_processes} process(es)); use it with "
              f"`flashdmd distill --set data_real={args.out}`")
    return summary
