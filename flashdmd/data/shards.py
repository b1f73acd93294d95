"""WebDataset .tar shards with random access: an index of member offsets, built once by reading tar headers.

A WebDataset sample is a run of consecutive tar members sharing a key (the member name up to the first dot
of its base name): ``000017.jpg`` + ``000017.txt`` is sample ``000017`` with fields ``jpg`` and ``txt``.
The index keeps, per sample, its shard and the byte offset and size of its image and caption (numpy arrays,
~44 bytes a sample); reading item i opens the shard, seeks and reads just those bytes. Shards must be
uncompressed tar (a .tar.gz has no offsets to seek to).
"""
from __future__ import annotations

import re
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from flashdmd import FlashDMDError
from flashdmd.data.images import load_image

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
CAPTION_KEYS = ("txt", "caption", "text")
_KEY_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's base_plus_ext
_BRACE = re.compile(r"\{([^{}]*)\}")


def expand_braces(pattern: str) -> list[str]:
    """``a-{000..002}.tar`` -> a-000.tar a-001.tar a-002.tar; ``{a,b}`` -> a b; several groups multiply."""
    m = _BRACE.search(pattern)
    if m is None:
        return [pattern]
    body = m.group(1)
    rng = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if rng:
        lo, hi = rng.groups()
        width = len(lo) if lo.startswith("0") and len(lo) > 1 else 0
        items = [f"{k:0{width}d}" for k in range(int(lo), int(hi) + 1)]
    elif "," in body:
        items = body.split(",")
    else:
        raise FlashDMDError(f"shard pattern {pattern!r}: {{{body}}} is neither a range {{000..009}} nor a list {{a,b}}")
    if not items:
        raise FlashDMDError(f"shard pattern {pattern!r}: the range {{{body}}} is empty")
    return [out for item in items for out in expand_braces(pattern[:m.start()] + item + pattern[m.end():])]


def shard_paths(spec: str | Path) -> list[Path]:
    """The shards a spec names: a folder's *.tar (sorted), one .tar file, or a brace pattern (all must exist)."""
    path = Path(spec).expanduser()
    if path.is_dir():
        shards = sorted(path.glob("*.tar"))
        if not shards:
            raise FlashDMDError(f"folder {path} holds no .tar shards")
        return shards
    shards = [Path(p).expanduser() for p in expand_braces(str(spec))]
    missing = [p for p in shards if not p.is_file()]
    if missing:
        raise FlashDMDError(f"WebDataset shards {spec}: {len(missing)} of {len(shards)} shard files not found "
                            f"(e.g. {missing[0]})")
    return shards


def _flush(rows: list, fields: dict) -> None:
    """Append (img_off, img_size, header_off, cap_off, cap_size) of one sample, if it has an image."""
    image = next((fields[k] for k in IMAGE_KEYS if k in fields), None)
    if image is None:
        return
    cap = next((fields[k] for k in CAPTION_KEYS if k in fields), None)
    rows.append((image.offset_data, image.size, image.offset,
                 -1 if cap is None else cap.offset_data, -1 if cap is None else cap.size))


def index_shard(path: Path) -> np.ndarray:
    """(samples, 5) int64: image data offset, image size, image header offset, caption offset, caption size
    (-1 when there is no caption). Reads only the 512-byte member headers."""
    rows, key, fields = [], None, {}
    try:
        with tarfile.open(path, "r:") as tf:
            for member in tf:
                m = _KEY_EXT.match(member.name) if member.isfile() else None
                if m is None:
                    continue
                if m.group(1) != key:
                    _flush(rows, fields)
                    key, fields = m.group(1), {}
                fields.setdefault(m.group(2).lower(), member)
            _flush(rows, fields)
            # tarfile ends quietly at a cut-off header; a complete archive has its end-of-archive block(s) there
            if path.stat().st_size < tf.offset + tarfile.BLOCKSIZE:
                raise tarfile.ReadError(f"it ends at byte {path.stat().st_size} inside a member header")
    except (tarfile.TarError, OSError) as e:
        raise FlashDMDError(f"WebDataset shard {path} cannot be indexed ({e}): it must be a complete, "
                            "uncompressed .tar (re-write or remove it)") from None
    return np.array(rows, dtype=np.int64).reshape(-1, 5)


def _read_bytes(path: Path, offset: int, size: int) -> bytes:
    with open(path, "rb") as fh:
        fh.seek(offset)
        data = fh.read(size)
    if len(data) != size:
        raise OSError(f"{path}: member at byte {offset} is truncated")
    return data


class WebDatasetSource:
    """Samples of WebDataset shards with an image under jpg / jpeg / png / webp, captions under txt / caption /
    text (UTF-8). ``spec``: a folder of *.tar, one .tar, or a brace pattern ``shards-{000..009}.tar``."""

    def __init__(self, spec: str | Path):
        self.spec = str(spec)
        self.shards = shard_paths(spec)
        per_shard = [index_shard(p) for p in self.shards]
        self._shard = np.concatenate([np.full(len(ix), k, dtype=np.int32) for k, ix in enumerate(per_shard)])
        self._index = np.concatenate(per_shard)
        if not len(self._index):
            raise FlashDMDError(f"WebDataset shards {self.spec} hold no sample with an image (keys "
                                f"{', '.join(IMAGE_KEYS)})")

    def __len__(self) -> int:
        return len(self._index)

    def name(self, i: int) -> str:
        """shard path:member name of item i's image (read back from its tar header)."""
        shard, header = self.shards[self._shard[i]], int(self._index[i, 2])
        try:
            with tarfile.open(shard, "r:") as tf:
                tf.fileobj.seek(header)
                return f"{shard}:{tarfile.TarInfo.fromtarfile(tf).name}"
        except (tarfile.TarError, OSError):
            return f"{shard} (member at byte {header})"

    def caption(self, i: int) -> str | None:
        offset, size = (int(v) for v in self._index[i, 3:5])
        if size < 0:
            return None
        try:
            return _read_bytes(self.shards[self._shard[i]], offset, size).decode("utf-8", errors="replace").strip()
        except OSError:
            return None  # an unreadable caption does not make the image unusable

    def read(self, i: int) -> tuple[Image.Image, str | None]:
        offset, size = (int(v) for v in self._index[i, :2])
        return load_image(_read_bytes(self.shards[self._shard[i]], offset, size)), self.caption(i)

    def describe(self) -> str:
        captioned = int((self._index[:, 4] >= 0).sum())
        return (f"WebDataset shards {self.spec} ({len(self.shards)} shards, {len(self)} images, "
                f"{captioned} with captions)")
