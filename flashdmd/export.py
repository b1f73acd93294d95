"""`flashdmd export`: a distill run folder -> a standard diffusers pipeline folder.

The exported folder is the teacher's pipeline folder (VAE, text encoders, tokenizers: copied byte for byte)
with

* the student as ``unet/`` (SDXL) or ``transformer/`` (SD3, FLUX) -- or, with ``--lora``, the teacher's own
  denoiser plus ``pytorch_lora_weights.safetensors`` that ``pipe.load_lora_weights(folder)`` accepts
  (written by the pipeline class's ``save_lora_weights``, with the adapter's rank/alpha as metadata);
* a scheduler whose plain ``num_inference_steps=K`` run is flashdmd's stochastic student sampler
  (:func:`flashdmd.diffusion.samplers.trajectory` with fresh noise): at each student timestep t_k the
  network predicts x0, then x_{k+1} = alpha(t_{k+1}) x0 + sigma(t_{k+1}) n_k with fresh n_k ~ N(0, I); the
  last x0 is returned.

  - SDXL: diffusers' ``LCMScheduler``. Its LCM timestep grid with ``original_inference_steps = n`` and
    ``num_inference_steps = K`` is searched for an ``n`` that gives exactly the run's student timesteps
    (n = K for the default [999, 749, 499, 249]). The consistency boundary condition
    ``denoised = c_out * x0 + c_skip * x_t`` is switched off by a huge ``timestep_scaling`` (1e6): with
    t*1e6 >= 1e6, float32 rounds c_out to exactly 1 and c_skip <= 2.5e-13, so ``denoised`` is x0.
  - SD3: diffusers' ``FlowMatchLCMScheduler`` (x0 = x - sigma u; x' = (1 - sigma') x0 + sigma' n). Its
    default K-step sigmas are ``T(linspace(1, 1/N, K))`` where T is a time shift followed by the optional
    terminal stretch; both are Moebius maps fixing sigma = 1, so the SD3-shifted uniform student sigmas
    (shift_S(1, 1-1/K, ...)) are hit exactly by ``use_dynamic_shifting`` with
    ``base_shift = max_shift = ln c`` (so mu = ln c at every resolution) and ``shift_terminal`` = the last
    student sigma, for the c solved in :func:`flow_lcm_fit`. For [1000, 900, 750, 500]: c = 2.002004...,
    shift_terminal = 0.5 -- the float32 timesteps equal the run's exactly.

  - FLUX: the same FlowMatchLCMScheduler fit, on the grid FluxPipeline hands its scheduler (sigmas linspace(1,
    1/K, K), with mu from base_shift == max_shift); a guidance-distilled (dev) student is called with the embedded
    guidance it was distilled with (run.json's ``embedded_guidance``), others with 1.

  What differs between families is read from the family classes' export attributes (``export_scheduler``,
  ``pipeline_guidance_default``, ``pipeline_sigma_grid``, ``lora_layers_kwarg``, ``exported_guidance``).

  Timesteps a scheduler config cannot produce by itself are passed per call instead (SDXL ``timesteps=``,
  SD3 ``sigmas=``); the README and ``flashdmd_export.json`` say which.

``--dtype fp16|bf16|fp32`` casts every floating-point weight of the folder (student, LoRA file, VAE, text
encoders) to that dtype: the safetensors files are rewritten with cast tensors (their names, shards and metadata
kept; a transformers config's ``dtype`` follows), pickled weight files beside safetensors ones are left out, and a
weight that overflows the dtype (|w| > 65504 in fp16) is an error. A fused LoRA student is fused in float32 and cast
afterwards. Without ``--dtype`` every weight keeps the dtype the teacher folder and the run hold (byte-for-byte
copies). ``flashdmd_export.json`` records the choice and the float dtypes the folder's weights hold.

The folder is written under a temporary name next to ``--out`` and renamed at the end; an existing
non-empty ``--out`` is never overwritten.
"""
from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

