"""`flashdmd export`: a distill run folder -> a standard diffusers pipeline folder.

The exported folder is the teacher's pipeline folder (VAE, text encoders, tokenizers: copied byte for byte) with

* the student as ``unet/`` (SDXL) or ``transformer/`` (SD3, FLUX) -- or, with ``--lora``, the teacher's own
  denoiser plus ``pytorch_lora_weights.safetensors`` that ``pipe.load_lora_weights(folder)`` accepts
  (:mod:`flashdmd.export.weights`);
* a scheduler whose plain ``num_inference_steps=K`` run is flashdmd's stochastic student sampler: diffusers'
  ``LCMScheduler`` (SDXL) or ``FlowMatchLCMScheduler`` (SD3, FLUX) fitted to the student's timesteps
  (:mod:`flashdmd.export.schedulers`); a guidance-distilled (FLUX.1-dev) student is called with the embedded
  guidance it was distilled with (run.json's ``embedded_guidance``), others with 1.

What differs between families is read from the family classes' export attributes (``export_scheduler``,
``pipeline_guidance_default``, ``pipeline_sigma_grid``, ``lora_layers_kwarg``, ``exported_guidance``).
Timesteps a scheduler config cannot produce by itself are passed per call instead (SDXL ``timesteps=``, SD3
``sigmas=``); the README (:mod:`flashdmd.export.readme`) and ``flashdmd_export.json`` say which.

``--dtype fp16|bf16|fp32`` casts every floating-point weight of the folder (:func:`~flashdmd.export.weights.
cast_folder`); ``flashdmd_export.json`` records the choice and the float dtypes the folder's weights hold.

``--lora-format kohya|comfyui`` writes the LoRA in the key layout A1111 / Forge / ComfyUI load
(:mod:`flashdmd.export.loraformats`). README.md is a huggingface_hub model card (:mod:`flashdmd.export.card`);
``--push-to-hub REPO`` uploads the finished folder. ``--single-file`` writes one file in the family's original layout
instead of a folder (:func:`export_single_file`, :mod:`flashdmd.export.singlefile`).

The folder is written whole (:func:`flashdmd.io.write_folder`: ``OUT.tmp``, fsynced, renamed at the end), a single
file by :func:`flashdmd.io.atomic_save`; an existing non-empty ``--out`` is never overwritten.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from safetensors.torch import save_file

from flashdmd import FlashDMDError, io, runfolder
from flashdmd.export import card, loraformats, singlefile
from flashdmd.export.readme import load_kwargs, readme
from flashdmd.export.schedulers import flow_lcm_fit, flow_lcm_scheduler, lcm_scheduler, student_scheduler
from flashdmd.export.loraformats import DIFFUSERS_FILE as LORA_WEIGHTS
from flashdmd.export.weights import (DTYPES, SAFETENSORS_FLOAT, cast_folder, copy_full_student,
                                         folder_float_dtypes, ignore_pickled, safetensors_dtypes, write_lora_weights,
                                         write_merged_lora_student)
from flashdmd.families import FAMILIES, detect_family, resolve_path
from flashdmd.families.parts import read_model_index

__all__ = ["export", "export_single_file", "load_kwargs", "readme", "lcm_scheduler", "flow_lcm_fit",
           "flow_lcm_scheduler",
           "student_scheduler", "cast_folder", "safetensors_dtypes", "write_merged_lora_student", "SAFETENSORS_FLOAT",
           "DTYPES", "LORA_WEIGHTS", "EXPORT_INFO", "EXPORT_KIND"]

EXPORT_KIND = "flashdmd-export"
EXPORT_INFO = "flashdmd_export.json"
# teacher files that do not belong in the exported folder (top level only)
SKIP_TOP = {"scheduler", "flashdmd.json", "README.md", EXPORT_INFO, *loraformats.FILES.values(), ".cache",
            ".huggingface"}


def teacher_folder(info: dict, run: Path) -> Path:
    """The run's teacher pipeline folder: run.json's ``teacher`` (world name or path), else ``teacher_path``."""
    candidates = [resolve_path(info["teacher"])]
    if info.get("teacher_path"):
        candidates.append(Path(info["teacher_path"]))
    for path in candidates:
        if (path / "model_index.json").is_file():
            found = detect_family(path)
            if found != info["family"]:
                raise FlashDMDError(f"teacher folder {path} holds a {found} pipeline but run {run} is {info['family']}")
            return path
    raise FlashDMDError(f"the teacher of run {run} ({info['teacher']}) is not a local pipeline folder any more; "
                        "restore it at that path (export copies its VAE and text encoders)")


def _check_out(out: Path, protected: list[Path]) -> None:
    if out.exists() and not out.is_dir():
        raise FlashDMDError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        raise FlashDMDError(f"--out {out} exists and is not empty; refusing to overwrite it (remove it or pick another)")
    _check_outside(out, protected)


def _check_outside(out: Path, protected: list[Path]) -> None:
    resolved = out.resolve()
    for p in protected:
        p = p.resolve()
        if resolved == p or p in resolved.parents:
            raise FlashDMDError(f"--out {out} lies inside {p}; export to a folder outside the teacher and the student")


def _ignore_top(root: Path, extra: set[str], pickled: bool = False):
    """copytree's ignore: the top-level names that do not belong in the export; ``pickled``: also pickled weight
    files (see :func:`~flashdmd.export.weights.ignore_pickled`)."""
    skip = SKIP_TOP | extra

    def ignore(directory, names):
        out = [n for n in names if n in skip] if Path(directory) == root else []
        kept = [n for n in names if n not in out]
        return out + (ignore_pickled(directory, kept) if pickled else [])
    return ignore


def export(run_dir: str | Path, out_dir: str | Path, lora: bool = False, dtype: str | None = None,
           lora_format: str | None = None, push_to_hub: str | None = None) -> dict:
    """Write the exported pipeline folder (see the module docstring); return what flashdmd_export.json holds.

    ``lora``: LoRA runs only -- teacher denoiser + LoRA weights file. A LoRA run exported without ``lora``
    gets the LoRA fused into a full denoiser. ``dtype``: "fp16", "bf16" or "fp32" casts every floating-point
    weight of the folder; None keeps the dtypes the teacher folder and the run hold. ``lora_format``: diffusers
    (None), kohya or comfyui -- the LoRA file's key layout (:mod:`flashdmd.export.loraformats`); implies ``lora``.
    ``push_to_hub``: a hub repo id the finished folder is uploaded to (:func:`flashdmd.export.card.push`).
    """
    if push_to_hub:
        card.check_push(push_to_hub)
    if dtype is not None and dtype not in DTYPES:
        raise FlashDMDError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    run, out = Path(run_dir), Path(out_dir)
    info = runfolder.read_record(run)
    lora = lora or lora_format is not None
    fmt = lora_format or "diffusers"
    if lora:
        loraformats.layout(info["family"], fmt)  # a format the family has, before anything is copied
    if lora and not int(info.get("lora_rank") or 0) > 0:
        flag = "--lora-format" if lora_format else "--lora"
        raise FlashDMDError(f"run {run} is a full fine-tune (lora_rank 0); {flag} needs a LoRA run. Drop {flag} "
                            "to export the full student")
    teacher = teacher_folder(info, run)
    _check_out(out, [teacher, run / runfolder.STUDENT])
    index = read_model_index(teacher)
    sched, record = _plan(info, run, teacher, index, lora, fmt, dtype)

    def fill(tmp: Path) -> None:
        _write_pipeline(tmp, teacher, index, info, run, record)
        sched.save_pretrained(tmp / "scheduler")
        new_index = {**index, "scheduler": ["diffusers", type(sched).__name__]}
        (tmp / "model_index.json").write_text(json.dumps(new_index, indent=2, sort_keys=True) + "\n")
        record["weights_dtypes"] = folder_float_dtypes(tmp)
        (tmp / EXPORT_INFO).write_text(json.dumps(record, indent=2) + "\n")
        card.model_card(record, run, teacher, tmp).save(tmp / "README.md")

    io.write_folder(out, fill, "the exported pipeline")
    if push_to_hub:
        record["pushed"] = card.push(out, push_to_hub)
    return record


def export_single_file(run_dir: str | Path, out_file: str | Path, dtype: str | None = None) -> dict:
    """``--single-file``: the student (a LoRA fused) as one safetensors file in its family's original layout
    (:mod:`flashdmd.export.singlefile`), written atomically, with its model card beside it (``OUT`` with ``.md``).
    The pipeline folder is exported first into a temporary folder beside ``out_file``."""
    run, out = Path(run_dir), Path(out_file)
    if out.suffix != ".safetensors":
        raise FlashDMDError(f"--single-file writes one .safetensors file; --out {out} does not end in .safetensors")
    side = out.with_suffix(".md")
    for path in (out, side):
        if path.exists():
            raise FlashDMDError(f"{path} exists; refusing to overwrite it (remove it or pick another --out)")
    info = runfolder.read_record(run)
    family = info["family"]
    if family not in singlefile.FAMILIES_SINGLE_FILE:
        raise FlashDMDError(f"--single-file writes {', '.join(singlefile.FAMILIES_SINGLE_FILE)} students (the "
                            f"layouts A1111 / ComfyUI load); a {family} student is exported as a diffusers folder "
                            "(drop --single-file)")
    _check_outside(out, [teacher_folder(info, run), run / runfolder.STUDENT])
    singlefile.precheck(family, teacher_folder(info, run))
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp:
        folder = Path(tmp) / "pipeline"
        record = export(run, folder, dtype=dtype)
        ckpt = singlefile.checkpoint(family, folder)
        meta = singlefile.metadata(record, io.read_json(folder / "scheduler" / "scheduler_config.json"))
        need = sum(t.numel() * t.element_size() for t in ckpt.values())
        io.atomic_save(out, lambda path: save_file(ckpt, str(path), metadata=meta), str(out), need)
        text = card.single_file_card(record, run, Path(record["teacher"]), out)
        io.atomic_write_text(side, text)
    record.update(single_file=str(out), card=str(side))
    return record


def _plan(info: dict, run: Path, teacher: Path, index: dict, lora: bool, fmt: str, dtype: str | None):
    """(the student's scheduler, what flashdmd_export.json records)."""
    teacher_sched = io.read_json(teacher / "scheduler" / "scheduler_config.json")
    timesteps = [float(t) for t in info["student_timesteps"]]
    sched, call, err = student_scheduler(info["family"], teacher_sched, timesteps)
    record = {"kind": EXPORT_KIND, "run": str(run.resolve()), "family": info["family"],
              "teacher": str(teacher.resolve()), "base_model": card.hub_id(teacher),
              "pipeline_class": index["_class_name"], "scheduler": type(sched).__name__,
              "denoiser_class": index[FAMILIES[info["family"]].denoiser_subfolder][1],
              "student_timesteps": timesteps, "num_inference_steps": len(timesteps), "pipeline_kwargs": call,
              "guidance_scale": FAMILIES[info["family"]].exported_guidance(info, teacher),
              "max_timestep_error": err, "timesteps_exact": err == 0.0, "lora": bool(lora),
              "lora_fused": bool(int(info.get("lora_rank") or 0) > 0 and not lora),
              "lora_weights": loraformats.FILES[fmt] if lora else None, "lora_format": fmt if lora else None,
              "lora_layout": loraformats.layout(info["family"], fmt) if lora else None, "dtype": dtype,
              "generator_steps": info.get("generator_steps"), "method": info.get("method"),
              "missing_components": sorted(k for k, v in index.items() if isinstance(v, list) and v[0] is None)}
    return sched, record


def _write_pipeline(tmp: Path, teacher: Path, index: dict, info: dict, run: Path, record: dict) -> None:
    """The teacher's folder less its scheduler (and, unless --lora, its denoiser), the student, ``--dtype``."""
    sub = FAMILIES[info["family"]].denoiser_subfolder
    dtype = record["dtype"]
    shutil.copytree(teacher, tmp, ignore=_ignore_top(teacher, set() if record["lora"] else {sub},
                                                     pickled=dtype is not None), dirs_exist_ok=True)
    if record["lora"]:
        write_lora_weights(info["family"], index["_class_name"], info, run, tmp, dtype=dtype, fmt=record["lora_format"])
    elif record["lora_fused"]:
        write_merged_lora_student(teacher, index, info, run, tmp / sub, dtype=dtype)
    else:
        copy_full_student(run, tmp / sub)
    if dtype is not None:
        cast_folder(tmp, dtype)


# ---------------------------------------------------------------------------------------------------
# CLI

def add_arguments(p):
    p.add_argument("--run", required=True, help="a `flashdmd distill` run folder (holds run.json and student/)")
    p.add_argument("--out", required=True, help="the pipeline folder to write (must not exist or be empty); with "
                   "--single-file a .safetensors file")
    p.add_argument("--lora", action="store_true",
                   help="LoRA runs: write the teacher pipeline plus pytorch_lora_weights.safetensors for "
                        "pipe.load_lora_weights (default: a full denoiser; a LoRA run gets its LoRA fused)")
    p.add_argument("--lora-format", choices=loraformats.FORMATS, default=None,
                   help="the LoRA file's key layout (implies --lora): diffusers (pytorch_lora_weights.safetensors, "
                        "the default), kohya (SDXL: lora_unet_* with alphas, for A1111 / Forge / ComfyUI; "
                        "lora_kohya.safetensors) or comfyui (the layout ComfyUI loads for the family; "
                        "lora_comfyui.safetensors)")
    p.add_argument("--single-file", action="store_true",
                   help="write --out (a .safetensors file) in the family's original single-file layout, any LoRA "
                        "fused: SDXL / SD3 whole checkpoints (A1111 / Forge / ComfyUI), Z-Image / Qwen-Image / FLUX.2 "
                        "transformers (ComfyUI diffusion models); diffusers' from_single_file reads them; the model "
                        "card goes beside it (OUT with .md)")
    p.add_argument("--push-to-hub", metavar="REPO", default=None,
                   help="upload the finished folder to the hub model repo REPO (owner/name; created if missing) with "
                        "huggingface_hub: needs a token (hf auth login / HF_TOKEN) and HF_HUB_OFFLINE unset")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="cast every floating-point weight written (student, LoRA file, VAE, text encoders) to "
                        "fp16, bf16 or fp32, as safetensors (a LoRA is fused in fp32 first); default: keep the "
                        "dtypes of the teacher folder and the run")


