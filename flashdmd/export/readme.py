"""README.md of an exported folder: how to load it, call it, and reproduce flashdmd's sampler with it."""
from __future__ import annotations

from flashdmd.export.loraformats import DIFFUSERS_FILE as LORA_WEIGHTS
from flashdmd.export.weights import DTYPES, torch_dtype
from flashdmd.families import FAMILIES


def load_kwargs(record: dict) -> dict:
    """from_pretrained kwargs for the exported folder: SD3 folders without T5 must say so explicitly; a folder
    exported with ``--dtype`` is loaded in that dtype (``torch_dtype``; another one works too, the weights are
    then converted on load)."""
    missing = set(record.get("missing_components", []))
    kwargs = {name: None for name in ("text_encoder_3", "tokenizer_3") if name in missing}
    if record.get("dtype"):
        kwargs["torch_dtype"] = torch_dtype(record["dtype"])
    return kwargs


def readme(record: dict) -> str:
    """The folder's README.md: loading, the call that reproduces the student, the sampler, seeds and weights."""
    fam, k = record["family"], record["num_inference_steps"]
    cls = FAMILIES[fam]
    lcm = cls.export_scheduler == "lcm"
    g = float(record.get("guidance_scale", 1.0))
    call = dict(record["pipeline_kwargs"])
    steps_arg = ", ".join(f"{key}={val!r}" for key, val in call.items())
    lk = ", ".join(f"{key}={'None' if val is None else val}" for key, val in load_kwargs(record).items())
    load = f'DiffusionPipeline.from_pretrained("path/to/this/folder"{", " + lk if lk else ""})'
    name = record.get("lora_weights") or LORA_WEIGHTS
    lora_line = ("" if not record["lora"] else
                 '\npipe.load_lora_weights("path/to/this/folder")  # ' + name if name == LORA_WEIGHTS else
                 f'\npipe.load_lora_weights("path/to/this/folder", weight_name="{name}")')
    gen = "torch.Generator().manual_seed(0)" if lcm else "torch.manual_seed(0)"
    exact = ("exactly" if record["timesteps_exact"]
             else f"to within {record['max_timestep_error']:.3g} timestep units")
    how = ("`num_inference_steps` alone selects them" if "num_inference_steps" in call else
           f"this scheduler config cannot produce them from `num_inference_steps` alone, so pass `{steps_arg}`")
    return f"""# flashdmd student ({fam}, {k} steps)

Exported by `flashdmd export` from the distill run `{record['run']}` (method {record['method']},
{record['generator_steps']} generator steps). Teacher: `{record['teacher']}`.
{"The student is a LoRA on the teacher's denoiser, in `" + name + "`." if record["lora"] else
 "The student replaces the teacher's denoiser" + (" (its LoRA fused into the weights)." if record["lora_fused"] else ".")}

```python
import torch
from diffusers import DiffusionPipeline

pipe = {load}{lora_line}
image = pipe("a photo of ...", {steps_arg}, {cls.pipeline_guidance_kwarg}={g}, generator={gen}).images[0]
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

Seeds: {_seed_note(record, lcm)}

Weights: {_weights_line(record)}

`flashdmd_export.json` records the run, the timesteps, the call arguments and the weights' dtype.
"""


def _seed_note(record: dict, lcm: bool) -> str:
    if lcm:
        return ("`generator=torch.Generator().manual_seed(seed)` reproduces flashdmd's sampler exactly: the SDXL "
                "pipeline passes the generator to `LCMScheduler.step`, so the initial noise and one fresh noise per "
                "step come from that one generator, in that order.")
    return ("Use `generator=torch.manual_seed(seed)` (torch's global generator) to reproduce flashdmd's sampler: "
            f"`{record['pipeline_class']}` does not pass its `generator` to `scheduler.step`, so the per-step noise of "
            "`FlowMatchLCMScheduler` always comes from the global RNG. Passing the global generator makes the initial "
            "noise and the per-step noise one stream, in the order flashdmd draws them (exact on CPU; on CUDA the "
            "per-step draws come from the CUDA default generator instead). With a private "
            "`torch.Generator().manual_seed(seed)` only the initial noise is seeded by it.")


def _guidance_note(record: dict, cls) -> str:
    g = float(record.get("guidance_scale", 1.0))
    if g != cls.pipeline_no_guidance:  # guidance-distilled: guidance is the network's input, the student's value
        return (f"**guidance_scale={g} is required.** This {record['family']} model takes guidance as an input "
                "embedding (no second network call); the student was distilled with this fixed value "
                "(`model_embedded_guidance`) and other values are not what it was trained for.")
    kw = cls.pipeline_guidance_kwarg
    return (f"**{kw}={g} is required.** The student was distilled with the teacher's classifier-free "
            f"guidance built in; the pipeline's own default (`{kw}={cls.pipeline_guidance_default}`) would "
            "run CFG a second time (two network calls per step and over-saturated images).")


def _weights_line(record: dict) -> str:
    held = ", ".join(record.get("weights_dtypes") or []) or "none"
    if record.get("dtype"):
        return (f"every floating-point weight is {DTYPES[record['dtype']]} (`flashdmd export --dtype "
                f"{record['dtype']}`){' -- the LoRA was fused in float32, then cast' if record['lora_fused'] else ''}. "
                "`torch_dtype` above loads the pipeline in that dtype; pass another (e.g. `torch.float32` on a CPU) "
                "to compute in it.")
    return f"in the dtypes the teacher folder and the run hold ({held}; exported without `--dtype`)."


