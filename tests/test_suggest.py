"""flashdmd plan --suggest: the cumulative ladder on a tiny teacher -- a device memory between two rungs picks the
first rung that fits, one below every rung reports the miss, and the suggested overrides, planned again from the
command line's own --set form, fit."""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import tiny_models as tm  # noqa: E402

from flashdmd import FlashDMDError  # noqa: E402
from flashdmd.cli import main  # noqa: E402
from flashdmd.training import plan as P  # noqa: E402
from flashdmd.training.config import DistillConfig  # noqa: E402
from flashdmd.training.memory.suggest import suggest  # noqa: E402

REAL_PLAN = P.plan
# the rungs up to the int8 Pixel-GAN backbone already on: the ladder left is the frozen base, then the LoRA rank
START = dict(model_lora_rank=16, run_batch_size=1, model_text_cache=True, model_gradient_checkpointing=True,
             model_text_encoder_quant="int8", disc_backbone_quant="int8")


@pytest.fixture(scope="module")
def setup(tiny_run_folders, tmp_path_factory):
    """(the start config's --set list, a memoised planner, the miss record at 1 MB): each setting is planned once."""
    tmp = tmp_path_factory.mktemp("suggest")
    prompts = tmp / "prompts.txt"
    prompts.write_text("a photo of a cat\n")
    cfg = tm.run_config(tiny_run_folders, "sdxl", "flashdmd", data_prompts=str(prompts), **START)
    memo = {}

    def plan(c, s):
        key = (c.to_yaml(), s.device, s.processes)
        if key not in memo:
            memo[key] = REAL_PLAN(c, s)
        return memo[key]
    miss = suggest(cfg, P.Settings(device="cuda", device_memory=2 ** 20), plan)
    sets = [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in cfg.to_dict().items() if v is not None]
    return sets, plan, miss


def test_below_every_rung_the_miss_is_reported(setup):
    _, _, miss = setup
    assert not miss["fits"]
    # every rung left was tried, cheapest first, cumulatively; the already-set ones were passed over
    assert [t["overrides"] for t in miss["tried"]] == [
        {}, {"model_frozen_quant": "int8"}, {"model_frozen_quant": "int8", "model_lora_rank": 8}]
    peaks = [t["peak_bytes"] for t in miss["tried"]]
    assert peaks[0] > peaks[1] > peaks[2]  # int8 base and a smaller adapter both save bytes
    assert miss["peak_bytes"] == peaks[-1] and miss["miss_bytes"] == peaks[-1] - int(0.95 * 2 ** 20)
    assert miss["set"] == ["model_frozen_quant=int8", "model_lora_rank=8"]


def test_between_two_rungs_the_first_that_fits_is_suggested(setup, tmp_path, monkeypatch, capsys):
    sets, plan, miss = setup
    peaks = [t["peak_bytes"] for t in miss["tried"]]
    memory = int(peaks[1] / 0.95) + 1  # the int8 base fits, the run as configured does not
    assert peaks[0] > 0.95 * memory >= peaks[1]
    monkeypatch.setattr(P, "plan", plan)
    out = tmp_path / "plan.json"
    args = ["plan", "--device", "cuda", "--suggest", "--device-memory", f"{memory}B", "--json", str(out)]
    assert main(args + [a for s in sets for a in ("--set", s)]) == 0
    printed = capsys.readouterr().out
    assert "suggest: --set model_frozen_quant=int8  (peak" in printed
    result = json.loads(out.read_text())
    assert result["peak_bytes_per_device"] == peaks[0] and result["fits"] is False  # the run as configured
    rec = result["suggestion"]
    assert rec["fits"] and rec["set"] == ["model_frozen_quant=int8"] and rec["peak_bytes"] == peaks[1]
    # the suggestion, planned again from the --set overrides as a user would give them (not memoised): it fits
    again = REAL_PLAN(DistillConfig.from_sources(None, sets + rec["set"]),
                      P.Settings(device="cuda", device_memory=memory))
    assert again["fits"] and again["peak_bytes_per_device"] == peaks[1]


def test_suggest_needs_a_device_memory(setup, capsys):
    sets, _, _ = setup
    assert main(["plan", "--suggest"] + [a for s in sets for a in ("--set", s)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "--suggest needs --device-memory" in lines[0]
    with pytest.raises(FlashDMDError, match="--device-memory"):
        suggest(None, P.Settings(), P.plan)
