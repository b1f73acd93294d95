"""Hub ids as teacher folders: ``owner/name`` -> the repo's snapshot folder in the local huggingface_hub cache.

:func:`hub_snapshot` is called by :func:`flashdmd.families.resolve_path` for a spec that is not an existing path.
With ``HF_HUB_OFFLINE`` unset (or 0) it downloads what a family adapter loads (files already cached are not fetched
again); with ``HF_HUB_OFFLINE=1`` it only looks the repo up in the cache (``HF_HUB_CACHE``, default
``~/.cache/huggingface/hub``), so a snapshot fetched once loads offline from then on.

What is fetched: ``model_index.json`` first, then for each component it names (``unet``, ``vae``,
``text_encoder``, ``tokenizer``, ``scheduler``, ...) that folder's JSON files (configs, tokenizer files, shard
indexes), tokenizer vocabularies (``*.txt``, ``*.model``) and the weights under their standard names
(``model.safetensors`` / ``diffusion_pytorch_model.safetensors``, or their ``-0000i-of-0000n`` shards). Variant
copies (``*.fp16.safetensors``), ONNX / Flax / OpenVINO exports, folders model_index.json does not name and
single-file checkpoints at the repo root (SDXL-base's 6.9 GB ``sd_xl_base_1.0.safetensors``) are skipped. A
network folder without safetensors weights gets its PyTorch ``.bin`` weights instead (older repos).

Why huggingface_hub's ``snapshot_download`` with our own patterns rather than diffusers'
``DiffusionPipeline.download``: the latter applies the same skipping rules, but (diffusers 0.42) it also fetches
weight folders model_index.json does not name (SDXL-base's ``vae_1_0``, 335 MB), switches *every* folder to
``.bin`` as soon as one folder lacks safetensors, and reports a missing repo as a generic ``EnvironmentError``
chained to the hub's error; calling the hub client directly keeps its typed errors (repo not found, gated, not
cached, incomplete snapshot), which become one-line :class:`flashdmd.FlashDMDError` messages here.
"""
from __future__ import annotations

import os
from pathlib import Path

from huggingface_hub import constants, hf_hub_download, snapshot_download
from huggingface_hub.errors import (EntryNotFoundError, GatedRepoError, HfHubHTTPError, HFValidationError,
                                    IncompleteSnapshotError, LocalEntryNotFoundError, RepositoryNotFoundError)
from huggingface_hub.utils import validate_repo_id

from flashdmd import FlashDMDError, io

MODEL_INDEX = "model_index.json"
# per component folder: configs, tokenizer files and shard indexes; CLIP merges / vocab texts; T5 sentencepiece
COMPONENT_FILES = ("*.json", "*.txt", "*.model")
SAFETENSORS_WEIGHTS = ("model.safetensors", "model-*-of-*.safetensors",
                       "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model-*-of-*.safetensors")
PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model-*-of-*.bin", "diffusion_pytorch_model.bin",
                  "diffusion_pytorch_model-*-of-*.bin")
# shards of a variant in diffusers' legacy naming (model-00001-of-00002.fp16.safetensors) match the shard globs above
IGNORE = ["*-of-*.*.safetensors", "*-of-*.*.bin"]
_TRUE = {"1", "ON", "YES", "TRUE"}


def is_hub_id(spec: str) -> bool:
    """``owner/name`` that huggingface_hub accepts as a repo id (a bare ``name`` is not taken for one)."""
    if spec.count("/") != 1:
        return False
    try:
        validate_repo_id(spec)
    except HFValidationError:
        return False
    return True


def hub_offline() -> bool:
    """HF_HUB_OFFLINE as set now, or as huggingface_hub read it at import (it refuses the network then)."""
    return constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in _TRUE


def download_patterns(components: list[str], pickled: bool = False) -> list[str]:
    """allow_patterns for the named component folders: their small files and their standard-name weights
    (``pickled``: the ``.bin`` weights instead of the safetensors ones)."""
    weights = PICKLE_WEIGHTS if pickled else SAFETENSORS_WEIGHTS
    small = () if pickled else COMPONENT_FILES
    return ([] if pickled else [MODEL_INDEX]) + [f"{c}/{p}" for c in components for p in small + weights]


def hub_snapshot(spec: str | Path) -> Path | None:
    """The local snapshot folder of hub repo ``spec`` (downloaded unless HF_HUB_OFFLINE is set), or None when
    ``spec`` is an existing path or does not look like ``owner/name``. FlashDMDError (one line) when the repo is
    not found, gated, not cached while offline, or cached incompletely."""
    spec = str(spec)
    if Path(spec).expanduser().exists() or not is_hub_id(spec):
        return None
    offline = hub_offline()
    try:
        components = _components(spec, Path(hf_hub_download(spec, MODEL_INDEX, local_files_only=offline)))
        folder = Path(snapshot_download(spec, local_files_only=offline, allow_patterns=download_patterns(components),
                                        ignore_patterns=IGNORE))
        pickled = [c for c in components if _lacks_safetensors(folder / c)]
        if pickled:
            folder = Path(snapshot_download(spec, local_files_only=offline, ignore_patterns=IGNORE,
                                            allow_patterns=download_patterns(pickled, pickled=True)))
    except (HfHubHTTPError, OSError, ValueError) as e:
        raise FlashDMDError(_message(spec, e, offline)) from None
    return folder


def _components(spec: str, index_file: Path) -> list[str]:
    """The folders model_index.json names: entries ``name: [library, class]`` with both set."""
    index = io.read_json(index_file, f"hub repo {spec}: {MODEL_INDEX}", want=None)
    if not isinstance(index, dict):
        raise FlashDMDError(f"hub repo {spec}: {MODEL_INDEX} is not a JSON object of pipeline components")
    return sorted(k for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and len(v) == 2
                  and None not in v)


def _lacks_safetensors(folder: Path) -> bool:
    """A network folder (config.json) whose snapshot holds no safetensors weights."""
    return (folder / "config.json").is_file() and not any(
        f.name.endswith((".safetensors", ".safetensors.index.json")) for f in folder.iterdir())


def _message(spec: str, e: Exception, offline: bool) -> str:
    """The one-line FlashDMDError message for a hub error while resolving ``spec``."""
    cache = constants.HF_HUB_CACHE
    if isinstance(e, GatedRepoError):
        return (f"hub repo {spec} is gated: accept its terms on https://huggingface.co/{spec} and log in "
                "(hf auth login), or give a local folder")
    if isinstance(e, RepositoryNotFoundError):
        return (f"{spec} is not a local folder and the hub has no repo {spec} (a private one needs "
                "hf auth login); check the name, or give a local folder")
    if isinstance(e, IncompleteSnapshotError):
        if offline:
            return (f"the cached snapshot of hub repo {spec} in {cache} is incomplete; set HF_HUB_OFFLINE=0 to "
                    "download the rest, or give a local folder")
        return (f"could not complete hub repo {spec} (the hub is unreachable); check the connection, or give a "
                "local folder")
    if isinstance(e, LocalEntryNotFoundError):
        if offline:
            return (f"{spec} is not a local folder and hub repo {spec} is not in the local hub cache ({cache}); "
                    "set HF_HUB_OFFLINE=0 to download it, or give a local folder")
        return (f"could not reach the hub for {spec} and it is not in the local hub cache ({cache}); check the "
                "connection, or give a local folder")
    if isinstance(e, EntryNotFoundError):
        return f"hub repo {spec} has no {MODEL_INDEX}: it is not a diffusers pipeline; give an SDXL or SD3 pipeline"
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return f"could not fetch hub repo {spec}: {first}"
