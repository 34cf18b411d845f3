"""A disk cache of GGUF files repacked into lamina's block layout, so a second start maps it.

Repacking a GGUF's blocks costs about 5 s per GB of file (numpy, every byte rewritten into
16-row groups); mapping the result back costs nothing but the page cache. The first load of
a file writes its repacked weights next to lamina's other caches, as a checkpoint's
safetensors file; later loads map that file (the weights' pages are shared with the page
cache, so they count once). An entry is keyed by the GGUF's resolved path, size,
inode and modification and change times, and by the source of the code that shapes the
weights (the loaders, the weight types, the kernels), so an edited file or a new layout
repacks again. A folder per GGUF keeps only its newest entry, and the folders of GGUFs that
no longer exist are removed when an entry is written. Nothing here is needed for
correctness: a cache that cannot be written or read is skipped (and said with --verbose),
and LAMINA_REPACK_CACHE=0 turns it off.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from engine.loader import checkpoint
from engine.weights import ModelWeights
from kernels_cpu.jit_cache import cache_dir, source_key

ENV = "LAMINA_REPACK_CACHE"
_ROOT = Path(__file__).resolve().parents[2]
# The code whose output the cache holds: any edit makes new keys.
_LAYOUT_FOLDERS = (_ROOT / "engine" / "loader", _ROOT / "kernels_cpu")
_SOURCE_NOTE = "source.txt"  # in each GGUF's folder: the path it caches


def enabled() -> bool:
    return os.environ.get(ENV, "1") != "0"


@functools.cache
def _layout_key() -> str:
    """A hash of the code that shapes cached weights (it does not change while running)."""
    weights_source = hashlib.sha256((_ROOT / "engine" / "weights.py").read_bytes()).hexdigest()
    return source_key(list(_LAYOUT_FOLDERS)) + weights_source


def entry_path(gguf: Path) -> Path:
    """Where the repacked weights of `gguf` (as it is now) are cached."""
    resolved = gguf.resolve()
    stat = resolved.stat()
    layout = _layout_key()
    folder = hashlib.sha256(str(resolved).encode()).hexdigest()[:16]
    identity = (stat.st_size, stat.st_ino, stat.st_mtime_ns, stat.st_ctime_ns)
    state = f"{identity}:{layout}"
    key = hashlib.sha256(state.encode()).hexdigest()[:16]
    return cache_dir() / "repacked" / folder / f"{key}.safetensors"


def load(gguf: Path, num_layers: int) -> tuple[ModelWeights | None, str]:
    """The cached weights of `gguf` (None when there are none usable) and what happened."""
    path = entry_path(gguf)
    if not path.is_file():
        return None, ""
    try:
        return checkpoint.load_weights_file(path, num_layers), f"mapped from the cache {path}"
    except Exception as exc:  # noqa: BLE001 (a bad entry is repacked again, never fatal)
        path.unlink(missing_ok=True)
        return None, f"dropped a bad cache entry {path} ({exc})"


def store(gguf: Path, weights: ModelWeights) -> str:
    """Write `weights` as the cache entry of `gguf` (atomically), remove its older entries and
    those of GGUFs that are gone; returns what happened."""
    partial = None
    try:
        path = entry_path(gguf)
        path.parent.mkdir(parents=True, exist_ok=True)
        (path.parent / _SOURCE_NOTE).write_text(str(gguf.resolve()), encoding="utf-8")
        with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".partial", delete=False) as f:
            partial = Path(f.name)
        checkpoint.save_weights_file(weights, partial)
        partial.replace(path)
        for old in path.parent.glob("*.safetensors"):
            if old != path:
                old.unlink(missing_ok=True)
        _prune(path.parent.parent)
    except Exception as exc:  # noqa: BLE001 (a full disk or a read-only cache: never fatal)
        return f"repacked layout not cached ({exc})"
    finally:
        if partial is not None:
            partial.unlink(missing_ok=True)
    return f"repacked layout cached at {path}"


def _prune(root: Path) -> None:
    """Remove the cache folders of GGUF files that no longer exist."""
    for folder in root.iterdir():
        note = folder / _SOURCE_NOTE
        if note.is_file() and not Path(note.read_text(encoding="utf-8")).exists():
            shutil.rmtree(folder, ignore_errors=True)
