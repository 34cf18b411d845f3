"""numba's cache folder follows every kernel source file, not only the caller's own."""

from __future__ import annotations

import os

import numba

from kernels_cpu import jit_cache


def _package(root, files: dict[str, str]):
    folder = root / "pkg"
    folder.mkdir(exist_ok=True)
    for name, text in files.items():
        (folder / name).write_text(text)
    return folder


def test_an_edit_to_any_kernel_file_changes_the_key(tmp_path):
    folder = _package(tmp_path, {"simd.py": "A = 1\n", "matmul.py": "from simd import A\n"})
    key = jit_cache.source_key([folder])
    assert jit_cache.source_key([folder]) == key  # stable
    (folder / "simd.py").write_text("A = 2\n")  # a helper, not the caller
    assert jit_cache.source_key([folder]) != key
    (folder / "simd.py").write_text("A = 1\n")
    assert jit_cache.source_key([folder]) == key
    (folder / "new.py").write_text("")  # a new file counts too
    assert jit_cache.source_key([folder]) != key


def test_the_cache_folder_follows_numba_cache_dir_and_prunes_stale_versions(tmp_path, monkeypatch):
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(numba.config, "CACHE_DIR", "")
    stale = tmp_path / "lamina" / "0123456789abcdef"
    stale.mkdir(parents=True)
    recent = tmp_path / "lamina" / "fedcba9876543210"
    recent.mkdir()
    foreign = tmp_path / "lamina" / "not-a-version"  # not named by lamina: left alone
    foreign.mkdir()
    for old in (stale, foreign):
        os.utime(old, (0, 0))  # the epoch: long before PRUNE_AFTER_S ago
    folder = jit_cache.configure()
    assert folder.parent == tmp_path / "lamina"
    assert numba.config.CACHE_DIR == str(folder)
    assert folder.is_dir() and recent.is_dir() and foreign.is_dir() and not stale.exists()


def test_an_unwritable_cache_folder_leaves_numba_default(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")  # a file where the folder should go: mkdir fails
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(blocker))
    monkeypatch.setattr(numba.config, "CACHE_DIR", "")
    assert jit_cache.configure() is None
    assert numba.config.CACHE_DIR == ""
