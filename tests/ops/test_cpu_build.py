"""The compiled CPU kernels' build directory and its lock: a lock left by a killed build is removed (torch
would wait on it forever); one held by a build in progress is waited for."""

import os
import threading
import time
import warnings

import pytest

from mixcon.ops import cpu


def test_build_directory_per_python_and_torch(tmp_path, monkeypatch):
    import sys

    import torch

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    d = cpu.build_directory("mixcon_x")
    folder = os.path.relpath(d, tmp_path).split(os.sep)
    assert folder[1] == "mixcon_x" and len(folder) == 2
    assert folder[0].startswith(f"py{sys.version_info.major}{sys.version_info.minor}")
    assert folder[0].endswith("-torch" + torch.__version__)


def test_stale_lock_is_removed_with_a_warning(tmp_path):
    lock = tmp_path / "lock"
    lock.touch()
    old = time.time() - 2 * cpu.STALE_LOCK_S
    os.utime(lock, (old, old))
    with pytest.warns(UserWarning, match="killed part-way"):
        assert cpu.clear_stale_lock(str(tmp_path)) is True
    assert not lock.exists()


def test_lock_of_a_build_in_progress_is_waited_for(tmp_path):
    lock = tmp_path / "lock"
    lock.touch()
    timer = threading.Timer(0.3, lock.unlink)  # the other build ends and releases its lock
    timer.start()
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cpu.clear_stale_lock(str(tmp_path), poll_s=0.05) is False
    assert time.perf_counter() - t0 >= 0.25
    timer.join()


def test_young_lock_becomes_stale_while_waiting(tmp_path):
    (tmp_path / "lock").touch()
    with pytest.warns(UserWarning, match="build lock"):
        assert cpu.clear_stale_lock(str(tmp_path), stale_s=0.2, poll_s=0.05) is True
    assert not (tmp_path / "lock").exists()


def test_no_lock_returns_at_once(tmp_path):
    assert cpu.clear_stale_lock(str(tmp_path)) is False
