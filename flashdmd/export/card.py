"""The model card (README.md) of every export: huggingface_hub's ModelCard -- metadata a hub page reads (base model,
library, licence of the base, tags) over the body of :func:`flashdmd.export.readme.readme` (loading, the exact call,
sampler, seeds, weights) plus what a model page shows: the method and its settings (the run's config.yaml), the
run's last held-out metrics (metrics.json), a sample grid (the run's last samples/step_*.png, copied in), and how to
load a LoRA in ComfyUI / A1111.

``--push-to-hub REPO`` (:func:`push`): ``HfApi.create_repo(exist_ok=True)`` + ``upload_folder``; one line when the hub
is switched off (HF_HUB_OFFLINE=1) or no token is set.
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import yaml
from huggingface_hub import HfApi, ModelCard, ModelCardData, constants, get_token

from flashdmd import FlashDMDError, io
from flashdmd.export.readme import readme
from flashdmd.export.singlefile import FAMILIES_SINGLE_FILE
from flashdmd.families import FAMILIES

GRID = "sample_grid.png"
# config.yaml settings the card lists (those the run holds)
SETTINGS = ("method", "student_timesteps", "model_lora_rank", "model_lora_alpha", "dm_guidance_scale",
            "model_embedded_guidance", "student_lr", "fake_score_lr", "fake_score_ttur", "disc_kind", "disc_loss",
            "disc_weight", "disc_lr", "rl_enabled", "rl_steps", "rl_beta", "rl_num_candidates", "data_resolution",
            "run_batch_size", "run_max_steps", "run_seed")
FAMILY_TAGS = {"sdxl": "stable-diffusion-xl", "sd3": "sd3", "flux": "flux", "qwenimage": "qwen-image",
               "zimage": "z-image", "flux2": "flux2", "flux2-klein": "flux2"}
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def hub_id(folder: Path) -> str | None:
    """The base model's hub id when its folder is a hub-cache snapshot (``.../models--owner--name/snapshots/REV``,
    where a hub id given as the teacher resolves to); None for a local folder or a plug-in's model."""
    for part in Path(folder).resolve().parts:
        if part.startswith("models--"):
            return part[len("models--"):].replace("--", "/", 1)
    return None


def base_license(teacher: Path) -> str | None:
    """The base's licence: its model_index.json's ``license`` or its README's YAML front matter."""
    index = io.read_json(teacher / "model_index.json", want=None)
    if isinstance(index, dict) and isinstance(index.get("license"), str):
        return index["license"]
    if (teacher / "README.md").is_file():
        try:
            found = ModelCard.load(teacher / "README.md").data.to_dict().get("license")
        except (ValueError, yaml.YAMLError):  # a README without valid front matter names no licence
            return None
        return found if isinstance(found, str) else None
    return None


def last_grid(run: Path) -> Path | None:
    grids = sorted((run / "samples").glob("step_*.png")) if (run / "samples").is_dir() else []
    return grids[-1] if grids else None


def last_metrics(run: Path) -> tuple[dict, dict]:
    """(the last held-out evaluation's metrics, their directions) from metrics.json; empty when the run has none."""
    path = run / "metrics.json"
    m = io.read_json(path, want=None) if path.is_file() else None
    if not isinstance(m, dict) or not m.get("evals"):
        return {}, {}
    directions = m.get("higher_is_better") or {}
    last = m["evals"][-1]
    return {k: v for k, v in last.items() if k in directions or k == "step"}, directions


def settings(run: Path) -> dict:
    path = run / "config.yaml"
    if not path.is_file():
        return {}
    cfg = yaml.safe_load(path.read_text())
    return {k: cfg[k] for k in SETTINGS if isinstance(cfg, dict) and cfg.get(k) is not None}


