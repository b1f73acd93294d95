"""The student's weights in an exported folder, and ``--dtype``.

* a full student: the run's saved denoiser folder, copied;
* a LoRA run with ``--lora``: ``pytorch_lora_weights.safetensors`` that ``pipe.load_lora_weights(folder)`` accepts
  (:func:`flashdmd.networks.lora.save_for_pipeline`: the pipeline class's ``save_lora_weights``, with the
  adapter's rank / alpha as metadata), or with ``--lora-format`` kohya / comfyui another key layout
  (:mod:`flashdmd.export.loraformats`);
* a LoRA run without it: the teacher's denoiser with the adapters fused in (W + s*B@A), a plain diffusers model.

``--dtype fp16|bf16|fp32`` (:func:`cast_folder`) casts every floating-point weight of the folder (student, LoRA
file, VAE, text encoders): the safetensors files are rewritten with cast tensors (their names, shards and metadata
kept; a transformers config's ``dtype`` follows), pickled weight files beside safetensors ones are left out, and a
weight that overflows the dtype (|w| > 65504 in fp16) is an error. A fused LoRA student is fused in float32 and cast
afterwards. Without ``--dtype`` every weight keeps the dtype the teacher folder and the run hold (byte-for-byte
copies).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from flashdmd import FlashDMDError, io, runfolder
from flashdmd.export import loraformats
from flashdmd.families import FAMILIES
from flashdmd.families.parts import component_class
from flashdmd.networks import lora

# --dtype: name -> torch dtype name; the safetensors header's names of float dtypes
DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}
SAFETENSORS_FLOAT = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64",
                     "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}
PICKLED_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5", ".bin.index.json")


def torch_dtype(dtype: str | None):
    """``--dtype``'s name -> the torch dtype (None stays None)."""
    return None if dtype is None else getattr(torch, DTYPES[dtype])


# ----------------------------------------------------------------------------------------------------
# the student


def write_lora_weights(family: str, pipeline_class: str, info: dict, run: Path, folder: Path,
                       dtype: str | None = None, fmt: str = "diffusers") -> str:
    """The LoRA file in ``fmt``'s layout (:mod:`flashdmd.export.loraformats`; ``dtype``: its tensors cast to fp16 /
    bf16 / fp32); returns its name."""
    state = runfolder.read_adapters(run)
    if dtype is not None:
        where = run / runfolder.STUDENT / runfolder.ADAPTER_FILE
        state = {k: cast(v, torch_dtype(dtype), f"{where}: {k}") for k, v in state.items()}
    return loraformats.write(family, pipeline_class, state, folder, fmt, int(info["lora_rank"]), info.get("lora_alpha"))


def write_merged_lora_student(teacher: Path, index: dict, info: dict, run: Path, folder: Path,
                              dtype: str | None = None) -> None:
    """The teacher denoiser with the run's LoRA fused in (W + s*B@A), saved as a plain diffusers model.
    ``dtype``: fused in float32, then cast (so that the fp16 / bf16 weight is one rounding of W + s*B@A)."""
    sub = FAMILIES[info["family"]].denoiser_subfolder
    cls = component_class(teacher, index, sub)
    net = cls.from_pretrained(teacher / sub, **({} if dtype is None else {"torch_dtype": torch.float32}))
    lora.merge(runfolder.attach_student_adapters(net, run, info))
    if dtype is not None:
        with torch.no_grad():
            for name, t in list(net.named_parameters()) + list(net.named_buffers()):
                if t.is_floating_point():
                    t.data = cast(t.data, torch_dtype(dtype), f"the fused {sub}: {name}")
    net.save_pretrained(folder, safe_serialization=True)


def copy_full_student(run: Path, folder: Path) -> None:
    """The run's saved full denoiser folder, copied as it is."""
    src = run / runfolder.STUDENT
    if not (src / "config.json").is_file() or not any(f.suffix in (".safetensors", ".bin") or
                                                      f.name.endswith(".index.json") for f in src.iterdir()):
        raise FlashDMDError(f"{src} holds no saved diffusers model (config.json + weights); has the run saved a student?")
    shutil.copytree(src, folder)


# ----------------------------------------------------------------------------------------------------
# dtypes


