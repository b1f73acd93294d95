"""An infinite, sharded, resumable stream of real-image batches, decoded lazily by DataLoader workers.

Order. Epoch e visits the source in the permutation ``randperm(N, seed * 1_000_003 + e)``. Global position p
(counting the samples of whole global batches) is image ``perm_{p // N}[p % N]``. With G = B * num_processes,
batch s of process r holds positions ``s*G + r*B ... s*G + r*B + B - 1``: N processes with batch B read together
exactly what one process with batch N*B reads, each only its own share. A random crop at position p is drawn
from a Random seeded by (seed, p), so crops do not depend on the process split or the worker count either.

Bad files. An unreadable image at position p is replaced by the next readable index (i+1, i+2, ... mod N);
every failed read is counted. The stream raises once more than ``max_bad_fraction`` of its reads failed.

State. ``position`` counts global samples consumed (not prefetched); reloading it rebuilds the workers from
there, and the following batches are bit-identical to those of an uninterrupted stream.
"""
from __future__ import annotations

import ctypes
import functools
import random
from typing import Iterator, Literal

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, default_collate, get_worker_info

from flashdmd import FlashDMDError
from flashdmd.data.images import UNREADABLE, to_training_tensor
from flashdmd.data.sources import ImageSource

_MASK = (1 << 63) - 1
_CROP_SALT = 0x63726F70  # keeps crop seeds apart from any other stream seeded by (seed, position)
MAX_BAD_EXAMPLES = 5


def epoch_permutation(n: int, seed: int, epoch: int) -> Tensor:
    """The order (n,) int64 in which epoch ``epoch`` visits a source of n images."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch)))


def crop_seed(seed: int, position: int) -> int:
    # tuples of ints hash the same in every process (PYTHONHASHSEED only salts str / bytes)
    return hash((int(seed), int(position), _CROP_SALT)) & _MASK


@functools.cache
def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def trim_heap() -> None:
    """Hand the heap's free pages back to the OS (glibc ``malloc_trim``); a worker calls it after each batch.
    glibc keeps freed per-image buffers (a few MiB each, above its sliding mmap threshold) in the heap: without
    this a worker's RSS grew by megabytes a batch without bound (benchmarks/data_memory.py, first version: one
    worker at 2.6 GiB after 200 batches of 8 at 512 px); with it, it stays flat at no measurable cost.
    No-op where libc is not glibc."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def _why(source: ImageSource, i: int, err: Exception) -> str:
    """'where (reason)' of an unreadable item, one line."""
    where = source.name(i) if hasattr(source, "name") else f"item {i}"
    reason = (str(err).splitlines() or [""])[0][:200] or type(err).__name__
    return f"{where} ({reason})"


def read_item(source: ImageSource, i: int, resolution: int, crop: str, seed: int) -> tuple:
    """(image (3, R, R) or None, caption, reads, bad reads, examples of bad items): item i, or the next
    readable one after it (i+1, i+2, ... mod N); image None when no item of the source could be read."""
    n, bad = len(source), []
    for k in range(n):
        j = (i + k) % n
        try:
            img, caption = source.read(j)
            return to_training_tensor(img, resolution, crop, random.Random(seed)), caption, k + 1, k, bad
        except UNREADABLE as e:
            if len(bad) < MAX_BAD_EXAMPLES:
                bad.append(_why(source, j, e))
    return None, None, n, n, bad


def collate(items: list[tuple]) -> dict:
    """Items of :func:`read_item` as one batch: images (B, 3, R, R) (None if an item failed), captions, counts."""
    images = [it[0] for it in items]
    # default_collate stacks straight into shared memory inside a worker (what crosses to the main process)
    batch = {"images": None if any(x is None for x in images) else default_collate(images),
             "captions": [it[1] for it in items], "reads": sum(it[2] for it in items),
             "bad_files": sum(it[3] for it in items), "bad_examples": [b for it in items for b in it[4]]}
    if get_worker_info() is not None:
        trim_heap()
    return batch


class PositionDataset(Dataset):
    """Map-style dataset over global positions p >= 0 (see the module doc): item p is :func:`read_item` of
    the image at p, cropped with the Random of (seed, p). Holds the current epoch's permutation only."""

    def __init__(self, source: ImageSource, resolution: int, crop: str, seed: int):
        self.source, self.resolution, self.crop, self.seed = source, resolution, crop, int(seed)
        self._epoch, self._perm = -1, None

    def index(self, position: int) -> int:
        n = len(self.source)
        if position // n != self._epoch:
            self._epoch = position // n
            self._perm = epoch_permutation(n, self.seed, self._epoch)
        return int(self._perm[position % n])

    def __getitem__(self, position: int) -> tuple:
        return read_item(self.source, self.index(position), self.resolution, self.crop,
                         crop_seed(self.seed, position))


class IndexDataset(Dataset):
    """Map-style dataset over fixed source indices, centre-cropped (no randomness)."""

    def __init__(self, source: ImageSource, indices: list[int], resolution: int):
        self.source, self.indices, self.resolution = source, indices, resolution

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int) -> tuple:
        return read_item(self.source, self.indices[k], self.resolution, "center", 0)


class ProcessBatches:
    """Batch sampler: this process's lists of global positions, batch s = start + s*G + r*B + [0, B)."""

    def __init__(self, start: int, batch: int, process_index: int, num_processes: int):
        self.start, self.batch, self.rank, self.world = start, batch, process_index, num_processes

    def __iter__(self) -> Iterator[list[int]]:
        base = self.start + self.rank * self.batch
        while True:
            yield list(range(base, base + self.batch))
            base += self.batch * self.world


