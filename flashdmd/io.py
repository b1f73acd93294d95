"""Writes that never leave a half-written file behind, and a full disk as one line.

* :func:`atomic_write` / :func:`atomic_write_text`: a file written to ``NAME.tmp`` beside it, fsynced, then renamed
  over ``NAME`` (atomic on POSIX): a reader sees the old file or the new one, never a part.
* :func:`atomic_save`: the same for a library that writes to a path itself (safetensors' ``save_file``, numpy).
* :func:`write_folder`: a folder filled into ``NAME.tmp`` by a callback, then swapped in for ``NAME``.
* :func:`read_json`: a JSON record read back, or one line saying which file is unreadable and what to do.
* :func:`writing`: the one translation of a failed write -- an ``OSError`` or safetensors' ``SafetensorError``
  (raised from its Rust code; it wraps the ``io::Error`` as text, "... (os error 28)") -- into a
  :class:`~flashdmd.FlashDMDError` of one line naming what was written, where, and for a full disk, a quota or a
  file-size limit (ENOSPC, EDQUOT, EFBIG) about how many bytes the write needs and how many the filesystem has
  free. The partial output is removed first.

The bottom layer: imports nothing of flashdmd but FlashDMDError (checkpoints, the run folder, sample grids,
``flashdmd sample``, export, the evaluation reports and the world's pretraining all write through it; every JSON
file flashdmd reads -- run records, model folders' configs, metrics -- is read through :func:`read_json`).
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
from pathlib import Path
from typing import Callable, Iterable

from safetensors import SafetensorError

from flashdmd import FlashDMDError

# the errnos of "the disk cannot take these bytes", with what to tell the user
SPACE_ERRNOS = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file too large for a file-size limit (ulimit -f) or the filesystem",
}


def os_errno(exc: BaseException) -> int | None:
    """The OS error number behind a failed write: ``OSError.errno``, or the ``(os error N)`` that safetensors
    puts into a ``SafetensorError``'s text; None when there is none (a safetensors usage error, not I/O)."""
    if isinstance(exc, OSError):
        return exc.errno
    found = re.search(r"\(os error (\d+)\)", str(exc))
    return int(found.group(1)) if found else None


def is_write_error(exc: BaseException) -> bool:
    """True for an error of the operating system while writing (not a programming error)."""
    return isinstance(exc, OSError) or (isinstance(exc, SafetensorError) and os_errno(exc) is not None)


def human_bytes(n: float) -> str:
    """1234567 -> '1.2 MB' (decimal units, as df -H)."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def free_bytes(path: str | Path) -> int | None:
    """Bytes free on the filesystem holding ``path`` (or its nearest existing parent); None if unknown."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def write_error(what: str, where: str | Path, exc: BaseException, need_bytes: int | None = None,
                hint: str | None = None) -> FlashDMDError:
    """The one-line error of a failed write of ``what`` (e.g. "checkpoint step_00000002") into ``where``; ``hint``
    (what to do) ends it."""
    code = os_errno(exc)
    tail = f"; {hint}" if hint else ""
    if code in SPACE_ERRNOS:
        free = free_bytes(where)
        sizes = [f"it needs about {human_bytes(need_bytes)}" if need_bytes else None,
                 f"{human_bytes(free)} free on that filesystem" if free is not None else None]
        sizes = "; ".join(s for s in sizes if s)
        return FlashDMDError(f"cannot write {what} to {where}: {SPACE_ERRNOS[code]}" + (f" ({sizes})" if sizes else "")
                             + (tail or "; free some space (or raise the limit) and run again"))
    if isinstance(exc, OSError):
        reason = exc.strerror or str(exc)
    else:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return FlashDMDError(f"cannot write {what} to {where}: {reason}{tail}")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


@contextlib.contextmanager
def writing(what: str, where: str | Path, need_bytes: int | None = None, cleanup: Iterable[Path] = (),
            hint: str | None = None):
    """Run a block of writes; a write error inside becomes :func:`write_error`'s one line, after removing
    ``cleanup`` (the block's partial output). Other exceptions pass through untouched."""
    try:
        yield
    except (OSError, SafetensorError) as e:
        if not is_write_error(e):
            raise
        for p in cleanup:
            _remove(Path(p))
        raise write_error(what, where, e, need_bytes, hint) from None


def _fsync(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path: str | Path, write: Callable[[object], None], what: str | None = None,
                 need_bytes: int | None = None) -> None:
    """``write(binary file)`` into ``path`` atomically (``path.tmp``, fsync, rename); on a write error the old
    file stays as it was, the temporary one is removed, and the error is one line."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with writing(what or path.name, path.parent, need_bytes, cleanup=[tmp]):
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)


def atomic_save(path: str | Path, save: Callable[[Path], None], what: str | None = None,
                need_bytes: int | None = None) -> None:
    """``save(tmp_path)`` writes the file (a library's own writer, e.g. safetensors' ``save_file``) at ``path.tmp``,
    which is fsynced and renamed over ``path``: the same guarantees as :func:`atomic_write`."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with writing(what or path.name, path.parent, need_bytes, cleanup=[tmp]):
        save(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)


def atomic_write_text(path: str | Path, text: str, what: str | None = None) -> None:
    """``text`` (UTF-8) into ``path`` atomically (see :func:`atomic_write`)."""
    data = text.encode("utf-8")
    atomic_write(path, lambda f: f.write(data), what, len(data))


def write_folder(folder: str | Path, fill: Callable[[Path], None], what: str | None = None,
                 need_bytes: int | None = None) -> None:
    """A folder written whole: ``fill(tmp)`` writes into ``FOLDER.tmp``, which then replaces ``folder`` (the old
    one renamed to ``FOLDER.old`` first and deleted last, so that some complete version exists at every moment).
    On a write error the partial ``FOLDER.tmp`` is removed, the old folder is untouched, and the error is one line;
    any other exception out of ``fill`` removes it too and passes through."""
    folder = Path(folder)
    tmp, old = folder.with_name(folder.name + ".tmp"), folder.with_name(folder.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with writing(what or folder.name, folder.parent, need_bytes, cleanup=[tmp]):
            tmp.mkdir(parents=True)
            fill(tmp)
            for f in tmp.rglob("*"):
                if f.is_file():
                    _fsync(f)
    except BaseException:
        _remove(tmp)
        raise
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        folder.rename(old)
    tmp.rename(folder)
    _fsync(folder.parent)
    shutil.rmtree(old, ignore_errors=True)


def read_json(path: str | Path, what: str | None = None, hint: str | None = None, want: type | None = dict):
    """The JSON value in ``path`` (a ``want``, default a dict; None: any). A missing, unreadable, non-UTF-8 or
    malformed file, or another JSON type, is one FlashDMDError line: "WHAT is not readable JSON (reason)" --
    ``what`` defaults to the path -- ending in ``; hint`` (what to do) when given."""
    path = Path(path)
    what = what or str(path)
    tail = f"; {hint}" if hint else ""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise FlashDMDError(f"{what} is not readable JSON ({e.strerror or e}){tail}") from None
    except UnicodeDecodeError:
        raise FlashDMDError(f"{what} is not readable JSON (not UTF-8 text){tail}") from None
    except ValueError as e:
        raise FlashDMDError(f"{what} is not readable JSON ({str(e).splitlines()[0]}){tail}") from None
    if want is not None and not isinstance(data, want):
        kind = {dict: "an object", list: "a list"}.get(want, want.__name__)
        raise FlashDMDError(f"{what} is not {kind} in JSON (it holds a {type(data).__name__}){tail}")
    return data
