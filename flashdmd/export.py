"""`flashdmd export`: a distill run folder -> a standard diffusers pipeline folder.

The exported folder is the teacher's pipeline folder (VAE, text encoders, tokenizers: copied byte for byte)
with

* the student as ``unet/`` (SDXL) or ``transformer/`` (SD3) -- or, with ``--lora``, the teacher's own
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

  Timesteps a scheduler config cannot produce by itself are passed per call instead (SDXL ``timesteps=``,
  SD3 ``sigmas=``); the README and ``flashdmd_export.json`` say which.

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
PIPELINE_CFG_DEFAULT = {"sdxl": 5.0, "sd3": 7.0}   # diffusers' __call__ defaults, which must be overridden
DENOISER = {"sdxl": "unet", "sd3": "transformer"}
# teacher files that do not belong in the exported folder (top level only)
SKIP_TOP = {"scheduler", "flashdmd.json", "README.md", EXPORT_INFO, LORA_WEIGHTS, ".cache", ".huggingface"}


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
    if info["family"] not in DENOISER:
        raise FlashDMDError(f"{info_path}: family {info['family']!r} cannot be exported (known: {sorted(DENOISER)})")
    return info


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


def _flow_pipeline_timesteps(sched, call: dict, k: int) -> list[float]:
    """The timesteps StableDiffusion3Pipeline will run with ``call`` (its mu rule for dynamic shifting)."""
    kwargs = {}
    if sched.config.get("use_dynamic_shifting"):
        # the pipeline's calculate_shift with base_shift == max_shift is that constant at every resolution
        kwargs["mu"] = float(sched.config["base_shift"])
    if "sigmas" in call:
        sched.set_timesteps(sigmas=call["sigmas"], **kwargs)
    else:
        sched.set_timesteps(k, **kwargs)
    return sched.timesteps.tolist()


def flow_lcm_scheduler(teacher_config: dict, timesteps: list[float]):
    """(FlowMatchLCMScheduler, pipeline call kwargs, max |timestep error|) for SD3 student ``timesteps``."""
    from diffusers import FlowMatchLCMScheduler
    n_train = int(teacher_config.get("num_train_timesteps", 1000))
    shift = float(teacher_config.get("shift", 1.0))
    target = [float(t) for t in timesteps]
    k = len(target)
    sigma_min = FlowMatchLCMScheduler(num_train_timesteps=n_train, use_dynamic_shifting=True).sigma_min
    fit = flow_lcm_fit([t / n_train for t in target], sigma_min)
    if fit is not None:
        c, st = fit
        sched = FlowMatchLCMScheduler(num_train_timesteps=n_train, use_dynamic_shifting=True, base_shift=math.log(c),
                                      max_shift=math.log(c), shift_terminal=st)
        err = _timesteps_error(_flow_pipeline_timesteps(sched, {}, k), target)
        if err <= TIMESTEP_TOLERANCE:
            return sched, {"num_inference_steps": k}, err
    # fall back: the teacher's fixed shift and the pipeline's `sigmas=` argument (unshifted student sigmas)
    sched = FlowMatchLCMScheduler(num_train_timesteps=n_train, shift=shift)
    sig = [t / n_train for t in target]
    unshifted = [s / (shift - (shift - 1.0) * s) for s in sig]
    call = {"sigmas": unshifted}
    return sched, call, _timesteps_error(_flow_pipeline_timesteps(sched, call, k), target)


def student_scheduler(family: str, teacher_config: dict, timesteps: list[float]):
    """(scheduler, pipeline call kwargs, max |timestep error|) reproducing the student sampler."""
    if family == "sdxl":
        if teacher_config.get("prediction_type", "epsilon") not in ("epsilon", "v_prediction", "sample"):
            raise FlashDMDError(f"teacher prediction_type {teacher_config.get('prediction_type')!r} is not supported "
                                "by LCMScheduler")
        return lcm_scheduler(teacher_config, timesteps)
    return flow_lcm_scheduler(teacher_config, timesteps)


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


def write_lora_weights(family: str, pipeline_class: str, info: dict, run: Path, folder: Path) -> None:
    """``pytorch_lora_weights.safetensors`` in diffusers' format via the pipeline class's save_lora_weights."""
    import diffusers
    state = _lora_state(run)
    meta = _lora_metadata(info)
    cls = getattr(diffusers, pipeline_class)
    if family == "sdxl":
        from diffusers.utils import convert_state_dict_to_diffusers
        cls.save_lora_weights(str(folder), unet_lora_layers=convert_state_dict_to_diffusers(state),
                              unet_lora_adapter_metadata=meta, weight_name=LORA_WEIGHTS)
    else:
        cls.save_lora_weights(str(folder), transformer_lora_layers=state, transformer_lora_adapter_metadata=meta,
                              weight_name=LORA_WEIGHTS)


def write_merged_lora_student(teacher: Path, index: dict, info: dict, run: Path, folder: Path) -> None:
    """The teacher denoiser with the run's LoRA fused in (W + s*B@A), saved as a plain diffusers model."""
    from peft import LoraConfig
    from peft.utils import set_peft_model_state_dict

    from flashdmd.families.base import component_class
    sub = DENOISER[info["family"]]
    cls = component_class(teacher, index, sub)
    net = cls.from_pretrained(teacher / sub)
    meta = _lora_metadata(info)
    net.add_adapter(LoraConfig(r=meta["r"], lora_alpha=meta["lora_alpha"], target_modules=meta["target_modules"]))
    result = set_peft_model_state_dict(net, _lora_state(run))
    if getattr(result, "unexpected_keys", None):
        raise FlashDMDError(f"{run}/student/adapter.safetensors does not fit the teacher {sub} "
                            f"(e.g. {result.unexpected_keys[0]})")
    net.fuse_lora()
    net.unload_lora()
    net.save_pretrained(folder, safe_serialization=True)


