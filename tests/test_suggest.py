"""flashdmd plan --suggest: the cumulative ladder on a tiny teacher -- a device memory between two rungs picks the
first rung that fits (less the earlier rungs it does not need), one below every rung reports the miss, and the
suggested overrides, planned again from the command line's own --set form, fit."""
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
# text cache, checkpointing, the int8 Pixel-GAN backbone, batch 1 and the smallest LoRA rank already set: the
# ladder left is the int8 text encoders (nothing to save: the text cache frees them before training, the peak),
# model_offload frozen (nothing to save: the generator phase, the peak, reads every frozen part), the int8 frozen
# base and model_offload base (not for SDXL)
START = dict(model_lora_rank=8, run_batch_size=1, model_text_cache=True, model_gradient_checkpointing=True,
             disc_backbone_quant="int8")


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
    # (model_offload base, last, is passed over: SDXL's UNet has no transformer blocks to stream)
    te, frozen = {"model_text_encoder_quant": "int8"}, {"model_offload": "frozen"}
    assert [t["overrides"] for t in miss["tried"]] == [{}, te, dict(te, **frozen),
                                                       dict(te, **frozen, model_frozen_quant="int8")]
    peaks = [t["peak_bytes"] for t in miss["tried"]]
    # the int8 base saves bytes; int8 text encoders, freed, do not; nor does offloading the frozen parts, which the
    # generator phase (the peak) all reads
    assert peaks[0] == peaks[1] == peaks[2] > peaks[3], peaks
    assert miss["peak_bytes"] == peaks[-1] and miss["miss_bytes"] == peaks[-1] - int(0.95 * 2 ** 20)
    assert miss["set"] == ["model_text_encoder_quant=int8", "model_offload=frozen", "model_frozen_quant=int8"]
    assert miss["pruned"] == []


def test_between_two_rungs_the_first_that_fits_is_suggested(setup, tmp_path, monkeypatch, capsys):
    sets, plan, miss = setup
    peaks = [t["peak_bytes"] for t in miss["tried"]]
    memory = int(peaks[3] / 0.95) + 1  # with the int8 base it fits, without it does not
    assert peaks[2] > 0.95 * memory >= peaks[3]
    monkeypatch.setattr(P, "plan", plan)
    out = tmp_path / "plan.json"
    args = ["plan", "--device", "cuda", "--suggest", "--device-memory", f"{memory}B", "--json", str(out)]
    assert main(args + [a for s in sets for a in ("--set", s)]) == 0
    printed = capsys.readouterr().out
    assert "suggest: --set model_frozen_quant=int8  (peak" in printed
    result = json.loads(out.read_text())
    assert result["peak_bytes_per_device"] == peaks[0] and result["fits"] is False  # the run as configured
    rec = result["suggestion"]
    # the int8 text encoders and the offloaded frozen parts saved nothing: planned without them the run still fits,
    # so they are not suggested
    assert rec["fits"] and rec["set"] == ["model_frozen_quant=int8"]
    assert rec["pruned"] == ["model_offload", "model_text_encoder_quant"]
    assert rec["peak_bytes"] == peaks[3] and rec["tried"][-1]["overrides"] == {"model_frozen_quant": "int8"}
    # the suggestion, planned again from the --set overrides as a user would give them (not memoised): it fits
    again = REAL_PLAN(DistillConfig.from_sources(None, sets + rec["set"]),
                      P.Settings(device="cuda", device_memory=memory))
    assert again["fits"] and again["peak_bytes_per_device"] == peaks[3]


def test_suggest_needs_a_device_memory(setup, capsys):
    sets, _, _ = setup
    assert main(["plan", "--suggest"] + [a for s in sets for a in ("--set", s)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "--suggest needs --device-memory" in lines[0]
    with pytest.raises(FlashDMDError, match="--device-memory"):
        suggest(None, P.Settings(), P.plan)
