"""Hub ids (flashdmd/families/hub.py): a repo in the local huggingface_hub cache resolves to its snapshot folder and
loads offline; what is not a hub id is left alone; the errors are one line that says what to do; the download
patterns pick from SDXL-base's real file list exactly the files the SDXL adapter loads.

The cache is laid out as huggingface_hub writes it (docs: "Manage huggingface_hub cache-system"): a repo folder
``models--{owner}--{name}`` with ``blobs/`` (files named by their git blob sha1, LFS files by their sha256),
``snapshots/{commit}/`` (relative symlinks into ../../blobs) and ``refs/main`` (the commit, no newline), plus the
tree listing ``trees/{commit}.json`` that huggingface_hub >= 1.x caches beside them; ``scan_cache_dir`` must read it
back without warnings. huggingface_hub reads HF_HUB_OFFLINE / HF_HUB_CACHE into ``huggingface_hub.constants`` at
import, so the tests patch those constants as well as the environment.
"""
import hashlib
import json
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import tiny_models as tm  # noqa: E402

from flashdmd import FlashDMDError  # noqa: E402
from flashdmd.families import hub  # noqa: E402

REPO = "tiny-owner/tiny-sdxl"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def cache_repo(cache: Path, repo_id: str, folder: Path, commit: str = COMMIT, listed_only: dict | None = None) -> Path:
    """Lay ``folder`` out as huggingface_hub's cache holds a snapshot of ``repo_id`` at ``commit``; ``listed_only``
    ({path: size}): files the repo has on the hub (so in the cached tree listing) that were never downloaded.
    Returns the snapshot folder."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    files = {}
    for src in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = src.relative_to(folder).as_posix()
        data = src.read_bytes()
        git_sha1 = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        entry = {"size": len(data), "blob_id": git_sha1}
        if src.suffix == ".safetensors":  # LFS: the blob is named by its sha256
            entry.update(lfs_sha256=hashlib.sha256(data).hexdigest(), lfs_size=len(data))
        blob = repo / "blobs" / entry.get("lfs_sha256", git_sha1)
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
        files[rel] = entry
    for rel, size in (listed_only or {}).items():
        files[rel] = {"size": size, "blob_id": hashlib.sha1(rel.encode()).hexdigest()}
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "trees").mkdir()
    (repo / "trees" / f"{commit}.json").write_text(json.dumps({"format_version": 1, "files": files}, indent=1))
    return snapshot


@pytest.fixture(scope="module")
def pipeline_folder(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hub")
    return tm.save_pipeline(tm.sdxl_pipeline(tmp), tmp / "sdxl")


@pytest.fixture
def hub_env(tmp_path, monkeypatch):
    """An empty hub cache in tmp_path/hub, offline; returns a function that switches the network on or off."""
    from huggingface_hub import constants
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))

    def offline(flag: bool):
        monkeypatch.setenv("HF_HUB_OFFLINE", "1" if flag else "0")
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", flag)
    offline(True)
    return cache, offline


# the SDXL-base repo's files that hub_snapshot must skip: variants, ONNX / Flax / OpenVINO exports, a folder
# model_index.json does not name, single-file checkpoints at the root, pictures
NOT_NEEDED = {"unet/diffusion_pytorch_model.fp16.safetensors": 9, "unet/diffusion_pytorch_model.onnx": 9,
              "unet/diffusion_flax_model.msgpack": 9, "unet/openvino_model.bin": 9, "vae_1_0/config.json": 9,
              "vae_1_0/diffusion_pytorch_model.safetensors": 9, "vae_decoder/model.onnx": 9,
              "text_encoder/model.fp16.safetensors": 9, "text_encoder/flax_model.msgpack": 9,
              "sd_xl_base_1.0.safetensors": 9, "01.png": 9, "README.md": 9}


def test_cached_repo_resolves_offline_and_loads(pipeline_folder, hub_env, tmp_path):
    from huggingface_hub import scan_cache_dir

    from flashdmd.families import load_family
    from huggingface_hub.utils import filter_repo_objects
    cache, _ = hub_env
    # what an online hub_snapshot would have downloaded: the pipeline's files that the patterns select
    files = sorted(p.relative_to(pipeline_folder).as_posix() for p in pipeline_folder.rglob("*") if p.is_file())
    components = hub._components(REPO, pipeline_folder / "model_index.json")
    wanted = set(filter_repo_objects(files, allow_patterns=hub.download_patterns(components),
                                     ignore_patterns=hub.IGNORE))
    downloaded = tmp_path / "downloaded"
    for rel in wanted:
        (downloaded / rel).parent.mkdir(parents=True, exist_ok=True)
        (downloaded / rel).write_bytes((pipeline_folder / rel).read_bytes())
    skipped = {rel: (pipeline_folder / rel).stat().st_size for rel in files if rel not in wanted}
    snapshot = cache_repo(cache, REPO, downloaded, listed_only={**NOT_NEEDED, **skipped})
    info = scan_cache_dir(cache)  # huggingface_hub reads the layout back as its own
    assert not info.warnings, info.warnings
    (repo,) = info.repos
    assert repo.repo_id == REPO and set(repo.refs) == {"main"} and repo.refs["main"].commit_hash == COMMIT
    (revision,) = repo.revisions
    assert {f.file_path.relative_to(snapshot).as_posix() for f in revision.files} == wanted and len(wanted) > 10

    # the tree listing names files that were never downloaded: complete all the same, since none is needed;
    # and the adapter loads from the selected files alone
    folder = hub.hub_snapshot(REPO)
    assert folder == snapshot.resolve()
    fam = load_family(folder)
    assert fam.name == "sdxl" and fam.default_resolution == 32
    # the hub id itself, as a user writes it in model_teacher / --model: resolve_path finds the snapshot
    assert load_family(REPO).path.resolve() == snapshot.resolve()


def test_incomplete_cached_snapshot_is_one_line(pipeline_folder, hub_env, tmp_path):
    cache, _ = hub_env
    partial = tmp_path / "partial"
    for p in pipeline_folder.rglob("*"):
        if p.is_file() and p.relative_to(pipeline_folder).as_posix() != "unet/diffusion_pytorch_model.safetensors":
            (partial / p.relative_to(pipeline_folder)).parent.mkdir(parents=True, exist_ok=True)
            (partial / p.relative_to(pipeline_folder)).write_bytes(p.read_bytes())
    cache_repo(cache, REPO, partial, listed_only={"unet/diffusion_pytorch_model.safetensors": 100})
    with pytest.raises(FlashDMDError) as e:
        hub.hub_snapshot(REPO)
    msg = str(e.value)
    assert "\n" not in msg and "incomplete" in msg and "HF_HUB_OFFLINE=0" in msg, msg


def test_offline_missing_repo_is_one_line(hub_env):
    cache, _ = hub_env
    with pytest.raises(FlashDMDError) as e:
        hub.hub_snapshot("nobody/no-such-model")
    msg = str(e.value)
    assert "\n" not in msg and "nobody/no-such-model" in msg and str(cache) in msg
    assert "set HF_HUB_OFFLINE=0 to download it, or give a local folder" in msg, msg


def test_online_errors_are_one_line(hub_env, monkeypatch):
    """The hub's typed errors (here raised by a stand-in for the download, as the hub client raises them)."""
    import httpx2
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError
    _, offline = hub_env
    offline(False)
    response = httpx2.Response(404, request=httpx2.Request("GET", "https://huggingface.co/api/models/x/y"))
    cases = [(RepositoryNotFoundError("404 Repository Not Found\nmore", response=response), "the hub has no repo"),
             (GatedRepoError("403 gated\nmore", response=response), "is gated"),
             (LocalEntryNotFoundError("connection refused\nmore"), "could not reach the hub")]
    for error, expected in cases:
        def fail(*args, error=error, **kwargs):
            assert kwargs["local_files_only"] is False  # HF_HUB_OFFLINE=0: the network is allowed
            raise error
        monkeypatch.setattr(hub, "hf_hub_download", fail)
        with pytest.raises(FlashDMDError) as e:
            hub.hub_snapshot("some-owner/some-model")
        assert "\n" not in str(e.value) and expected in str(e.value), str(e.value)