def copy_full_student(run: Path, folder: Path) -> None:
    src = run / "student"
    if not (src / "config.json").is_file() or not any(f.suffix in (".safetensors", ".bin") or
                                                      f.name.endswith(".index.json") for f in src.iterdir()):
        raise FlashDMDError(f"{src} holds no saved diffusers model (config.json + weights); has the run saved a student?")
    shutil.copytree(src, folder)


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


def _ignore_top(root: Path, extra: set[str]):
    skip = SKIP_TOP | extra

    def ignore(directory, names):
        return [n for n in names if n in skip] if Path(directory) == root else []
    return ignore


def export(run_dir: str | Path, out_dir: str | Path, lora: bool = False) -> dict:
    """Write the exported pipeline folder (see the module docstring); return what flashdmd_export.json holds.

    ``lora``: LoRA runs only -- teacher denoiser + LoRA weights file. A LoRA run exported without ``lora``
    gets the LoRA fused into a full denoiser.
    """
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
    sub = DENOISER[family]
    try:
        teacher_sched = json.loads((teacher / "scheduler" / "scheduler_config.json").read_text())
    except (OSError, ValueError) as e:
        raise FlashDMDError(f"{teacher}/scheduler/scheduler_config.json is unreadable ({e})") from None
    timesteps = [float(t) for t in info["student_timesteps"]]
    sched, call, err = student_scheduler(family, teacher_sched, timesteps)

    tmp = _make_tmp(out)
    try:
        shutil.copytree(teacher, tmp, ignore=_ignore_top(teacher, set() if lora else {sub}), dirs_exist_ok=True)
        if lora:
            write_lora_weights(family, index["_class_name"], info, run, tmp)
        elif is_lora:
            write_merged_lora_student(teacher, index, info, run, tmp / sub)
        else:
            copy_full_student(run, tmp / sub)
        sched.save_pretrained(tmp / "scheduler")
        new_index = dict(index)
        new_index["scheduler"] = ["diffusers", type(sched).__name__]
        (tmp / "model_index.json").write_text(json.dumps(new_index, indent=2, sort_keys=True) + "\n")
        record = {"kind": EXPORT_KIND, "run": str(run.resolve()), "family": family, "teacher": str(teacher.resolve()),
                  "pipeline_class": index["_class_name"], "scheduler": type(sched).__name__,
                  "student_timesteps": timesteps, "num_inference_steps": len(timesteps), "pipeline_kwargs": call,
                  "guidance_scale": 1.0, "max_timestep_error": err, "timesteps_exact": err == 0.0,
                  "lora": bool(lora), "lora_fused": bool(is_lora and not lora),
                  "lora_weights": LORA_WEIGHTS if lora else None,
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
    """from_pretrained kwargs the exported folder needs: SD3 folders without T5 must say so explicitly."""
    missing = set(record.get("missing_components", []))
    return {name: None for name in ("text_encoder_3", "tokenizer_3") if name in missing}


def readme(record: dict) -> str:
    fam, k = record["family"], record["num_inference_steps"]
    call = dict(record["pipeline_kwargs"])
    steps_arg = ", ".join(f"{key}={val!r}" for key, val in call.items())
    lk = ", ".join(f"{key}=None" for key in load_kwargs(record))
    load = f'DiffusionPipeline.from_pretrained("path/to/this/folder"{", " + lk if lk else ""})'
    lora_line = '\npipe.load_lora_weights("path/to/this/folder")  # pytorch_lora_weights.safetensors' \
        if record["lora"] else ""
    seed_note = ("`generator=torch.Generator().manual_seed(seed)` reproduces flashdmd's sampler exactly: the SDXL "
                 "pipeline passes the generator to `LCMScheduler.step`, so the initial noise and one fresh noise per "
                 "step come from that one generator, in that order.") if fam == "sdxl" else (
        "Use `generator=torch.manual_seed(seed)` (torch's global generator) to reproduce flashdmd's sampler: "
        "`StableDiffusion3Pipeline` does not pass its `generator` to `scheduler.step`, so the per-step noise of "
        "`FlowMatchLCMScheduler` always comes from the global RNG. Passing the global generator makes the initial "
        "noise and the per-step noise one stream, in the order flashdmd draws them (exact on CPU; on CUDA the "
        "per-step draws come from the CUDA default generator instead). With a private "
        "`torch.Generator().manual_seed(seed)` only the initial noise is seeded by it.")
    gen = "torch.Generator().manual_seed(0)" if fam == "sdxl" else "torch.manual_seed(0)"
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
image = pipe("a photo of ...", {steps_arg}, guidance_scale=1.0, generator={gen}).images[0]
# output_type="latent" returns the student's latents (what flashdmd's sampler returns)
```

**guidance_scale=1.0 is required.** The student was distilled with the teacher's classifier-free guidance
built in; the pipeline's own default (`guidance_scale={PIPELINE_CFG_DEFAULT[fam]}`) would run CFG a second time
(two network calls per step and over-saturated images).

Sampler: `{record['scheduler']}` runs the student's timesteps {record['student_timesteps']} {exact}; {how}.
At each step the network's x0 prediction is re-noised with fresh Gaussian noise to the next timestep,
x' = alpha' x0 + sigma' n, and the last x0 is the result -- flashdmd's few-step student sampler.
{"`timestep_scaling` is 1e6 so that LCM's boundary condition is the identity (c_out = 1, c_skip ~ 0)."
 if fam == "sdxl" else
 "The time shift (`use_dynamic_shifting` with `base_shift == max_shift`, i.e. the same shift at every resolution) "
 "and `shift_terminal` are set so that the default grid lands on the SD3-shifted student steps."}
Other step counts are not what the student was trained for.

Seeds: {seed_note}

`flashdmd_export.json` records the run, the timesteps and the call arguments.
"""


# ---------------------------------------------------------------------------------------------------
# CLI

def add_arguments(p):
    p.add_argument("--run", required=True, help="a `flashdmd distill` run folder (holds run.json and student/)")
    p.add_argument("--out", required=True, help="the pipeline folder to write (must not exist or be empty)")
    p.add_argument("--lora", action="store_true",
                   help="LoRA runs: write the teacher pipeline plus pytorch_lora_weights.safetensors for "
                        "pipe.load_lora_weights (default: a full denoiser; a LoRA run gets its LoRA fused)")


def run(args):
    record = export(args.run, args.out, lora=args.lora)
    how = ", ".join(f"{k}={v}" for k, v in record["pipeline_kwargs"].items())
    exact = "exactly" if record["timesteps_exact"] else f"within {record['max_timestep_error']:.3g}"
    print(f"exported {record['family']} student to {args.out}: {record['scheduler']} runs "
          f"{record['student_timesteps']} {exact} with {how}, guidance_scale=1.0"
          f"{'; LoRA in ' + LORA_WEIGHTS if record['lora'] else ''} (see {args.out}/README.md)")