def card_data(record: dict, teacher: Path) -> ModelCardData:
    tags = ["text-to-image", "diffusers", "flashdmd", "distillation", "few-step",
            FAMILY_TAGS.get(record["family"], record["family"])]
    if record["lora"]:
        tags.append("lora")
    return ModelCardData(base_model=record.get("base_model"), library_name="diffusers",
                         license=base_license(teacher), pipeline_tag="text-to-image", tags=tags)


def _grid(run: Path, dest: Path) -> str:
    """The run's last sample grid copied to ``dest``, as the card's section ("" when the run has none)."""
    grid = last_grid(run)
    if grid is None:
        return ""
    shutil.copyfile(grid, dest)
    return f"## Samples\n\n![samples]({dest.name})\n\nThe run's last sample grid ({grid.name}).\n"


def model_card(record: dict, run: Path, teacher: Path, folder: Path) -> ModelCard:
    """The exported folder's card; copies the run's last sample grid into ``folder`` when it has one."""
    body = "\n".join([readme(record), _training(record, run), _metrics(run), _grid(run, folder / GRID),
                      _lora_elsewhere(record)])
    return ModelCard(f"---\n{card_data(record, teacher).to_yaml()}\n---\n\n{body}")


def single_file_card(record: dict, run: Path, teacher: Path, file: Path) -> str:
    """The card of a ``--single-file`` export (written beside it): loading it in diffusers with the sampler its
    header records, and in A1111 / Forge / ComfyUI."""
    use = _single_file_use(record, file)
    body = "\n".join([use, _training(record, run), _metrics(run),
                      _grid(run, file.with_name(f"{file.stem}_samples.png"))])
    return str(ModelCard(f"---\n{card_data(record, teacher).to_yaml()}\n---\n\n{body}"))


def _single_file_use(record: dict, file: Path) -> str:
    k, g, fam = record["num_inference_steps"], record["guidance_scale"], record["family"]
    base = record.get("base_model") or "path/to/the/base/pipeline/folder"
    kw = FAMILIES[fam].pipeline_guidance_kwarg
    gen = "torch.Generator().manual_seed(0)" if FAMILIES[fam].export_scheduler == "lcm" else "torch.manual_seed(0)"
    cls, net = record["pipeline_class"], record["denoiser_class"]
    fused = " with its LoRA fused" if record["lora_fused"] else ""
    if FAMILIES_SINGLE_FILE[fam] == "checkpoint":
        what = f"the whole pipeline's weights ({net}{fused}, VAE, text encoders) in the original single-file layout"
        absent = "".join(f", {n}=None" for n in record.get("missing_components", []))
        load = f'pipe = {cls}.from_single_file(path, config="{base}", scheduler=scheduler{absent})'
        imports = cls
        tools = ("In A1111 / Forge (`models/Stable-diffusion`) or ComfyUI (`models/checkpoints`)" if fam == "sdxl"
                 else "In ComfyUI (`models/checkpoints`)")
    else:
        what = (f"the denoiser{fused} in the original layout (a ComfyUI diffusion-model file); the text encoders and "
                "VAE are the base's")
        load = (f'transformer = {net}.from_single_file(path, config="{base}", subfolder="transformer")\n'
                f'pipe = {cls}.from_pretrained("{base}", transformer=transformer, scheduler=scheduler)')
        imports = f"{net}, {cls}"
        tools = ("In ComfyUI (`models/diffusion_models`, the Load Diffusion Model node, with the base's text encoder "
                 "and VAE)")
    return f"""# flashdmd student ({fam}, {k} steps), one file

`{file.name}` holds {what}. Teacher: `{record['teacher']}`.

```python
import json, torch
from diffusers import {record['scheduler']}, {imports}
from safetensors import safe_open

path = "{file.name}"
with safe_open(path, "pt") as f:
    meta = f.metadata()  # the sampler this student was distilled for
scheduler = {record['scheduler']}.from_config(json.loads(meta["flashdmd.scheduler_config"]))
{load}
image = pipe("a photo of ...", {kw}={g}, generator={gen},
             **json.loads(meta["flashdmd.pipeline_kwargs"])).images[0]
```

`config` names the base pipeline (a hub id or its local folder) for the component configs and tokenizers.
{tools}: {k} steps at the timesteps {record['student_timesteps']} with the stochastic LCM-style sampler
(ComfyUI: sampler `lcm`), no extra guidance (the teacher's is distilled in).
"""