def run(args):
    if args.single_file:
        if args.lora or args.lora_format or args.push_to_hub:
            raise FlashDMDError("--single-file writes one fused checkpoint: drop --lora / --lora-format / "
                                "--push-to-hub (upload the file with `hf upload REPO FILE`)")
        record = export_single_file(args.run, args.out, dtype=args.dtype)
        print(f"exported {record['family']} student to {args.out} (original single-file layout; "
              f"{record['scheduler']} {record['pipeline_kwargs']}, guidance_scale={record['guidance_scale']}; "
              f"see {record['card']})")
        return
    record = export(args.run, args.out, lora=args.lora, dtype=args.dtype, lora_format=args.lora_format,
                    push_to_hub=args.push_to_hub)
    how = ", ".join(f"{k}={v}" for k, v in record["pipeline_kwargs"].items())
    exact = "exactly" if record["timesteps_exact"] else f"within {record['max_timestep_error']:.3g}"
    print(f"exported {record['family']} student to {args.out}: {record['scheduler']} runs "
          f"{record['student_timesteps']} {exact} with {how}, guidance_scale={record['guidance_scale']}"
          f"{'; LoRA in ' + record['lora_weights'] if record['lora'] else ''}; "
          f"weights {'/'.join(record['weights_dtypes'])}"
          f" (see {args.out}/README.md){'; uploaded: ' + record['pushed'] if record.get('pushed') else ''}")
