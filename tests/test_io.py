"""flashdmd/io.py's JSON records and atomic saves: what a reader gets back, and the one line it gets otherwise.
(A full disk during these writes: tests/test_disk_full.py.)"""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from flashdmd import FlashDMDError, io


def test_read_json_returns_the_record_and_says_in_one_line_what_is_wrong(tmp_path):
    good = tmp_path / "good.json"
    io.atomic_write_text(good, '{"a": [1, 2]}')
    assert io.read_json(good) == {"a": [1, 2]}
    cases = {"missing.json": None, "broken.json": b"{not json", "latin1.json": b'{"a": "\xe9"}',
             "list.json": b"[1, 2]"}
    reasons = {"missing.json": "No such file", "broken.json": "Expecting property name", "latin1.json": "not UTF-8",
               "list.json": "not an object in JSON (it holds a list)"}
    for name, data in cases.items():
        if data is not None:
            (tmp_path / name).write_bytes(data)
        with pytest.raises(FlashDMDError) as e:
            io.read_json(tmp_path / name, hint="re-save it")
        msg = str(e.value)
        assert msg.startswith(str(tmp_path / name)) and reasons[name] in msg and msg.endswith("; re-save it"), msg
        assert "\n" not in msg
    assert io.read_json(tmp_path / "list.json", want=None) == [1, 2]
    with pytest.raises(FlashDMDError, match=r"^the run record is not readable JSON"):
        io.read_json(tmp_path / "broken.json", "the run record")


def test_atomic_save_keeps_the_old_file_when_the_writer_fails(tmp_path):
    path = tmp_path / "w.safetensors"
    io.atomic_save(path, lambda tmp: save_file({"x": torch.ones(3)}, str(tmp)))
    assert torch.equal(load_file(str(path))["x"], torch.ones(3))

    def fails(tmp):
        tmp.write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    with pytest.raises(FlashDMDError, match=r"^cannot write the weights to .*no space left on device"):
        io.atomic_save(path, fails, "the weights")
    assert torch.equal(load_file(str(path))["x"], torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.safetensors"]