from flashdmd import FlashDMDError

EXPORT_KIND = "flashdmd-export"
EXPORT_INFO = "flashdmd_export.json"
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
LCM_TIMESTEP_SCALING = 1e6
TIMESTEP_TOLERANCE = 1e-3   # model-timestep units; a config is only used when it reproduces the steps this well
# teacher files that do not belong in the exported folder (top level only)
SKIP_TOP = {"scheduler", "flashdmd.json", "README.md", EXPORT_INFO, LORA_WEIGHTS, ".cache", ".huggingface"}
# --dtype: name -> torch dtype name; the safetensors header's names of float dtypes
DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}
SAFETENSORS_FLOAT = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64",
                     "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}
PICKLED_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5", ".bin.index.json")


# ----------------------------------------------------------------------------------------------------
# the run


def read_run(run_dir: str | Path) -> dict:
    """run.json of a `flashdmd distill` run folder; one-line FlashDMDError for anything else."""
    from flashdmd.inference import RUN_KIND
    run = Path(run_dir)
    if not run.is_dir():
        raise FlashDMDError(f"run folder {run} does not exist; pass the --out folder of `flashdmd distill`")
    info_path = run / "run.json"
    if not info_path.is_file():
        raise FlashDMDError(f"{run} is not a flashdmd distill run (no run.json); pass the --out folder of "
                            "`flashdmd distill` once it has saved a student")
    try:
        info = json.loads(info_path.read_text())
    except (OSError, ValueError) as e:
        raise FlashDMDError(f"{info_path} is unreadable ({e}); is this a flashdmd distill run folder?") from None
    if not isinstance(info, dict) or info.get("kind") != RUN_KIND:
        raise FlashDMDError(f"{info_path} is not a flashdmd distill run record (kind != {RUN_KIND!r})")
    for key in ("teacher", "family", "student_timesteps"):
        if key not in info:
            raise FlashDMDError(f"{info_path} lacks {key!r}; re-save the run with this flashdmd version")
    from flashdmd.families import FAMILIES
    if info["family"] not in FAMILIES:
        raise FlashDMDError(f"{info_path}: family {info['family']!r} cannot be exported (known: {sorted(FAMILIES)})")
    return info


def family_class(name: str):
    """The family adapter class of a run (its export attributes are class-level: nothing is loaded)."""
    from flashdmd.families import FAMILIES
    return FAMILIES[name]


def teacher_folder(info: dict, run: Path) -> Path:
    """The run's teacher pipeline folder: run.json's ``teacher`` (world name or path), else ``teacher_path``."""
    from flashdmd.families import detect_family, resolve_path
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


# ----------------------------------------------------------------------------------------------------
# schedulers


def _timesteps_error(actual, target) -> float:
    if len(actual) != len(target):
        return math.inf
    return max(abs(float(a) - float(b)) for a, b in zip(actual, target))


def lcm_scheduler(teacher_config: dict, timesteps: list[float]):
    """(LCMScheduler, pipeline call kwargs, max |timestep error|) for SDXL student ``timesteps``."""
    from diffusers import LCMScheduler
    if any(float(t) != int(t) for t in timesteps):
        raise FlashDMDError(f"student timesteps {timesteps} are not integers; diffusers' LCMScheduler (and the SDXL "
                            "UNet pipeline) only run integer timesteps")
    target = [int(t) for t in timesteps]
    n_train = int(teacher_config.get("num_train_timesteps", 1000))
    if target[0] >= n_train or target[-1] < 0:
        raise FlashDMDError(f"student timesteps {target} are outside 0..{n_train - 1}")
    base = {k: teacher_config[k] for k in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule",
                                           "prediction_type", "trained_betas") if k in teacher_config}
    base.update(timestep_scaling=LCM_TIMESTEP_SCALING, clip_sample=False, thresholding=False,
                rescale_betas_zero_snr=False, set_alpha_to_one=True, steps_offset=0)
    k = len(target)
    probe = LCMScheduler(**base)
    for n in range(k, n_train + 1):
        try:
            probe.set_timesteps(k, original_inference_steps=n)
        except ValueError:
            continue
        if probe.timesteps.tolist() == target:
            return LCMScheduler(**base, original_inference_steps=n), {"num_inference_steps": k}, 0.0
    # no LCM grid holds these steps: the pipeline's custom `timesteps=` argument runs them exactly
    sched = LCMScheduler(**base, original_inference_steps=k)
    sched.set_timesteps(timesteps=target)
    return sched, {"timesteps": target}, _timesteps_error(sched.timesteps.tolist(), target)


