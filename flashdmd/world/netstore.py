"""Where the embedded world's three frozen auxiliary networks live (``flashdmd/world/assets/eval/`` by default):
each as ``<name>.safetensors`` (weights) + ``<name>.json`` (constructor config plus training facts), written by
:mod:`flashdmd.world.evalnets` and read by the modules that define the networks (classifier, oracle, encoder)."""
from __future__ import annotations

import json
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from flashdmd import FlashDMDError, io

EVAL_DIR = Path(__file__).parent / "assets" / "eval"
NAMES = ("eval_classifier", "oracle_judge", "disc_encoder")
PRETRAIN_HINT = "run `flashdmd world pretrain --only eval`"


def resolve_dir(directory=None) -> Path:
    """``directory`` or the shipped ``flashdmd/world/assets/eval``."""
    return Path(directory) if directory is not None else EVAL_DIR


def save_net(net: nn.Module, config: dict, directory, name: str) -> None:
    """Write ``name.safetensors`` (contiguous CPU float tensors) and ``name.json`` into ``directory``."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    io.atomic_save(d / f"{name}.safetensors", lambda tmp: save_file(state, str(tmp)))
    io.atomic_write_text(d / f"{name}.json", json.dumps(config, indent=2, sort_keys=True) + "\n")


def read_net(directory, name: str) -> tuple[dict, dict[str, Tensor]]:
    """(config, state_dict) of a stored network; FlashDMDError with the fix if missing or unreadable."""
    d = resolve_dir(directory)
    w, c = d / f"{name}.safetensors", d / f"{name}.json"
    if not (w.is_file() and c.is_file()):
        raise FlashDMDError(f"evaluation network {name!r} not found in {d} (need {w.name} and {c.name}): "
                            f"{PRETRAIN_HINT}")
    config = io.read_json(c, f"evaluation network {name!r}: {c}", PRETRAIN_HINT)
    try:
        return config, load_file(str(w))
    except (OSError, SafetensorError) as e:  # a corrupt safetensors header
        raise FlashDMDError(f"cannot read evaluation network {name!r} from {d}: {e}; {PRETRAIN_HINT}") from None