def _training(record: dict, run: Path) -> str:
    rows = "".join(f"| `{k}` | `{v}` |\n" for k, v in settings(run).items())
    table = f"\n| setting | value |\n|---|---|\n{rows}" if rows else "\n(the run folder holds no config.yaml)\n"
    return (f"## Training\n\nDistilled with flashdmd (method `{record.get('method')}`, {record.get('generator_steps')} "
            f"generator steps) into a {record['num_inference_steps']}-step student run by `{record['scheduler']}`.\n"
            f"{table}")


def _metrics(run: Path) -> str:
    metrics, directions = last_metrics(run)
    if not metrics:
        return "## Evaluation\n\nThe run recorded no held-out evaluation.\n"
    step = metrics.pop("step", None)
    rows = "".join(f"| {k} | {v:.4g} | {'higher' if directions.get(k) else 'lower'} is better |\n"
                   for k, v in metrics.items() if isinstance(v, (int, float)))
    return (f"## Evaluation\n\nThe run's last held-out evaluation (step {step}, metrics.json):\n\n"
            f"| metric | value | |\n|---|---|---|\n{rows}")


def _lora_elsewhere(record: dict) -> str:
    if not record["lora"]:
        return ""
    name, layout = record["lora_weights"], record.get("lora_layout")
    where = {"kohya": "A1111 / Forge (`models/Lora`, prompt tag `<lora:NAME:1>`) and ComfyUI (`models/loras`, the "
                      "LoraLoaderModelOnly node)",
             "diffusers": "diffusers; ComfyUI's LoRA loader also maps these keys for SD3 and FLUX.1",
             "diffusion_model": "ComfyUI (`models/loras`, the LoraLoaderModelOnly node)",
             "diffusion_model_fused": "ComfyUI (`models/loras`, the LoraLoaderModelOnly node)"}[layout]
    return (f"## The LoRA elsewhere\n\n`{name}` ({record['lora_format']} layout) loads in {where}, on the base model "
            f"above. Sample with its {record['num_inference_steps']} steps at the timesteps listed above, the "
            "stochastic LCM-style sampler (ComfyUI: sampler `lcm`; A1111 / Forge: sampler `LCM`), and CFG 1 (the "
            "teacher's guidance is distilled in). In diffusers:\n\n```python\n"
            f'pipe.load_lora_weights("path/to/this/folder", weight_name="{name}")\n```\n')


def check_push(repo: str) -> None:
    """Before exporting: ``repo`` is a repo id, the hub is reachable by configuration, a token is set."""
    if not HUB_ID.fullmatch(repo):
        raise FlashDMDError(f"--push-to-hub {repo!r} is not a hub repo id (owner/name)")
    offline = constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}
    if offline:
        raise FlashDMDError("--push-to-hub needs the network and HF_HUB_OFFLINE=1 switches it off: unset it, or "
                            f"export without --push-to-hub and upload the folder later (hf upload {repo} FOLDER)")
    if not get_token():
        raise FlashDMDError("--push-to-hub needs a Hugging Face token with write access: run `hf auth login` or set "
                            "HF_TOKEN")


def push(folder: Path, repo: str) -> str:
    """Upload ``folder`` to the model repo ``repo`` (created if missing); returns the commit URL."""
    check_push(repo)
    api = HfApi()
    api.create_repo(repo, repo_type="model", exist_ok=True)
    info = api.upload_folder(folder_path=str(folder), repo_id=repo, repo_type="model",
                             commit_message="flashdmd export")
    return str(getattr(info, "commit_url", info))