def flow_lcm_fit(target_sigmas: list[float], sigma_min: float) -> tuple[float, float | None] | None:
    """(c, shift_terminal) such that FlowMatchLCMScheduler(use_dynamic_shifting, mu = ln c, shift_terminal)
    gives ``target_sigmas`` from its default grid u = linspace(1, sigma_min, K); None if no such pair.

    sigma(u) = A(T_c(u)) with T_c(u) = c u / (1 + (c-1) u) and A the terminal stretch (affine, fixes 1,
    A(T_c(sigma_min)) = shift_terminal). Fit c on the second step; the caller verifies every step.
    """
    k = len(target_sigmas)
    if k == 0 or abs(target_sigmas[0] - 1.0) > 1e-9:
        return None
    if k == 1:
        return 1.0, None
    st = float(target_sigmas[-1])
    if not 0.0 < st < 1.0:
        return None
    if k == 2:
        return 1.0, st
    u1 = 1.0 - (1.0 - sigma_min) / (k - 1)
    r0 = (1.0 - u1) / (1.0 - sigma_min)
    q = ((1.0 - target_sigmas[1]) / (1.0 - st)) / r0
    denom = sigma_min - q * u1
    if denom == 0:
        return None
    c = 1.0 + (q - 1.0) / denom
    return (c, st) if c > 0 and math.isfinite(c) else None


def _flow_pipeline_timesteps(sched, call: dict, k: int, grid: str = "scheduler") -> list[float]:
    """The timesteps a flow pipeline will run with ``call``: its mu rule for dynamic shifting, and the sigma grid it
    hands the scheduler (``grid``: "scheduler" -- its own, StableDiffusion3Pipeline -- or "linspace" --
    linspace(1, 1/K, K), FluxPipeline)."""
    import numpy as np
    kwargs = {}
    if sched.config.get("use_dynamic_shifting"):
        # the pipeline's calculate_shift with base_shift == max_shift is that constant at every resolution
        kwargs["mu"] = float(sched.config["base_shift"])
    if "sigmas" in call:
        sched.set_timesteps(sigmas=call["sigmas"], **kwargs)
    elif grid == "linspace":
        sched.set_timesteps(sigmas=np.linspace(1.0, 1 / k, k), **kwargs)
    else:
        sched.set_timesteps(k, **kwargs)
    return sched.timesteps.tolist()


