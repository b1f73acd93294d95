"""The Pixel-GAN says when it is not learning (issue 16, item 5): a run whose discriminator cannot tell real from
student images -- here a SAM backbone with transformers' degenerate default initialisation (initializer_range
1e-10 gives near-constant features) -- logs one warning naming the likely causes; a learning one does not."""
import sys
import types
import warnings
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import tiny_models as tm  # noqa: E402

from flashdmd.training.distill import train  # noqa: E402
from flashdmd.training.run import RunWriter  # noqa: E402

STALL = "the Pixel-GAN is not learning"
BAND = 0.2  # disc_stall_band: the run's own threshold, which the assertions read back (not a float tolerance)


def test_degenerate_backbone_triggers_the_warning_and_a_learning_disc_does_not(tmp_path, tiny_run_folders):
    folders = tiny_run_folders
    degenerate = tm.sam_vision_folder(tmp_path / "sam_degenerate", initializer_range=1e-10)
    runs = {}
    for name, sam in (("healthy", folders["sam"]), ("degenerate", degenerate)):
        # a high head lr so that the healthy tiny discriminator separates within the run's few steps
        cfg = tm.run_config(folders, "sdxl", "flashdmd", disc_backbone_path=str(sam), disc_lr=1e-2, run_max_steps=6,
                            disc_stall_logs=4, disc_stall_band=BAND)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            runs[name] = (train(cfg, tmp_path / name, progress=False), [str(w.message) for w in caught])
    result, caught = runs["degenerate"]
    gaps = [h["disc/D_real"] - h["disc/D_fake"] for h in result["history"]]
    assert all(abs(g) < BAND for g in gaps)
    stalls = [w for w in result["warnings"] if w.startswith(STALL)]
    assert len(stalls) == 1 and "to step 4" in stalls[0] and "\n" not in stalls[0]
    assert "disc_head: pooled" in stalls[0] and "initializer_range" in stalls[0] and "disc_lr" in stalls[0]
    assert any(m.startswith(STALL) for m in caught)
    result, caught = runs["healthy"]
    assert max(h["disc/D_real"] - h["disc/D_fake"] for h in result["history"]) > BAND
    assert not any(w.startswith(STALL) for w in result["warnings"]) and not any(m.startswith(STALL) for m in caught)


def _writer(band=0.2, logs=3):
    w = object.__new__(RunWriter)
    w.cfg = types.SimpleNamespace(disc_stall_band=band, disc_stall_logs=logs)
    w.warnings, w.disc_flat_logs = [], 0
    return w


def test_the_count_restarts_when_the_gap_leaves_the_band_and_warns_once():
    w = _writer()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for step, gap in enumerate([0.1, -0.1, 0.5, 0.1, 0.0, -0.19, 0.05, 0.0, 0.0], start=1):
            w.watch_disc({"disc/D_real": gap, "disc/D_fake": 0.0}, step)
    assert len(w.warnings) == 1 and "to step 6" in w.warnings[0]  # 4, 5, 6 in a row after the break at 3
    w.watch_disc({"loss/dm": 1.0}, 10)  # intervals without the Pixel-GAN's logits (DMD2, Stage 2) are ignored
    assert w.disc_flat_logs == 6
    off = _writer(logs=0)
    off.watch_disc({"disc/D_real": 0.0, "disc/D_fake": 0.0}, 1)
    assert off.warnings == [] and off.disc_flat_logs == 0
