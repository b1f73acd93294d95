"""The run record of a `flashdmd distill` folder: one writer (training), one reader (inference, sample, eval, export).

    DIR/run.json        what `eval` / `sample` / `export` need: kind, teacher (spec + folder), family, the student's
                        timesteps, resolution, embedded guidance, LoRA rank / alpha, counters, method
    DIR/student/        the student: a diffusers model folder of the denoiser, or (LoRA) adapter.safetensors

Both are written whole (:mod:`flashdmd.io`): the student folder first, then run.json, so a run.json always names a
complete student. This layer sits below inference/ and above networks/ (its LoRA file is networks.lora's).
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

from torch import nn

from flashdmd import FlashDMDError, io
from flashdmd.families import FAMILIES
from flashdmd.networks import lora

RUN_KIND = "flashdmd-distill-run"
RECORD = "run.json"
STUDENT = "student"
ADAPTER_FILE = "adapter.safetensors"
REQUIRED = ("teacher", "family", "student_timesteps")


def is_run(path: str | Path) -> bool:
    """Whether ``path`` is a run folder (holds a run record)."""
    return (Path(path) / RECORD).is_file()


def write_student(out: str | Path, net: nn.Module, lora_rank: int) -> None:
    """DIR/student written whole (the previous one stays until the new one is complete): the LoRA adapters, or
    the full denoiser by ``save_pretrained``."""
    folder = Path(out) / STUDENT
    if lora_rank > 0:
        adapters = lora.adapter_state(net)
        need = sum(v.numel() * v.element_size() for v in adapters.values())
        io.write_folder(folder, lambda tmp: lora.save(net, tmp / ADAPTER_FILE), "the student", need)
    else:
        need = sum(v.numel() * v.element_size() for v in net.state_dict().values())
        io.write_folder(folder, lambda tmp: net.save_pretrained(tmp, safe_serialization=True), "the student", need)


def write_record(out: str | Path, **fields) -> dict:
    """DIR/run.json (atomically): ``fields`` (teacher, family, teacher_path, student_timesteps, resolution,
    embedded_guidance, lora_rank, lora_alpha, generator_steps, rl_steps, method) under this record's kind."""
    missing = [k for k in REQUIRED if k not in fields]
    if missing:
        raise ValueError(f"a run record needs {missing}")
    info = {"kind": RUN_KIND, **fields}
    io.atomic_write_text(Path(out) / RECORD, json.dumps(info, indent=2))
    return info


def read_record(run_dir: str | Path) -> dict:
    """DIR/run.json of a `flashdmd distill` run folder, checked; one FlashDMDError line for anything else."""
    run = Path(run_dir)
    if not run.is_dir():
        raise FlashDMDError(f"run folder {run} does not exist; pass the --out folder of `flashdmd distill`")
    path = run / RECORD
    if not path.is_file():
        raise FlashDMDError(f"{run} is not a flashdmd distill run (no {RECORD}); pass the --out folder of "
                            "`flashdmd distill` once it has saved a student")
    info = io.read_json(path, hint="is this a flashdmd distill run folder?", want=None)
    if not isinstance(info, dict) or info.get("kind") != RUN_KIND:
        raise FlashDMDError(f"{path} is not a flashdmd distill run record (kind != {RUN_KIND!r})")
    for key in REQUIRED:
        if key not in info:
            raise FlashDMDError(f"{path} lacks {key!r}; re-save the run with this flashdmd version")
    if info["family"] not in FAMILIES:
        raise FlashDMDError(f"{path}: unknown model family {info['family']!r} (known: {sorted(FAMILIES)})")
    return info


def read_adapters(run_dir: str | Path) -> dict:
    """The LoRA student's adapter tensors (peft's names); one line when the file is missing or unreadable."""
    return lora.read(Path(run_dir) / STUDENT / ADAPTER_FILE)


def attach_student_adapters(net: nn.Module, run_dir: str | Path, info: dict) -> nn.Module:
    """``net`` (the teacher's denoiser, or a copy) with the LoRA run's student adapters attached and loaded."""
    return lora.load(net, info["lora_rank"], info.get("lora_alpha"), Path(run_dir) / STUDENT / ADAPTER_FILE)


def load_student_net(family, run_dir: str | Path, info: dict) -> nn.Module:
    """The student denoiser of a run folder, in eval mode: a copy of ``family``'s teacher with the run's adapters
    (LoRA: in the base's dtype), or the saved full model in ``family.frozen_dtype``."""
    folder = Path(run_dir) / STUDENT
    if not folder.is_dir():
        raise FlashDMDError(f"{folder} is missing: the run has not saved a student yet")
    if info.get("lora_rank", 0) > 0:
        return attach_student_adapters(copy.deepcopy(family.denoiser), run_dir, info).eval()
    cls = type(family.denoiser)
    try:
        return cls.from_pretrained(folder, use_safetensors=True, torch_dtype=family.frozen_dtype).to(family.device).eval()
    except (OSError, ValueError) as e:
        raise FlashDMDError(f"student weights in {folder} cannot be loaded: {str(e).splitlines()[0]}") from None
