"""Real-image sources behind one protocol, and the one function that picks a source from a config string.

A source is a random-access list of (image, caption) pairs that keeps only an index in memory (paths, row numbers
or tar offsets), never decoded images: listing reads no image, ``read(i)`` decodes one. Indexes are kept in
numpy arrays rather than lists of Python strings, so that forked DataLoader workers reading them do not copy
them page by page (every touch of a Python object writes its reference count).
"""
from __future__ import annotations

import json
import os
import posixpath
from pathlib import Path
from typing import Iterable, Protocol, runtime_checkable

import numpy as np
from PIL import Image
from torch import Tensor

from flashdmd import FlashDMDError, plugins
from flashdmd.data.images import load_image
from flashdmd.data.shards import WebDatasetSource

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CAPTION_FIELDS = ("text", "caption")
HF_DISK_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")


@runtime_checkable
class ImageSource(Protocol):
    """Random access to N real images and their captions.

    ``read(i)``     (image, caption): a PIL image (any mode and size), or for in-memory sources a float tensor
                    (3, H, W) in [-1, 1]; caption or None. Raises OSError / ValueError / PIL's errors when item
                    i cannot be read (the stream skips it and counts it).
    ``caption(i)``  the caption alone, without decoding the image (None when the item has none).
    ``describe()``  one line for logs: what and how many.
    Optional ``name(i) -> str``: where item i lives (a path), for error messages.
    """

    def __len__(self) -> int: ...

    def read(self, i: int) -> tuple[Image.Image | Tensor, str | None]: ...

    def caption(self, i: int) -> str | None: ...

    def describe(self) -> str: ...


class StringTable:
    """An immutable list of str-or-None held as one UTF-8 buffer plus offsets (two numpy arrays, no Python
    object per entry)."""

    def __init__(self, strings: Iterable[str | None]):
        encoded = [None if s is None else s.encode("utf-8") for s in strings]
        sizes = np.array([-1 if b is None else len(b) for b in encoded], dtype=np.int64)
        self._ends = np.cumsum(np.maximum(sizes, 0))
        self._none = sizes < 0
        self._blob = np.frombuffer(b"".join(b for b in encoded if b), dtype=np.uint8)

    def __len__(self) -> int:
        return len(self._none)

    def __getitem__(self, i: int) -> str | None:
        if self._none[i]:
            return None
        start = int(self._ends[i - 1]) if i else 0
        return self._blob[start:int(self._ends[i])].tobytes().decode("utf-8")

    def count(self) -> int:
        """How many entries are not None."""
        return int((~self._none).sum())


def _list_images(root: Path) -> list[str]:
    """Image files under ``root`` (recursive, hidden files and folders skipped), as sorted relative posix paths."""
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        rel = Path(folder).relative_to(root).as_posix()
        found += [posixpath.normpath(posixpath.join(rel, f)) for f in files
                  if not f.startswith(".") and Path(f).suffix.lower() in IMAGE_EXTS]
    return sorted(found)


def _metadata_rows(path: Path) -> Iterable[tuple[str, str | None]]:
    """(file_name, caption) of each line of one metadata.jsonl (HF imagefolder convention)."""
    with open(path, encoding="utf-8", errors="replace") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                name = row["file_name"]
            except (ValueError, KeyError, TypeError):
                raise FlashDMDError(f"{path} line {n} is not a JSON object with a file_name: write one "
                                    '{"file_name": ..., "text": ...} object per line') from None
            text = next((row[k] for k in CAPTION_FIELDS if isinstance(row.get(k), str)), None)
            yield str(name), text


def _read_captions(root: Path) -> dict[str, str]:
    """Captions by image path relative to ``root``, from every metadata.jsonl below it (its file_name is
    relative to the folder that holds it)."""
    captions = {}
    for meta in sorted(root.rglob("metadata.jsonl")):
        base = meta.parent.relative_to(root).as_posix()
        for name, text in _metadata_rows(meta):
            if text is not None:
                captions[posixpath.normpath(posixpath.join(base, name))] = text.strip()
    return captions