def test_not_a_hub_id_is_none(tmp_path, monkeypatch):
    def no_hub(*args, **kwargs):
        raise AssertionError("the hub was asked")
    monkeypatch.setattr(hub, "hf_hub_download", no_hub)
    (tmp_path / "owner").mkdir()
    (tmp_path / "owner" / "name").mkdir()
    monkeypatch.chdir(tmp_path)
    for spec in ("owner/name", str(tmp_path), "world-sdxl", "a/b/c", "./x", "/abs/path", "bad--name/x", "x/y.git"):
        assert hub.hub_snapshot(spec) is None, spec
    assert hub.is_hub_id("stabilityai/stable-diffusion-xl-base-1.0")


# the files of stabilityai/stable-diffusion-xl-base-1.0 on the hub: weights, variants, exports, root checkpoints
SDXL_BASE_FILES = """.gitattributes 01.png LICENSE.md README.md comparison.png model_index.json pipeline.png
scheduler/scheduler_config.json sd_xl_base_1.0.safetensors sd_xl_base_1.0_0.9vae.safetensors
sd_xl_offset_example-lora_1.0.safetensors
text_encoder/config.json text_encoder/flax_model.msgpack text_encoder/model.fp16.safetensors text_encoder/model.onnx
text_encoder/model.safetensors text_encoder/openvino_model.bin text_encoder/openvino_model.xml
text_encoder_2/config.json text_encoder_2/flax_model.msgpack text_encoder_2/model.fp16.safetensors
text_encoder_2/model.onnx text_encoder_2/model.onnx_data text_encoder_2/model.safetensors
text_encoder_2/openvino_model.bin text_encoder_2/openvino_model.xml
tokenizer/merges.txt tokenizer/special_tokens_map.json tokenizer/tokenizer_config.json tokenizer/vocab.json
tokenizer_2/merges.txt tokenizer_2/special_tokens_map.json tokenizer_2/tokenizer_config.json tokenizer_2/vocab.json
unet/config.json unet/diffusion_flax_model.msgpack unet/diffusion_pytorch_model.fp16.safetensors
unet/diffusion_pytorch_model.onnx unet/diffusion_pytorch_model.safetensors unet/model.onnx_data
unet/openvino_model.bin unet/openvino_model.xml
vae/config.json vae/diffusion_flax_model.msgpack vae/diffusion_pytorch_model.fp16.safetensors
vae/diffusion_pytorch_model.safetensors
vae_1_0/config.json vae_1_0/diffusion_pytorch_model.fp16.safetensors vae_1_0/diffusion_pytorch_model.safetensors
vae_decoder/config.json vae_decoder/model.onnx vae_encoder/config.json vae_encoder/model.onnx""".split()
SDXL_COMPONENTS = ["scheduler", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "unet", "vae"]