class RealImageStream:
    """Infinite batches ``next_batch() -> (images (B, 3, R, R) float32 in [-1, 1], captions [str | None] * B)``
    of this process's share of a seeded, epoch-wise shuffled pass over ``source`` (see the module doc).

    ``num_workers`` DataLoader worker processes decode and crop (0: in this process); memory holds the index of
    the source and a few prefetched batches, never the dataset. ``max_bad_fraction``: the largest fraction of
    failed reads tolerated once ``min_reads_before_stop`` reads were made."""

    def __init__(self, source: ImageSource, resolution: int, batch_per_process: int, *,
                 crop: Literal["center", "random"] = "center", seed: int = 0, process_index: int = 0,
                 num_processes: int = 1, num_workers: int = 0, max_bad_fraction: float = 0.01,
                 min_reads_before_stop: int = 64):
        _check_args(source, resolution, batch_per_process, crop, process_index, num_processes, num_workers,
                    max_bad_fraction)
        self.source, self.resolution, self.batch_per_process = source, int(resolution), int(batch_per_process)
        self.crop, self.seed, self.num_workers = crop, int(seed), int(num_workers)
        self.process_index, self.num_processes = int(process_index), int(num_processes)
        self.max_bad_fraction, self.min_reads_before_stop = float(max_bad_fraction), int(min_reads_before_stop)
        self.position, self.reads, self.bad_files = 0, 0, 0
        self.bad_examples: list[str] = []
        self._dataset = PositionDataset(source, self.resolution, crop, self.seed)
        self._batches = None  # the DataLoader iterator; made on first use and after load_state_dict

    @property
    def global_batch(self) -> int:
        return self.batch_per_process * self.num_processes

    def next_batch(self) -> tuple[Tensor, list[str | None]]:
        """This process's next batch; advances ``position`` by the global batch."""
        out = next(self._iterator())
        self._count(out)
        self.position += self.global_batch
        return out["images"], out["captions"]

    def _iterator(self):
        if self._batches is None:
            sampler = ProcessBatches(self.position, self.batch_per_process, self.process_index, self.num_processes)
            loader = DataLoader(self._dataset, batch_sampler=sampler, num_workers=self.num_workers,
                                collate_fn=collate, pin_memory=False, persistent_workers=self.num_workers > 0)
            self._batches = iter(loader)
        return self._batches

    def _count(self, out: dict) -> None:
        """Add a batch's read counts; raise when no image could be read or too many reads failed."""
        self.reads += out["reads"]
        self.bad_files += out["bad_files"]
        self.bad_examples = (self.bad_examples + out["bad_examples"])[:MAX_BAD_EXAMPLES]
        if out["images"] is None:
            raise FlashDMDError(f"none of the {len(self.source)} images of {self.source.describe()} could be read "
                                f"(e.g. {self.bad_examples[0]})")
        if self.reads >= self.min_reads_before_stop and self.bad_files > self.max_bad_fraction * self.reads:
            raise FlashDMDError(f"{self.bad_files} of {self.reads} real images could not be read (e.g. "
                                f"{self.bad_examples[0]}): fix or remove them, or raise data_max_bad_fraction")

    def stats(self) -> dict:
        return {"reads": self.reads, "bad_files": self.bad_files}

    def state_dict(self) -> dict:
        return {"position": self.position, "reads": self.reads, "bad_files": self.bad_files}

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state``: the workers restart at its position (prefetched batches are dropped)."""
        self.close()
        self.position, self.reads, self.bad_files = int(state["position"]), int(state["reads"]), int(state["bad_files"])

    def evenly_spaced(self, n: int, batch_size: int) -> Iterator[Tensor]:
        """``min(n, N)`` images evenly spaced through the source, centre-cropped, in chunks (<= batch_size, 3, R, R):
        the same on every process, no randomness. Unreadable ones are replaced as in training (not counted)."""
        count = min(int(n), len(self.source))
        indices = torch.linspace(0, len(self.source) - 1, count).round().long().tolist() if count > 0 else []
        loader = DataLoader(IndexDataset(self.source, indices, self.resolution), batch_size=batch_size,
                            num_workers=self.num_workers, collate_fn=collate, pin_memory=False)
        for out in loader:
            if out["images"] is None:
                raise FlashDMDError(f"none of the {len(self.source)} images of {self.source.describe()} could be "
                                    f"read (e.g. {out['bad_examples'][0]})")
            yield out["images"]

    def captions(self) -> list[str]:
        """Every caption of the source (no image is decoded), in index order, items without one left out."""
        captions = [c for c in (self.source.caption(i) for i in range(len(self.source))) if c]
        if not captions:
            raise FlashDMDError("data_prompts: captions needs captions in data_real (metadata.jsonl text, a text "
                                "column, or .txt in the shards)")
        return captions

    def close(self) -> None:
        """Stop the worker processes (a later next_batch starts new ones at the current position)."""
        batches, self._batches = self._batches, None
        if batches is not None and hasattr(batches, "_shutdown_workers"):
            batches._shutdown_workers()

    def __enter__(self) -> RealImageStream:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _check_args(source, resolution, batch, crop, process_index, num_processes, num_workers, max_bad_fraction):
    if len(source) == 0:
        raise FlashDMDError(f"{source.describe()} holds no images")
    if resolution < 1 or batch < 1 or num_workers < 0:
        raise FlashDMDError(f"resolution ({resolution}) and batch ({batch}) must be >= 1, workers ({num_workers}) >= 0")
    if crop not in ("center", "random"):
        raise FlashDMDError(f"data crop must be 'center' or 'random', not {crop!r}")
    if not 0 <= process_index < num_processes:
        raise FlashDMDError(f"process index {process_index} is outside 0..{num_processes - 1}")
    if not 0.0 <= max_bad_fraction <= 1.0:
        raise FlashDMDError(f"data_max_bad_fraction must lie in [0, 1], not {max_bad_fraction}")