def flow_lcm_scheduler(teacher_config: dict, timesteps: list[float], grid: str = "scheduler"):
    """(FlowMatchLCMScheduler, pipeline call kwargs, max |timestep error|) for flow student ``timesteps`` (SD3,
    FLUX; ``grid`` as in :func:`_flow_pipeline_timesteps`)."""
    from diffusers import FlowMatchLCMScheduler
    n_train = int(teacher_config.get("num_train_timesteps", 1000))
    target = [float(t) for t in timesteps]
    k = len(target)
    sigma_min = FlowMatchLCMScheduler(num_train_timesteps=n_train, use_dynamic_shifting=True).sigma_min \
        if grid == "scheduler" else 1.0 / k
    fit = flow_lcm_fit([t / n_train for t in target], sigma_min)
    if fit is not None:
        c, st = fit
        sched = FlowMatchLCMScheduler(num_train_timesteps=n_train, use_dynamic_shifting=True, base_shift=math.log(c),
                                      max_shift=math.log(c), shift_terminal=st)
        err = _timesteps_error(_flow_pipeline_timesteps(sched, {}, k, grid), target)
        if err <= TIMESTEP_TOLERANCE:
            return sched, {"num_inference_steps": k}, err
    # fall back: the pipeline's `sigmas=` argument -- the unshifted student sigmas under the teacher's fixed shift
    # (SD3); with a resolution-dependent shift (FLUX) the student's own sigmas, unshifted (shift 1)
    shift = float(teacher_config.get("shift", 1.0)) if grid == "scheduler" else 1.0
    sched = FlowMatchLCMScheduler(num_train_timesteps=n_train, shift=shift)
    sig = [t / n_train for t in target]
    unshifted = [s / (shift - (shift - 1.0) * s) for s in sig]
    call = {"sigmas": unshifted}
    return sched, call, _timesteps_error(_flow_pipeline_timesteps(sched, call, k, grid), target)


def student_scheduler(family: str, teacher_config: dict, timesteps: list[float]):
    """(scheduler, pipeline call kwargs, max |timestep error|) reproducing the student sampler."""
    cls = family_class(family)
    if cls.export_scheduler == "lcm":
        if teacher_config.get("prediction_type", "epsilon") not in ("epsilon", "v_prediction", "sample"):
            raise FlashDMDError(f"teacher prediction_type {teacher_config.get('prediction_type')!r} is not supported "
                                "by LCMScheduler")
        return lcm_scheduler(teacher_config, timesteps)
    return flow_lcm_scheduler(teacher_config, timesteps, cls.pipeline_sigma_grid)


# ----------------------------------------------------------------------------------------------------
# weights


def _lora_state(run: Path) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    path = run / "student" / "adapter.safetensors"
    if not path.is_file():
        raise FlashDMDError(f"{path} is missing: the LoRA run has not saved a student yet")
    try:
        return load_file(str(path))
    except (OSError, SafetensorError) as e:
        raise FlashDMDError(f"{path} cannot be read: {e}") from None


def _lora_metadata(info: dict) -> dict:
    from flashdmd.training.roles import LORA_TARGETS
    rank = int(info["lora_rank"])
    return {"r": rank, "lora_alpha": info.get("lora_alpha") or rank, "target_modules": list(LORA_TARGETS)}


def _torch_dtype(dtype: str | None):
    import torch
    return None if dtype is None else getattr(torch, DTYPES[dtype])


def write_lora_weights(family: str, pipeline_class: str, info: dict, run: Path, folder: Path,
                       dtype: str | None = None) -> None:
    """``pytorch_lora_weights.safetensors`` in diffusers' format via the pipeline class's save_lora_weights
    (``dtype``: its tensors cast to fp16 / bf16 / fp32)."""
    import diffusers
    state = _lora_state(run)
    if dtype is not None:
        state = {k: _cast(v, _torch_dtype(dtype), f"{run}/student/adapter.safetensors: {k}") for k, v in state.items()}
    meta = _lora_metadata(info)
    cls = getattr(diffusers, pipeline_class)
    kw = family_class(family).lora_layers_kwarg
    if kw == "unet":
        from diffusers.utils import convert_state_dict_to_diffusers
        state = convert_state_dict_to_diffusers(state)
    cls.save_lora_weights(str(folder), weight_name=LORA_WEIGHTS,
                          **{f"{kw}_lora_layers": state, f"{kw}_lora_adapter_metadata": meta})