def cast(t, dtype, what: str):
    """``t`` in ``dtype`` (floating tensors only); a finite value that overflows it is a FlashDMDError."""
    if not t.is_floating_point() or t.dtype == dtype:
        return t
    out = t.to(dtype)
    if not bool(torch.isfinite(out).all()):
        bad = torch.isfinite(t) & ~torch.isfinite(out)
        if bool(bad.any()):
            raise FlashDMDError(f"{what} has values up to {t[bad].abs().max().item():.4g}, beyond {dtype}'s range "
                                f"(max {torch.finfo(dtype).max:.4g}); export with --dtype bf16 or fp32")
    return out.contiguous()


def safetensors_dtypes(path: Path) -> dict[str, str]:
    """tensor name -> safetensors dtype code ("F32", "BF16", "I64", ...) from the file's header alone."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    return {k: v["dtype"] for k, v in header.items() if k != "__metadata__"}


def folder_float_dtypes(folder: Path) -> list[str]:
    """The float dtypes (torch names) that the safetensors files under ``folder`` hold."""
    found = set()
    for path in folder.rglob("*.safetensors"):
        found |= {SAFETENSORS_FLOAT[c] for c in safetensors_dtypes(path).values() if c in SAFETENSORS_FLOAT}
    return sorted(found)


def ignore_pickled(directory: str, names: list[str]) -> list[str]:
    """With --dtype: pickled weight files are left out where safetensors weights sit beside them (diffusers and
    transformers load those first); a folder with pickled weights only cannot be cast and is an error."""
    pickled = [n for n in names if n.endswith(PICKLED_WEIGHTS)]
    if pickled and not any(n.endswith(".safetensors") for n in names):
        raise FlashDMDError(f"{directory} holds weights only in pickled files ({pickled[0]}); --dtype casts "
                            "safetensors weights only: re-save that component with safe_serialization=True, or "
                            "export without --dtype")
    return pickled


def cast_folder(folder: Path, dtype: str) -> list[str]:
    """Rewrite every safetensors file under ``folder`` whose float tensors are not all ``dtype`` with cast
    tensors (same file names, same metadata; a shard index's total_size and a transformers config's dtype are
    updated). Returns the rewritten files, relative to ``folder``."""
    target = torch_dtype(dtype)
    code = {v: k for k, v in SAFETENSORS_FLOAT.items()}[DTYPES[dtype]]
    done = []
    for path in sorted(folder.rglob("*.safetensors")):
        if all(c == code or c not in SAFETENSORS_FLOAT for c in safetensors_dtypes(path).values()):
            continue
        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
        rel = path.relative_to(folder)
        tensors = {k: cast(v, target, f"{rel}: {k}") for k, v in load_file(str(path)).items()}
        io.atomic_save(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta), str(rel))
        done.append(str(rel))
    _update_shard_indexes(folder)
    _update_config_dtypes(folder, dtype)
    return done


def _update_shard_indexes(folder: Path) -> None:
    """Shard indexes: the byte total of the (cast) shards."""
    for path in folder.rglob("*.safetensors.index.json"):
        index = io.read_json(path)
        if isinstance(index.get("metadata"), dict) and "total_size" in index["metadata"]:
            files = {path.parent / f for f in set(index.get("weight_map", {}).values())}
            index["metadata"]["total_size"] = sum(_tensor_bytes(f) for f in files if f.is_file())
            io.atomic_write_text(path, json.dumps(index, indent=2, sort_keys=True) + "\n")


def _update_config_dtypes(folder: Path, dtype: str) -> None:
    """transformers configs record the dtype they were saved in: ``dtype`` from now on."""
    for path in folder.rglob("config.json"):
        if not any(p.suffix == ".safetensors" for p in path.parent.iterdir()):
            continue
        cfg = io.read_json(path, want=None)
        if not isinstance(cfg, dict) or "transformers_version" not in cfg:
            continue
        keys = [k for k in ("dtype", "torch_dtype") if isinstance(cfg.get(k), str)]
        if keys:
            cfg.update({k: DTYPES[dtype] for k in keys})
            io.atomic_write_text(path, json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def _tensor_bytes(path: Path) -> int:
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
    return path.stat().st_size - 8 - n
