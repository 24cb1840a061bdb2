"""The one all-or-nothing write (`melfusion.files.replacing`): whole or absent, and the umask's mode."""

from __future__ import annotations

import os
import stat

import numpy as np
import pytest

from melfusion import files
from melfusion.audio import write_wav


@pytest.fixture
def umask():
    """Set the process umask for one test, then put the old one back."""
    old = os.umask(0o022)
    os.umask(old)
    yield lambda mask: os.umask(mask)
    os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize(("mask", "file_mode", "folder_mode"), [(0o022, 0o644, 0o755), (0o027, 0o640, 0o750)])
def test_files_and_folders_get_the_umasks_mode(tmp_path, umask, mask, file_mode, folder_mode):
    umask(mask)
    wav = write_wav(tmp_path / "out" / "clip.wav", np.zeros(160, dtype=np.float32), 16000)
    with files.replacing(tmp_path / "bundle", folder=True) as staging:
        (staging / "weights").write_bytes(b"w")
    assert mode(wav) == file_mode  # mkstemp's 0600 would hide a clip from the server that serves it
    assert mode(tmp_path / "bundle") == folder_mode


def test_a_failed_write_leaves_neither_file_nor_temporary(tmp_path, monkeypatch):
    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(files.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        write_wav(tmp_path / "clip.wav", np.zeros(160, dtype=np.float32), 16000)
    assert list(tmp_path.iterdir()) == []


def test_a_folder_is_replaced_whole_and_an_interrupted_one_leaves_the_old(tmp_path):
    target = tmp_path / "step-0000010"
    with files.replacing(target, folder=True) as staging:
        (staging / "weights").write_text("first")
    with pytest.raises(KeyboardInterrupt), files.replacing(target, folder=True) as staging:
        (staging / "weights").write_text("half")
        raise KeyboardInterrupt
    assert (target / "weights").read_text() == "first" and os.listdir(tmp_path) == ["step-0000010"]
    with files.replacing(target, folder=True) as staging:
        (staging / "weights").write_text("second")
    assert (target / "weights").read_text() == "second" and os.listdir(tmp_path) == ["step-0000010"]