def write_merged_lora_student(teacher: Path, index: dict, info: dict, run: Path, folder: Path,
                              dtype: str | None = None) -> None:
    """The teacher denoiser with the run's LoRA fused in (W + s*B@A), saved as a plain diffusers model.
    ``dtype``: fused in float32, then cast (so that the fp16 / bf16 weight is one rounding of W + s*B@A)."""
    import torch
    from peft import LoraConfig
    from peft.utils import set_peft_model_state_dict

    from flashdmd.families.base import component_class
    sub = family_class(info["family"]).denoiser_subfolder
    cls = component_class(teacher, index, sub)
    net = cls.from_pretrained(teacher / sub, **({} if dtype is None else {"torch_dtype": torch.float32}))
    meta = _lora_metadata(info)
    net.add_adapter(LoraConfig(r=meta["r"], lora_alpha=meta["lora_alpha"], target_modules=meta["target_modules"]))
    result = set_peft_model_state_dict(net, _lora_state(run))
    if getattr(result, "unexpected_keys", None):
        raise FlashDMDError(f"{run}/student/adapter.safetensors does not fit the teacher {sub} "
                            f"(e.g. {result.unexpected_keys[0]})")
    net.fuse_lora()
    net.unload_lora()
    if dtype is not None:
        with torch.no_grad():
            for name, t in list(net.named_parameters()) + list(net.named_buffers()):
                if t.is_floating_point():
                    t.data = _cast(t.data, _torch_dtype(dtype), f"the fused {sub}: {name}")
    net.save_pretrained(folder, safe_serialization=True)


def copy_full_student(run: Path, folder: Path) -> None:
    src = run / "student"
    if not (src / "config.json").is_file() or not any(f.suffix in (".safetensors", ".bin") or
                                                      f.name.endswith(".index.json") for f in src.iterdir()):
        raise FlashDMDError(f"{src} holds no saved diffusers model (config.json + weights); has the run saved a student?")
    shutil.copytree(src, folder)


# ----------------------------------------------------------------------------------------------------
# dtypes


def _cast(t, dtype, what: str):
    """``t`` in ``dtype`` (floating tensors only); a finite value that overflows it is a FlashDMDError."""
    import torch
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


def _ignore_pickled(directory: str, names: list[str]) -> list[str]:
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
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    target = _torch_dtype(dtype)
    code = {v: k for k, v in SAFETENSORS_FLOAT.items()}[DTYPES[dtype]]
    done = []
    for path in sorted(folder.rglob("*.safetensors")):
        if all(c == code or c not in SAFETENSORS_FLOAT for c in safetensors_dtypes(path).values()):
            continue
        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
        rel = path.relative_to(folder)
        tensors = {k: _cast(v, target, f"{rel}: {k}") for k, v in load_file(str(path)).items()}
        tmp = path.with_name(path.name + ".cast-tmp")
        save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, path)
        done.append(str(rel))
    for path in folder.rglob("*.safetensors.index.json"):   # shard indexes: the byte total of the cast shards
        index = json.loads(path.read_text())
        if isinstance(index.get("metadata"), dict) and "total_size" in index["metadata"]:
            files = {path.parent / f for f in set(index.get("weight_map", {}).values())}
            index["metadata"]["total_size"] = sum(_tensor_bytes(f) for f in files if f.is_file())
            path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    for path in folder.rglob("config.json"):   # transformers configs record the dtype they were saved in
        if not any(p.suffix == ".safetensors" for p in path.parent.iterdir()):
            continue
        cfg = json.loads(path.read_text())
        if not isinstance(cfg, dict) or "transformers_version" not in cfg:
            continue
        keys = [k for k in ("dtype", "torch_dtype") if isinstance(cfg.get(k), str)]
        if keys:
            cfg.update({k: DTYPES[dtype] for k in keys})
            path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return done


def _tensor_bytes(path: Path) -> int:
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
    return path.stat().st_size - 8 - n


# ----------------------------------------------------------------------------------------------------
# the folder


def _check_out(out: Path, protected: list[Path]) -> None:
    if out.exists() and not out.is_dir():
        raise FlashDMDError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        raise FlashDMDError(f"--out {out} exists and is not empty; refusing to overwrite it (remove it or pick another)")
    resolved = out.resolve()
    for p in protected:
        p = p.resolve()
        if resolved == p or p in resolved.parents:
            raise FlashDMDError(f"--out {out} lies inside {p}; export to a folder outside the teacher and the student")