def test_patterns_pick_what_the_adapter_loads():
    """On SDXL-base's file list (plus two fp16 shard names in diffusers' current and legacy formats, to pin that
    variant shards are skipped): the configs, tokenizers and full-precision safetensors of the named folders."""
    from huggingface_hub.utils import filter_repo_objects
    variant_shards = ["vae/diffusion_pytorch_model.fp16-00001-of-00002.safetensors",
                      "vae/diffusion_pytorch_model-00001-of-00002.fp16.safetensors"]
    picked = set(filter_repo_objects(SDXL_BASE_FILES + variant_shards,
                                     allow_patterns=hub.download_patterns(SDXL_COMPONENTS), ignore_patterns=hub.IGNORE))
    assert picked == {"model_index.json", "scheduler/scheduler_config.json",
                      "text_encoder/config.json", "text_encoder/model.safetensors",
                      "text_encoder_2/config.json", "text_encoder_2/model.safetensors",
                      *(f"{t}/{f}" for t in ("tokenizer", "tokenizer_2")
                        for f in ("merges.txt", "special_tokens_map.json", "tokenizer_config.json", "vocab.json")),
                      "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
                      "vae/config.json", "vae/diffusion_pytorch_model.safetensors"}
    shards = ["unet/diffusion_pytorch_model-00001-of-00002.safetensors",
              "unet/diffusion_pytorch_model.safetensors.index.json", "text_encoder/model-00002-of-00002.safetensors",
              "text_encoder/pytorch_model.bin"]
    assert set(filter_repo_objects(shards, allow_patterns=hub.download_patterns(["unet", "text_encoder"]),
                                   ignore_patterns=hub.IGNORE)) == set(shards[:3])
    pickled = set(filter_repo_objects(SDXL_BASE_FILES + ["unet/diffusion_pytorch_model.bin"],
                                      allow_patterns=hub.download_patterns(["unet", "text_encoder"], pickled=True),
                                      ignore_patterns=hub.IGNORE))
    assert pickled == {"unet/diffusion_pytorch_model.bin"}  # never openvino_model.bin


def test_pickle_weights_fetched_only_for_folders_without_safetensors(pipeline_folder, hub_env, tmp_path, monkeypatch):
    """A folder whose snapshot has a config but no safetensors gets a second fetch for its .bin weights."""
    _, offline = hub_env
    offline(False)
    snap = tmp_path / "snap"
    (snap / "unet").mkdir(parents=True)
    (snap / "unet" / "config.json").write_text("{}")
    (snap / "vae").mkdir()
    (snap / "vae" / "config.json").write_text("{}")
    (snap / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    (snap / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline",
                                                       "unet": ["diffusers", "UNet2DConditionModel"],
                                                       "vae": ["diffusers", "AutoencoderKL"],
                                                       "image_encoder": [None, None]}))
    calls = []
    monkeypatch.setattr(hub, "hf_hub_download", lambda repo, name, **kw: str(snap / name))

    def snapshot_download(repo, **kw):
        calls.append(kw["allow_patterns"])
        return str(snap)
    monkeypatch.setattr(hub, "snapshot_download", snapshot_download)
    assert hub.hub_snapshot(REPO) == snap
    assert calls[0] == hub.download_patterns(["unet", "vae"])
    assert calls[1] == hub.download_patterns(["unet"], pickled=True)
