"""`flashdmd info` reports the pixel resolution and latent shape a model works at (the diffusers pipeline's
default)."""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import tiny_models as tm  # noqa: E402

from flashdmd.cli import main  # noqa: E402


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("info_sample")
    return tm.save_pipeline(tm.sdxl_pipeline(tmp), tmp / "sdxl")


def test_info_prints_resolution_and_latent_shape(teacher, capsys):
    from diffusers import StableDiffusionXLPipeline
    capsys.readouterr()
    assert main(["info", "--model", str(teacher)]) == 0
    info = json.loads(capsys.readouterr().out)
    # what the diffusers pipeline draws when no height / width is given
    pipe = StableDiffusionXLPipeline.from_pretrained(teacher)
    side = pipe.default_sample_size * pipe.vae_scale_factor
    assert info["resolution"] == side == 32
    assert info["latent_shape"] == [pipe.unet.config.in_channels, side // pipe.vae_scale_factor,
                                    side // pipe.vae_scale_factor]
