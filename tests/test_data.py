"""flashdmd.data: prompt files, the three image sources and the plug-in route, preprocessing to (3, R, R) in
[-1, 1], and the real-image stream's order (process-split invariant), resume, bad-file handling and chunked
calibration images. Tiny images are written into tmp_path; everything runs in seconds."""
from __future__ import annotations

import ast
import io
import json
import random
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from flashdmd import FlashDMDError, plugins
from flashdmd.data import (MAX_PROMPT_CHARS, HFDiskSource, ImageFolderSource, ImageSource, ListPromptSource,
                           RealImageStream, WebDatasetSource, open_image_source, open_prompt_source,
                           read_prompt_file, to_training_tensor)
from flashdmd.training.rng import SampleRNG
from tests.tolerances import assert_close

R = 8


# ---------------------------------------------------------------------------------------------------
# helpers

def pixels(w: int, h: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def write_image(path: Path, w: int = 12, h: int = 10, seed: int = 0, mode: str = "RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels(w, h, seed)).convert(mode).save(path)
    return path


def encoded(w: int, h: int, seed: int, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels(w, h, seed)).save(buf, format=fmt)
    return buf.getvalue()


def captioned_folder(root: Path, n: int, bad: tuple[int, ...] = ()) -> Path:
    """root/NN.png (sizes vary), captions "cNN" in metadata.jsonl; indices in ``bad`` are corrupt files."""
    for i in range(n):
        f = root / f"{i:02d}.png"
        if i in bad:
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
        else:
            write_image(f, 10 + i % 3, 9 + i % 4, seed=i)
    (root / "metadata.jsonl").write_text("".join(json.dumps({"file_name": f"{i:02d}.png", "text": f"c{i:02d}"}) + "\n"
                                                 for i in range(n)))
    return root


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


class TensorSource:
    """In-memory source: image i is the constant (i / n) * 2 - 1 at (3, size, size), caption f"t{i}"."""

    def __init__(self, n: int, size: int = R, bad: tuple[int, ...] = ()):
        self.n, self.size, self.bad = n, size, set(bad)

    def __len__(self) -> int:
        return self.n

    def caption(self, i: int) -> str:
        return f"t{i}"

    def read(self, i: int):
        if i in self.bad:
            raise OSError(f"item {i} is broken")
        return torch.full((3, self.size, self.size), i / self.n * 2 - 1), self.caption(i)

    def describe(self) -> str:
        return f"{self.n} test tensors"


def ids(captions) -> list[int]:
    return [int(c[1:]) for c in captions]


def take(stream: RealImageStream, k: int) -> list[tuple[torch.Tensor, list]]:
    return [stream.next_batch() for _ in range(k)]


# ---------------------------------------------------------------------------------------------------
# prompt files and prompt sources

def test_read_prompt_file_checks(tmp_path):
    good = tmp_path / "p.txt"
    good.write_text("a cat\n\n  a dog  \n")
    assert read_prompt_file(good) == ["a cat", "a dog"]
    cases = {"missing.txt": (None, "not found"), "bin.txt": (b"a\x00b", "binary"),
             "latin.txt": ("caf\u00e9".encode("latin-1"), "not UTF-8"), "empty.txt": (b"\n \n", "no prompts"),
             "long.txt": (("x" * (MAX_PROMPT_CHARS + 1)).encode(), "characters")}
    for name, (data, words) in cases.items():
        if data is not None:
            (tmp_path / name).write_bytes(data)
        with pytest.raises(FlashDMDError, match=words):
            read_prompt_file(tmp_path / name)


def test_prompt_sources(tmp_path, monkeypatch):
    f = tmp_path / "p.txt"
    f.write_text("a\nb\nc\n")
    src = open_prompt_source(str(f))
    whole, halves = SampleRNG(3, 0, 4), [SampleRNG(3, r, 2) for r in range(2)]
    assert src.sample(4, whole) == src.sample(2, halves[0]) + src.sample(2, halves[1])
    assert set(src.sample(50, SampleRNG(1))) == {"a", "b", "c"}
    caps = open_prompt_source("captions", captions_of=lambda: ["x", "y"])
    assert isinstance(caps, ListPromptSource) and set(caps.sample(20, SampleRNG(0))) == {"x", "y"}
    monkeypatch.setitem(plugins._PLUGINS, "testworld",
                        plugins.Plugin(name="testworld", prompt_source=lambda: ListPromptSource(["z"])))
    assert open_prompt_source("testworld").sample(2, SampleRNG(0)) == ["z", "z"]
    with pytest.raises(FlashDMDError, match="captions needs real images"):
        open_prompt_source("captions")
    with pytest.raises(FlashDMDError, match=r"'nonsense' is neither a prompt file.*loaded: .*testworld"):
        open_prompt_source("nonsense")
    with pytest.raises(FlashDMDError, match="prompt file .*missing.txt not found"):
        open_prompt_source(str(tmp_path / "missing.txt"))


# ---------------------------------------------------------------------------------------------------
# image sources

def test_image_folder_source(tmp_path):
    root = tmp_path / "imgs"
    write_image(root / "b.png", seed=1)
    write_image(root / "a.jpg", seed=2)
    write_image(root / "sub" / "deep" / "c.webp", seed=3)
    write_image(root / "sub" / "d.bmp", seed=4)
    (root / "sub" / "broken.png").write_bytes(b"junk")       # listed: listing decodes nothing
    (root / "notes.txt").write_text("not an image")
    write_image(root / ".hidden" / "e.png", seed=5)
    (root / "metadata.jsonl").write_text(json.dumps({"file_name": "a.jpg", "text": "an a"}) + "\n"
                                         + json.dumps({"file_name": "gone.png", "text": "ignored"}) + "\n")
    (root / "sub" / "metadata.jsonl").write_text(json.dumps({"file_name": "deep/c.webp", "caption": "a c"}) + "\n")
    src = open_image_source(str(root))
    assert isinstance(src, ImageFolderSource) and isinstance(src, ImageSource)
    assert [Path(src.name(i)).relative_to(root).as_posix() for i in range(len(src))] == \
           ["a.jpg", "b.png", "sub/broken.png", "sub/d.bmp", "sub/deep/c.webp"]
    assert [src.caption(i) for i in range(len(src))] == ["an a", None, None, None, "a c"]
    img, caption = src.read(1)
    assert img.size == (12, 10) and caption is None
    with pytest.raises(OSError):
        src.read(2)
    assert "5 images, 2 with captions" in src.describe()


def test_image_folder_errors(tmp_path):
    with pytest.raises(FlashDMDError, match="not found"):
        ImageFolderSource(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "x.txt").write_text("x")
    with pytest.raises(FlashDMDError, match="holds no images"):
        open_image_source(str(tmp_path / "empty"))
    write_image(tmp_path / "m" / "a.png")
    (tmp_path / "m" / "metadata.jsonl").write_text("{not json\n")
    with pytest.raises(FlashDMDError, match=r"metadata.jsonl line 1 is not a JSON object"):
        ImageFolderSource(tmp_path / "m")


def test_hf_disk_source(tmp_path):
    import datasets
    files = [str(write_image(tmp_path / "src" / f"{i}.png", 9 + i, 11, seed=i)) for i in range(3)]
    ds = datasets.Dataset.from_dict({"label": [0, 1, 2], "image": files, "text": ["x0", "x1", "x2"]})
    ds.cast_column("image", datasets.Image()).save_to_disk(str(tmp_path / "ds"))
    src = open_image_source(str(tmp_path / "ds"))
    assert isinstance(src, HFDiskSource) and len(src) == 3
    img, caption = src.read(2)
    assert img.size == (11, 11) and caption == "x2" and src.caption(0) == "x0"
    assert np.array_equal(np.asarray(img), pixels(11, 11, 2))

    plain = datasets.Dataset.from_dict({"pic": files[:2]}).cast_column("pic", datasets.Image())
    datasets.DatasetDict({"train": plain}).save_to_disk(str(tmp_path / "dd"))
    src = open_image_source(str(tmp_path / "dd"))
    assert len(src) == 2 and src.caption(0) is None and src.read(0)[0].size == (9, 11)

    datasets.DatasetDict({"validation": plain, "test": plain}).save_to_disk(str(tmp_path / "noval"))
    with pytest.raises(FlashDMDError, match="splits validation, test but no 'train' split"):
        open_image_source(str(tmp_path / "noval"))
    datasets.Dataset.from_dict({"text": ["a"]}).save_to_disk(str(tmp_path / "noimg"))
    with pytest.raises(FlashDMDError, match=r"no column of feature type Image \(columns: text\)"):
        open_image_source(str(tmp_path / "noimg"))


def write_shards(folder: Path, n_shards: int = 2, per_shard: int = 3) -> Path:
    """shards-000.tar ...: sample k has k.jpg (or .png) + k.txt; each shard also holds a json-only sample and
    one image without a caption."""
    folder.mkdir(parents=True, exist_ok=True)
    k = 0
    for s in range(n_shards):
        with tarfile.open(folder / f"shards-{s:03d}.tar", "w") as tar:
            for _ in range(per_shard):
                fmt, ext = ("JPEG", "jpg") if k % 2 else ("PNG", "png")
                add_member(tar, f"dir/{k:04d}.{ext}", encoded(10 + k, 9, k, fmt))
                add_member(tar, f"dir/{k:04d}.txt", f"w{k}".encode())
                k += 1
            add_member(tar, f"dir/meta{s}.json", b"{}")
            add_member(tar, f"dir/nocap{s}.png", encoded(9, 9, 100 + s))
    return folder


def test_webdataset_source(tmp_path):
    folder = write_shards(tmp_path / "wds")
    src = open_image_source(str(folder))
    assert isinstance(src, WebDatasetSource) and len(src) == 8
    assert [src.caption(i) for i in range(8)] == ["w0", "w1", "w2", None, "w3", "w4", "w5", None]
    img, caption = src.read(4)                       # sample 3 (PNG? no: k=3 is JPEG), first of shard 1
    assert caption == "w3" and img.size == (13, 9)
    img, _ = src.read(2)                             # k=2: PNG, lossless
    assert np.array_equal(np.asarray(img), pixels(12, 9, 2))
    assert src.name(3).endswith("shards-000.tar:dir/nocap0.png")
    assert len(open_image_source(str(folder / "shards-001.tar"))) == 4
    assert len(open_image_source(str(folder / "shards-{000..001}.tar"))) == 8
    assert "2 shards, 8 images, 6 with captions" in src.describe()
    with pytest.raises(FlashDMDError, match=r"1 of 3 shard files not found \(e.g. .*shards-002.tar\)"):
        open_image_source(str(folder / "shards-{000..002}.tar"))
    (tmp_path / "cut.tar").write_bytes((folder / "shards-000.tar").read_bytes()[:1500])
    with pytest.raises(FlashDMDError, match="cut.tar cannot be indexed"):
        WebDatasetSource(tmp_path / "cut.tar")


def test_webdataset_written_by_webdataset(tmp_path):
    """Shards written by webdataset's own TarWriter (its key / extension conventions) read back."""
    import webdataset as wds
    with wds.TarWriter(str(tmp_path / "w-0.tar")) as sink:
        for k in range(3):
            sink.write({"__key__": f"s{k}", "png": encoded(8, 8, k), "caption": f"cap {k}"})
    src = WebDatasetSource(tmp_path / "w-0.tar")
    assert [src.caption(i) for i in range(3)] == ["cap 0", "cap 1", "cap 2"]
    assert np.array_equal(np.asarray(src.read(1)[0]), pixels(8, 8, 1))


def test_open_image_source_errors_and_plugins(tmp_path, monkeypatch):
    with pytest.raises(FlashDMDError, match=r"data_real '.*nope' does not exist: give an image folder.*loaded"):
        open_image_source(str(tmp_path / "nope"))
    (tmp_path / "f.csv").write_text("x")
    with pytest.raises(FlashDMDError, match="is a file"):
        open_image_source(str(tmp_path / "f.csv"))
    monkeypatch.setitem(plugins._PLUGINS, "toys", plugins.Plugin(name="toys", image_source=lambda: TensorSource(4)))
    monkeypatch.setitem(plugins._PLUGINS, "bare", plugins.Plugin(name="bare"))
    assert len(open_image_source("toys")) == 4
    with pytest.raises(FlashDMDError, match="plug-in 'bare' provides no image source"):
        open_image_source("bare")


def test_layering():
    """flashdmd.data is a bottom layer: besides the standard library it imports only the error type, the
    plug-in registry and its libraries, never training / evaluation / world / families."""
    allowed = {"torch", "numpy", "PIL", "datasets", "webdataset"} | set(sys.stdlib_module_names)
    for f in (Path(__file__).parents[1] / "flashdmd" / "data").glob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
            for name in names:
                ok = name in ("flashdmd", "flashdmd.plugins") or name.startswith("flashdmd.data") or \
                    name.split(".")[0] in allowed
                assert ok, f"{f.name} imports {name}"


# ---------------------------------------------------------------------------------------------------
# preprocessing

@pytest.mark.parametrize("mode", ["RGB", "L", "LA", "P", "RGBA", "CMYK", "1", "I;16"])
@pytest.mark.parametrize("size", [(30, 12), (12, 30), (5, 4), (8, 8)])
def test_any_mode_and_size_becomes_training_tensor(mode, size):
    if mode == "I;16":
        img = Image.fromarray(np.random.default_rng(0).integers(0, 65536, size[::-1], dtype=np.uint16))
        assert img.mode == "I;16"
    else:
        img = Image.fromarray(pixels(*size, seed=1)).convert(mode)
    for crop in ("center", "random"):
        x = to_training_tensor(img, R, crop, random.Random(0))
        assert x.shape == (3, R, R) and x.dtype == torch.float32
        assert x.min() >= -1 and x.max() <= 1


def test_mode_conversions():
    clear = Image.new("RGBA", (R, R), (0, 0, 0, 0))
    assert torch.equal(to_training_tensor(clear, R), torch.ones(3, R, R))        # transparent -> white
    p = Image.new("P", (R, R), 0)
    p.putpalette([0, 0, 0] * 256)
    p.info["transparency"] = 0
    assert torch.equal(to_training_tensor(p, R), torch.ones(3, R, R))
    white16 = Image.fromarray(np.full((R, R), 65535, dtype=np.uint16))
    assert torch.equal(to_training_tensor(white16, R), torch.ones(3, R, R))
    cmyk = Image.new("CMYK", (R, R), (0, 0, 0, 0))
    assert torch.equal(to_training_tensor(cmyk, R), torch.ones(3, R, R))


def test_center_and_random_crop_pixels():
    """A 6x4 image at R=4 needs no resize: the centre crop is columns 1..4, a random crop the columns the rng picks."""
    arr = pixels(6, 4, seed=7)
    img = Image.fromarray(arr)
    expect = lambda left: torch.from_numpy(arr[:, left:left + 4].astype(np.float32) / 127.5 - 1).permute(2, 0, 1)
    assert torch.equal(to_training_tensor(img, 4, "center"), expect(1))
    for s in range(5):
        left = random.Random(s).randint(0, 2)
        assert torch.equal(to_training_tensor(img, 4, "random", random.Random(s)), expect(left))
    tall = to_training_tensor(Image.fromarray(pixels(16, 40, 1)), 8, "center")
    assert tall.shape == (3, 8, 8)


def test_tensor_images():
    x = torch.rand(3, R, R) * 2 - 1
    assert torch.equal(to_training_tensor(x, R), x)
    big = torch.rand(3, 2 * R, 3 * R) * 2 - 1
    y = to_training_tensor(big, R, "center")
    assert y.shape == (3, R, R) and y.min() >= -1 and y.max() <= 1
    with pytest.raises(ValueError, match="float tensor"):
        to_training_tensor(torch.zeros(1, R, R), R)


# ---------------------------------------------------------------------------------------------------
# the stream

def test_every_image_once_per_epoch_and_seeded():
    n = 10
    with RealImageStream(TensorSource(n), R, 5, seed=3) as s:
        epoch0, epoch1 = ids(s.next_batch()[1] + s.next_batch()[1]), ids(s.next_batch()[1] + s.next_batch()[1])
    assert sorted(epoch0) == sorted(epoch1) == list(range(n)) and epoch0 != epoch1
    with RealImageStream(TensorSource(n), R, 5, seed=4) as s:
        assert ids(s.next_batch()[1] + s.next_batch()[1]) != epoch0


def test_process_split_equals_one_process(tmp_path):
    """Two processes with batch 2 read, batch by batch, exactly the images of one process with batch 4 (random
    crops included), each only its own; worker count does not matter either. 4 batches cross an epoch (N=11)."""
    src = ImageFolderSource(captioned_folder(tmp_path / "imgs", 11))
    kw = dict(crop="random", seed=5)
    with RealImageStream(src, R, 4, **kw) as one:
        whole = take(one, 4)
    parts = []
    for rank, workers in ((0, 0), (1, 2)):
        with RealImageStream(src, R, 2, process_index=rank, num_processes=2, num_workers=workers, **kw) as s:
            parts.append(take(s, 4))
    for k in range(4):
        assert torch.equal(whole[k][0], torch.cat([parts[0][k][0], parts[1][k][0]]))
        assert whole[k][1] == parts[0][k][1] + parts[1][k][1]
    assert whole[0][0].shape == (4, 3, R, R) and whole[0][0].abs().max() <= 1


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_is_bit_exact(tmp_path, workers):
    src = ImageFolderSource(captioned_folder(tmp_path / "imgs", 7))
    kw = dict(crop="random", seed=1, num_workers=workers)
    with RealImageStream(src, R, 3, **kw) as a:
        take(a, 3)
        state = a.state_dict()
        assert state == {"position": 9, "reads": 9, "bad_files": 0}   # consumed, not prefetched
        reference = take(a, 3)
    with RealImageStream(src, R, 3, **kw) as b:
        take(b, 1)                                                     # its workers have prefetched past this
        b.load_state_dict(state)
        resumed = take(b, 3)
        assert b.state_dict()["position"] == 18
    for (x, c), (y, d) in zip(reference, resumed):
        assert torch.equal(x, y) and c == d


@pytest.mark.parametrize("workers", [0, 2])
def test_bad_files_are_skipped_and_counted(tmp_path, workers):
    src = ImageFolderSource(captioned_folder(tmp_path / "imgs", 20, bad=(3, 10)))
    with RealImageStream(src, R, 20, num_workers=workers, max_bad_fraction=0.2) as s:
        x, captions = s.next_batch()                                   # one whole epoch
        assert x.shape == (20, 3, R, R) and "c03" not in captions and "c10" not in captions
        assert captions.count("c04") == 2 and captions.count("c11") == 2   # the next readable ones, twice
        assert s.stats() == {"reads": 22, "bad_files": 2}
        assert "03.png" in s.bad_examples[0] and len(s.bad_examples) == 2
    with RealImageStream(src, R, 20, num_workers=workers, max_bad_fraction=0.05, min_reads_before_stop=10) as s:
        with pytest.raises(FlashDMDError, match=r"^2 of 22 real images could not be read \(e.g. .*0[13]\.png.*\): fix "
                                                r"or remove them, or raise data_max_bad_fraction$"):
            s.next_batch()


def test_threshold_waits_for_enough_reads():
    with RealImageStream(TensorSource(10, bad=(0,)), R, 1, max_bad_fraction=0.01, min_reads_before_stop=1000) as s:
        take(s, 30)
        assert s.stats()["bad_files"] == 3


def test_all_bad_is_an_error_not_a_hang():
    with RealImageStream(TensorSource(3, bad=(0, 1, 2)), R, 2) as s:
        with pytest.raises(FlashDMDError, match=r"none of the 3 images of 3 test tensors could be read \(e.g. item"):
            s.next_batch()


def test_evenly_spaced_is_chunked_and_deterministic():
    s = RealImageStream(TensorSource(10), R, 4)
    chunks = list(s.evenly_spaced(5, 2))
    assert [len(c) for c in chunks] == [2, 2, 1]
    values = torch.cat(chunks)[:, 0, 0, 0]
    expect = torch.tensor([0, 2, 4, 7, 9], dtype=torch.float64) / 10 * 2 - 1   # round(linspace(0, 9, 5))
    assert_close(values.double(), expect, factor=1, mag=1.0)  # the source's i / n * 2 - 1, rounded once to float32
    assert all(torch.equal(a, b) for a, b in zip(chunks, s.evenly_spaced(5, 2)))
    assert sum(len(c) for c in s.evenly_spaced(100, 4)) == 10
    assert s.stats() == {"reads": 0, "bad_files": 0}


def test_captions(tmp_path):
    src = ImageFolderSource(captioned_folder(tmp_path / "imgs", 3))
    s = RealImageStream(src, R, 2)
    assert s.captions() == ["c00", "c01", "c02"]
    assert open_prompt_source("captions", captions_of=s.captions).sample(1, SampleRNG(0))[0] in s.captions()
    (tmp_path / "imgs" / "metadata.jsonl").unlink()
    with pytest.raises(FlashDMDError, match="^data_prompts: captions needs captions in data_real"):
        RealImageStream(ImageFolderSource(tmp_path / "imgs"), R, 2).captions()


def test_stream_argument_errors():
    with pytest.raises(FlashDMDError, match="process index 2 is outside 0..1"):
        RealImageStream(TensorSource(3), R, 2, process_index=2, num_processes=2)
    with pytest.raises(FlashDMDError, match="crop must be"):
        RealImageStream(TensorSource(3), R, 2, crop="middle")
