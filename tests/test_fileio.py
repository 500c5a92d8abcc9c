"""conditioner.fileio: a file or folder appears complete at its path, or the old one stays untouched."""

import os
import stat

import pytest

from conditioner.fileio import TEMP_PREFIX, atomic_dir, atomic_path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_atomic_path_replaces_the_file_with_default_permissions_and_leaves_no_temp(tmp_path):
    path = tmp_path / "sub" / "out.bin"
    with atomic_path(path) as tmp:
        assert os.path.dirname(tmp) == str(path.parent) and tmp.endswith(".bin")
        assert os.path.basename(tmp).startswith(TEMP_PREFIX) and not path.exists()
        with open(tmp, "wb") as f:
            f.write(b"new")
    assert path.read_bytes() == b"new"
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~_umask()
    assert os.listdir(path.parent) == ["out.bin"]


@pytest.mark.parametrize("error", [ValueError("boom"), KeyboardInterrupt()])
def test_atomic_path_failure_keeps_the_old_file_and_removes_the_temp(tmp_path, error):
    path = tmp_path / "out.bin"
    path.write_bytes(b"old")
    with pytest.raises(type(error)), atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(b"half")
        raise error
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["out.bin"]


def test_atomic_path_syncs_the_file_and_then_its_folder(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync

    def fsync(fd):
        synced.append(stat.S_ISDIR(os.fstat(fd).st_mode))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with atomic_path(tmp_path / "a.txt") as tmp:
        with open(tmp, "w") as f:
            f.write("x")
    assert synced == [False, True]


def test_atomic_dir_replaces_a_folder_and_keeps_the_old_one_on_failure(tmp_path):
    path = tmp_path / "ckpt"
    path.mkdir()
    (path / "old.txt").write_text("old")
    with pytest.raises(RuntimeError), atomic_dir(path) as tmp:
        (tmp_path / tmp / "new.txt").write_text("half")
        raise RuntimeError("crash while saving")
    assert os.listdir(path) == ["old.txt"] and os.listdir(tmp_path) == ["ckpt"]
    with atomic_dir(path) as tmp:
        (tmp_path / tmp / "new.txt").write_text("new")
    assert os.listdir(path) == ["new.txt"] and os.listdir(tmp_path) == ["ckpt"]
