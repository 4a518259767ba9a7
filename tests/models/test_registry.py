"""read_checkpoint's errors say what the file is, in one line, with torch's own error chained."""
from __future__ import annotations

import os

import pytest
import torch

from lungcore.models.registry import read_checkpoint


class _Evil:
    def __reduce__(self):
        return (os.system, ("true",))


def test_unreadable_checkpoints_say_why(tmp_path):
    good = tmp_path / "good.pt"
    torch.save({"model": "cmml", "state_dict": {}}, good)
    cases = {
        "empty.pt": (b"", "the file is empty"),
        "text.pt": (b"i am garbage", "not a file written by torch.save"),
        "cut.pt": (good.read_bytes()[:200], "torch.save's zip archive is damaged or cut short"),
    }
    torch.save({"model": "cmml", "state_dict": _Evil()}, tmp_path / "evil.pt")
    for name, (data, _) in cases.items():
        (tmp_path / name).write_bytes(data)
    cases["evil.pt"] = (None, "it holds Python objects other than tensors and plain data")
    for name, (_, reason) in cases.items():
        with pytest.raises(ValueError) as caught:
            read_checkpoint(tmp_path / name)
        message = str(caught.value)
        assert message.startswith(f"checkpoint {tmp_path / name} is corrupt or not a lungcore checkpoint ({reason}")
        assert "\n" not in message and caught.value.__cause__ is not None, name
    assert read_checkpoint(good)["model"] == "cmml"


def test_a_folder_is_named_as_one(tmp_path):
    with pytest.raises(ValueError, match="is a folder, not a checkpoint file; pass a .pt file"):
        read_checkpoint(tmp_path)
    (tmp_path / "last.pt").write_bytes(b"x")
    with pytest.raises(ValueError, match=f"it holds last.pt: pass {tmp_path / 'last.pt'}"):
        read_checkpoint(tmp_path)
