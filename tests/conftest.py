import os

import pytest

# Never reach the hub from tests: offline, a hub tokenizer id silently loads as an empty tokenizer.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

# The tests play the face's part: they choose the embedded world (its names: world, world-sdxl, world-sd3),
# as flashdmd.cli and flashdmd.demo do. Nothing inside the package below the face imports it.
from flashdmd.world import plugin as _world  # noqa: E402

_world.register()


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """One intra-op thread per test process (as `make test` sets OMP_NUM_THREADS=1): on two shared cores torch's
    default pool oversubscribes them -- a 0.1 s forward of the FID network took 9 s with two threads."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def small_fid_input(monkeypatch):
    """The full FID network on 75x75 inputs (its minimum) instead of 299x299 (16x less work); the architecture
    and weights are unchanged (tests/test_eval_backends.py::test_fid_features_at_299 runs the real size once)."""
    import flashdmd.evaluation.backends.fid as fid
    monkeypatch.setattr(fid, "INPUT_SIZE", 75)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A tiny random CLIPModel folder (tests/tiny_models.py): the CLIP / PickScore / HPSv2 backends and judges."""
    from tests.tiny_models import clip_model_folder
    return clip_model_folder(tmp_path_factory.mktemp("clip"))


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory):
    """Random weights of the pytorch-fid Inception under their published file name."""
    from flashdmd.evaluation.backends.fid import FID_WEIGHTS_NAME
    from tests.tiny_models import random_fid_inception
    return random_fid_inception(tmp_path_factory.mktemp("fid") / FID_WEIGHTS_NAME)


@pytest.fixture(scope="session")
def tiny_run_folders(tmp_path_factory):
    """tests/tiny_models.run_folders (+ tests/tiny_flux2.run_folders) once per session: the tiny SDXL, SD3, FLUX and
    FLUX.2 teachers and the tiny SAM that the short distill runs read (read only: every run writes into its own folder)."""
    from tests.tiny_flux2 import run_folders as flux2_folders
    from tests.tiny_models import run_folders
    tmp = tmp_path_factory.mktemp("tiny_run_folders")
    return {**run_folders(tmp), **flux2_folders(tmp)}
