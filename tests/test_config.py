"""The config means what it says: each method sets its own defaults, a preset says only what differs, every shipped
preset resolves to the values it resolved to before (tests/preset_configs.json: the resolved configs of the
presets as they were before the method defaults and the renames, under the old field names), the family list is
the registry's, and the old field names keep working for one release with a warning."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest

from flashdmd import FlashDMDError
from flashdmd.families import FAMILIES
from flashdmd.training import config as C
from flashdmd.training.config import METHOD_DEFAULTS, RENAMED, DistillConfig

ROOT = Path(__file__).resolve().parents[1]
FROZEN = json.loads((Path(__file__).parent / "preset_configs.json").read_text())


@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch):
    """Every test sees the one-time rename warnings afresh."""
    monkeypatch.setattr(C, "_WARNED", set())


@pytest.mark.parametrize("preset", sorted(FROZEN))
def test_every_shipped_preset_resolves_to_its_values_before(preset):
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # a preset uses the new names only
        got = DistillConfig.from_sources(ROOT / "configs" / preset).to_dict()
    assert got == {RENAMED.get(k, k): v for k, v in FROZEN[preset].items()}


def test_the_frozen_presets_are_the_shipped_ones():
    assert sorted(p.name for p in (ROOT / "configs").glob("*.yaml")) == sorted(FROZEN)


@pytest.mark.parametrize("method", list(METHOD_DEFAULTS))
def test_a_method_sets_its_defaults_where_no_source_does(method, tmp_path):
    assert {k: getattr(DistillConfig(method=method), k) for k in METHOD_DEFAULTS[method]} == METHOD_DEFAULTS[method]
    assert DistillConfig.from_sources(None, [f"method={method}"]).to_dict() == DistillConfig(method=method).to_dict()
    other = next(m for m in METHOD_DEFAULTS if m != method)
    # a value set in the YAML, by --set or as a keyword stays, even where it is the other method's default; null is
    # the method's default
    theirs = METHOD_DEFAULTS[other]
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text(f"method: {other}\nfake_score_ttur: {theirs['fake_score_ttur']}\ndisc_kind: null\n")
    cfg = DistillConfig.from_sources(yaml_file, [f"method={method}", f"disc_loss={theirs['disc_loss']}"])
    assert cfg.method == method and cfg.fake_score_ttur == theirs["fake_score_ttur"]
    assert cfg.disc_loss == theirs["disc_loss"] and cfg.disc_kind == METHOD_DEFAULTS[method]["disc_kind"]
    assert cfg.fake_score_ema == METHOD_DEFAULTS[method]["fake_score_ema"]
    assert DistillConfig(method=method, disc_weight=0.5).disc_weight == 0.5


def test_the_resolved_config_file_resolves_to_itself(tmp_path):
    """config.yaml in a run folder holds every value explicitly: read back it is the same config."""
    cfg = DistillConfig.from_sources(ROOT / "configs" / "world_sdxl_dmd2.yaml", ["fake_score_ttur=3"])
    (tmp_path / "config.yaml").write_text(cfg.to_yaml())
    assert DistillConfig.from_sources(tmp_path / "config.yaml") == cfg


def test_model_family_is_any_registered_family(monkeypatch):
    for name in FAMILIES:
        assert DistillConfig(model_family=name).model_family == name
    names = ", ".join(sorted(FAMILIES))  # flux, qwenimage, sd3, sdxl, ...
    with pytest.raises(FlashDMDError, match=rf"model_family must be one of {names} or null, got 'sd15'"):
        DistillConfig(model_family="sd15")
    monkeypatch.setitem(FAMILIES, "sd15", FAMILIES["sdxl"])   # a family registered later is accepted
    assert DistillConfig(model_family="sd15").model_family == "sd15"


def test_old_names_work_with_one_warning_naming_the_new_one(tmp_path):
    old_file = tmp_path / "old.yaml"
    old_file.write_text("batch_size: 3\ngenerator_lr: 1.0e-3\n")
    with pytest.warns(FutureWarning) as seen:
        cfg = DistillConfig.from_sources(old_file, ["max_steps=7", "batch_size=4"])
        again = DistillConfig(seed=5, max_steps=2)
        assert (cfg.seed, again.run_seed, again.max_steps) == (0, 5, 2)   # attributes by their old names too
    assert (cfg.run_batch_size, cfg.student_lr, cfg.run_max_steps) == (4, 1e-3, 7)
    messages = [str(w.message) for w in seen if issubclass(w.category, FutureWarning)]
    assert sorted(messages) == sorted(f"config: {old} is renamed {RENAMED[old]}; the old name works until the next "
                                      "release" for old in ("batch_size", "generator_lr", "max_steps", "seed"))
    both = tmp_path / "both.yaml"
    both.write_text("batch_size: 3\nrun_batch_size: 3\n")
    with pytest.raises(FlashDMDError, match=r"sets run_batch_size twice \(also as its old name batch_size\)"):
        DistillConfig.from_sources(both)
    with pytest.raises(FlashDMDError, match=r"unknown key 'max_step' \(did you mean run_max_steps\?\)"):
        DistillConfig.from_sources(None, ["max_step=3"])


def test_config_help_says_how_a_value_is_resolved(capsys):
    from flashdmd.cli import main
    assert main(["config-help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("A value is resolved in this order, later wins: the field's default; the method's default")
    assert "\nfake_score_ttur = the method's\n" in out and "flashdmd 1, dmd2 5" in out
    assert "\nrun_batch_size = 32\n" in out and "batch_size -> run_batch_size" in " ".join(out.split())