class ImageFolderSource:
    """Every .png .jpg .jpeg .webp .bmp below ``root`` (sorted by relative path), with optional captions from
    metadata.jsonl files (HF ``imagefolder`` layout: ``file_name`` relative to that file's folder, caption in
    ``text`` or ``caption``). Rows naming files that are not there are ignored."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise FlashDMDError(f"image folder {self.root} not found")
        rel = _list_images(self.root)
        if not rel:
            raise FlashDMDError(f"image folder {self.root} holds no images ({' '.join(IMAGE_EXTS)}, searched "
                                "recursively)")
        captions = _read_captions(self.root)
        self._paths = StringTable(rel)
        self._captions = StringTable(captions.get(r) for r in rel)

    def __len__(self) -> int:
        return len(self._paths)

    def name(self, i: int) -> str:
        return str(self.root / self._paths[i])

    def caption(self, i: int) -> str | None:
        return self._captions[i]

    def read(self, i: int) -> tuple[Image.Image, str | None]:
        return load_image(self.name(i)), self.caption(i)

    def describe(self) -> str:
        return f"image folder {self.root} ({len(self)} images, {self._captions.count()} with captions)"


class HFDiskSource:
    """A dataset written by HF datasets' ``save_to_disk`` (memory-mapped Arrow; a DatasetDict's "train" split).
    The image is its first column of feature type ``datasets.Image`` (decoded here, one item at a time), the
    caption its "text" or "caption" string column when present."""

    def __init__(self, path: str | Path):
        # imported here: `datasets` costs a second of imports (pandas, pyarrow) that only this source needs
        import datasets
        self.path = Path(path).expanduser()
        ds = _load_train_split(self.path)
        self._image_col = next((c for c, f in ds.features.items() if isinstance(f, datasets.Image)), None)
        if self._image_col is None:
            raise FlashDMDError(f"dataset {self.path} has no column of feature type Image (columns: "
                                f"{', '.join(ds.column_names)}): cast the image column to datasets.Image()")
        # decode=False: rows come back as {"bytes", "path"} and PIL decodes them in read(), with our error handling
        self._images = ds.select_columns([self._image_col]).cast_column(self._image_col, datasets.Image(decode=False))
        self._caption_col = next((c for c in CAPTION_FIELDS if c in ds.features
                                  and getattr(ds.features[c], "dtype", None) in ("string", "large_string")), None)
        self._captions = ds.select_columns([self._caption_col]) if self._caption_col else None

    def __len__(self) -> int:
        return len(self._images)

    def name(self, i: int) -> str:
        return f"{self.path} row {i}"

    def caption(self, i: int) -> str | None:
        if self._captions is None:
            return None
        text = self._captions[int(i)][self._caption_col]
        return text.strip() if isinstance(text, str) else None

    def read(self, i: int) -> tuple[Image.Image, str | None]:
        cell = self._images[int(i)][self._image_col] or {}
        if cell.get("bytes"):
            return load_image(cell["bytes"]), self.caption(i)
        if cell.get("path"):
            return load_image(cell["path"]), self.caption(i)
        raise ValueError(f"row {i} holds no image")

    def describe(self) -> str:
        captions = f"captions from column {self._caption_col!r}" if self._caption_col else "no captions"
        return f"save_to_disk dataset {self.path} ({len(self)} images in column {self._image_col!r}, {captions})"


def _load_train_split(path: Path):
    """The Dataset at ``path``, or the "train" split of a DatasetDict there."""
    import datasets  # imported here, as in HFDiskSource: only this source pays for it
    try:
        ds = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError, OSError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise FlashDMDError(f"{path} is not a dataset written by datasets' save_to_disk ({reason})") from None
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise FlashDMDError(f"dataset {path} has splits {', '.join(ds)} but no 'train' split: give the "
                                "folder of the split to use")
        ds = ds["train"]
    return ds


def open_image_source(spec: str | Path) -> ImageSource:
    """The source a ``data_real`` value names, tried in this order: a loaded plug-in with an image source;
    a folder with *.tar files, a .tar file or a brace pattern (``shards-{000..009}.tar``) -> WebDatasetSource;
    a folder written by ``save_to_disk`` (dataset_info.json, state.json or dataset_dict.json) -> HFDiskSource;
    any other folder -> ImageFolderSource."""
    spec = str(spec)
    if plugins.find(spec) is not None:
        return plugins.provider(spec, "image_source", "data_real")()
    path = Path(spec).expanduser()
    if path.is_dir():
        if any(path.glob("*.tar")):
            return WebDatasetSource(path)
        if any((path / marker).is_file() for marker in HF_DISK_MARKERS):
            return HFDiskSource(path)
        return ImageFolderSource(path)
    if path.suffix == ".tar" or "{" in spec:
        return WebDatasetSource(spec)
    loaded = ", ".join(plugins.registered()) or "none"
    what = "is a file" if path.exists() else "does not exist"
    raise FlashDMDError(f"data_real {spec!r} {what}: give an image folder, a save_to_disk dataset folder, WebDataset "
                        f".tar shards (a .tar, a folder of them or a pattern like shards-{{000..009}}.tar) or a "
                        f"loaded plug-in (loaded: {loaded})")