def _make_tmp(out: Path) -> Path:
    tmp = out.parent / f".{out.name}.export-tmp-{os.getpid()}"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    except OSError as e:
        raise FlashDMDError(f"cannot write to {out.parent} for --out: {e.strerror or e}") from None
    return tmp


def _ignore_top(root: Path, extra: set[str], pickled: bool = False):
    """copytree's ignore: the top-level names that do not belong in the export; ``pickled``: also pickled weight
    files (see :func:`_ignore_pickled`)."""
    skip = SKIP_TOP | extra

    def ignore(directory, names):
        out = [n for n in names if n in skip] if Path(directory) == root else []
        kept = [n for n in names if n not in out]
        return out + (_ignore_pickled(directory, kept) if pickled else [])
    return ignore


def export(run_dir: str | Path, out_dir: str | Path, lora: bool = False, dtype: str | None = None) -> dict:
    """Write the exported pipeline folder (see the module docstring); return what flashdmd_export.json holds.

    ``lora``: LoRA runs only -- teacher denoiser + LoRA weights file. A LoRA run exported without ``lora``
    gets the LoRA fused into a full denoiser. ``dtype``: "fp16", "bf16" or "fp32" casts every floating-point
    weight of the folder; None keeps the dtypes the teacher folder and the run hold.
    """
    if dtype is not None and dtype not in DTYPES:
        raise FlashDMDError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    run, out = Path(run_dir), Path(out_dir)
    info = read_run(run)
    family = info["family"]
    is_lora = int(info.get("lora_rank") or 0) > 0
    if lora and not is_lora:
        raise FlashDMDError(f"run {run} is a full fine-tune (lora_rank 0); --lora needs a LoRA run. Drop --lora "
                            "to export the full student")
    teacher = teacher_folder(info, run)
    _check_out(out, [teacher, run / "student"])
    from flashdmd.families.base import read_model_index
    index = read_model_index(teacher)
    sub = family_class(family).denoiser_subfolder
    try:
        teacher_sched = json.loads((teacher / "scheduler" / "scheduler_config.json").read_text())
    except (OSError, ValueError) as e:
        raise FlashDMDError(f"{teacher}/scheduler/scheduler_config.json is unreadable ({e})") from None
    timesteps = [float(t) for t in info["student_timesteps"]]
    sched, call, err = student_scheduler(family, teacher_sched, timesteps)

    tmp = _make_tmp(out)
    try:
        shutil.copytree(teacher, tmp, ignore=_ignore_top(teacher, set() if lora else {sub}, pickled=dtype is not None),
                        dirs_exist_ok=True)
        if lora:
            write_lora_weights(family, index["_class_name"], info, run, tmp, dtype=dtype)
        elif is_lora:
            write_merged_lora_student(teacher, index, info, run, tmp / sub, dtype=dtype)
        else:
            copy_full_student(run, tmp / sub)
        if dtype is not None:
            cast_folder(tmp, dtype)
        sched.save_pretrained(tmp / "scheduler")
        new_index = dict(index)
        new_index["scheduler"] = ["diffusers", type(sched).__name__]
        (tmp / "model_index.json").write_text(json.dumps(new_index, indent=2, sort_keys=True) + "\n")
        record = {"kind": EXPORT_KIND, "run": str(run.resolve()), "family": family, "teacher": str(teacher.resolve()),
                  "pipeline_class": index["_class_name"], "scheduler": type(sched).__name__,
                  "student_timesteps": timesteps, "num_inference_steps": len(timesteps), "pipeline_kwargs": call,
                  "guidance_scale": family_class(family).exported_guidance(info, teacher), "max_timestep_error": err, "timesteps_exact": err == 0.0,
                  "lora": bool(lora), "lora_fused": bool(is_lora and not lora),
                  "lora_weights": LORA_WEIGHTS if lora else None,
                  "dtype": dtype, "weights_dtypes": folder_float_dtypes(tmp),
                  "generator_steps": info.get("generator_steps"), "method": info.get("method"),
                  "missing_components": sorted(k for k, v in index.items() if isinstance(v, list) and v[0] is None)}
        (tmp / EXPORT_INFO).write_text(json.dumps(record, indent=2) + "\n")
        (tmp / "README.md").write_text(readme(record))
        if out.is_dir():
            out.rmdir()  # empty (checked above); rename needs the name free
        tmp.rename(out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise FlashDMDError(f"export to {out} failed: {e.strerror or e}") from None
        raise
    return record


def load_kwargs(record: dict) -> dict:
    """from_pretrained kwargs for the exported folder: SD3 folders without T5 must say so explicitly; a folder
    exported with ``--dtype`` is loaded in that dtype (``torch_dtype``; another one works too, the weights are
    then converted on load)."""
    missing = set(record.get("missing_components", []))
    kwargs = {name: None for name in ("text_encoder_3", "tokenizer_3") if name in missing}
    if record.get("dtype"):
        kwargs["torch_dtype"] = _torch_dtype(record["dtype"])
    return kwargs


def readme(record: dict) -> str:
    fam, k = record["family"], record["num_inference_steps"]
    cls = family_class(fam)
    lcm = cls.export_scheduler == "lcm"
    g = float(record.get("guidance_scale", 1.0))
    call = dict(record["pipeline_kwargs"])
    steps_arg = ", ".join(f"{key}={val!r}" for key, val in call.items())
    lk = ", ".join(f"{key}={'None' if val is None else val}" for key, val in load_kwargs(record).items())
    load = f'DiffusionPipeline.from_pretrained("path/to/this/folder"{", " + lk if lk else ""})'
    lora_line = '\npipe.load_lora_weights("path/to/this/folder")  # pytorch_lora_weights.safetensors' \
        if record["lora"] else ""
    seed_note = ("`generator=torch.Generator().manual_seed(seed)` reproduces flashdmd's sampler exactly: the SDXL "
                 "pipeline passes the generator to `LCMScheduler.step`, so the initial noise and one fresh noise per "
                 "step come from that one generator, in that order.") if lcm else (
        "Use `generator=torch.manual_seed(seed)` (torch's global generator) to reproduce flashdmd's sampler: "
        f"`{record['pipeline_class']}` does not pass its `generator` to `scheduler.step`, so the per-step noise of "
        "`FlowMatchLCMScheduler` always comes from the global RNG. Passing the global generator makes the initial "
        "noise and the per-step noise one stream, in the order flashdmd draws them (exact on CPU; on CUDA the "
        "per-step draws come from the CUDA default generator instead). With a private "
        "`torch.Generator().manual_seed(seed)` only the initial noise is seeded by it.")
    gen = "torch.Generator().manual_seed(0)" if lcm else "torch.manual_seed(0)"
    exact = ("exactly" if record["timesteps_exact"]
             else f"to within {record['max_timestep_error']:.3g} timestep units")
    how = ("`num_inference_steps` alone selects them" if "num_inference_steps" in call else
           f"this scheduler config cannot produce them from `num_inference_steps` alone, so pass `{steps_arg}`")
    return f"""# flashdmd student ({fam}, {k} steps)

Exported by `flashdmd export` from the distill run `{record['run']}` (method {record['method']},
{record['generator_steps']} generator steps). Teacher: `{record['teacher']}`.
{"The student is a LoRA on the teacher's denoiser, in `" + LORA_WEIGHTS + "`." if record["lora"] else
 "The student replaces the teacher's denoiser" + (" (its LoRA fused into the weights)." if record["lora_fused"] else ".")}

```python
import torch
from diffusers import DiffusionPipeline

pipe = {load}{lora_line}
image = pipe("a photo of ...", {steps_arg}, guidance_scale={g}, generator={gen}).images[0]
# output_type="latent" returns the student's latents (what flashdmd's sampler returns)
```

{_guidance_note(record, cls)}

Sampler: `{record['scheduler']}` runs the student's timesteps {record['student_timesteps']} {exact}; {how}.
At each step the network's x0 prediction is re-noised with fresh Gaussian noise to the next timestep,
x' = alpha' x0 + sigma' n, and the last x0 is the result -- flashdmd's few-step student sampler.
{"`timestep_scaling` is 1e6 so that LCM's boundary condition is the identity (c_out = 1, c_skip ~ 0)."
 if lcm else
 "The time shift (`use_dynamic_shifting` with `base_shift == max_shift`, i.e. the same shift at every resolution) "
 "and `shift_terminal` are set so that the pipeline's default grid lands on the student's shifted steps."}
Other step counts are not what the student was trained for.

Seeds: {seed_note}

Weights: {_weights_line(record)}

`flashdmd_export.json` records the run, the timesteps, the call arguments and the weights' dtype.
"""


def _guidance_note(record: dict, cls) -> str:
    g = float(record.get("guidance_scale", 1.0))
    if g != 1.0:  # a guidance-distilled family: guidance is the network's input, the value the student was given
        return (f"**guidance_scale={g} is required.** This {record['family']} model takes guidance as an input "
                "embedding (no second network call); the student was distilled with this fixed value "
                "(`model_embedded_guidance`) and other values are not what it was trained for.")
    return ("**guidance_scale=1.0 is required.** The student was distilled with the teacher's classifier-free "
            f"guidance built in; the pipeline's own default (`guidance_scale={cls.pipeline_guidance_default}`) would "
            "run CFG a second time (two network calls per step and over-saturated images).")


def _weights_line(record: dict) -> str:
    held = ", ".join(record.get("weights_dtypes") or []) or "none"
    if record.get("dtype"):
        return (f"every floating-point weight is {DTYPES[record['dtype']]} (`flashdmd export --dtype "
                f"{record['dtype']}`){' -- the LoRA was fused in float32, then cast' if record['lora_fused'] else ''}. "
                "`torch_dtype` above loads the pipeline in that dtype; pass another (e.g. `torch.float32` on a CPU) "
                "to compute in it.")
    return f"in the dtypes the teacher folder and the run hold ({held}; exported without `--dtype`)."


# ---------------------------------------------------------------------------------------------------
# CLI

def add_arguments(p):
    p.add_argument("--run", required=True, help="a `flashdmd distill` run folder (holds run.json and student/)")
    p.add_argument("--out", required=True, help="the pipeline folder to write (must not exist or be empty)")
    p.add_argument("--lora", action="store_true",
                   help="LoRA runs: write the teacher pipeline plus pytorch_lora_weights.safetensors for "
                        "pipe.load_lora_weights (default: a full denoiser; a LoRA run gets its LoRA fused)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="cast every floating-point weight written (student, LoRA file, VAE, text encoders) to "
                        "fp16, bf16 or fp32, as safetensors (a LoRA is fused in fp32 first); default: keep the "
                        "dtypes of the teacher folder and the run")


def run(args):
    record = export(args.run, args.out, lora=args.lora, dtype=args.dtype)
    how = ", ".join(f"{k}={v}" for k, v in record["pipeline_kwargs"].items())
    exact = "exactly" if record["timesteps_exact"] else f"within {record['max_timestep_error']:.3g}"
    print(f"exported {record['family']} student to {args.out}: {record['scheduler']} runs "
          f"{record['student_timesteps']} {exact} with {how}, guidance_scale={record['guidance_scale']}"
          f"{'; LoRA in ' + LORA_WEIGHTS if record['lora'] else ''}; weights {'/'.join(record['weights_dtypes'])}"
          f" (see {args.out}/README.md)")
