"""A disk cache of GGUF files repacked into lamina's block layout, so a second start maps it.

Repacking a GGUF's blocks costs about 5 s per GB of file (numpy, every byte rewritten into
16-row groups); mapping the result back costs nothing but the page cache. The first load of
a file writes its repacked weights next to lamina's other caches, as a checkpoint's
safetensors file; later loads map that file (the weights' pages are shared with the page
cache, so they count once). An entry is keyed by the GGUF's resolved path, size and
modification time and by the source of the repacking code, so an edited file or a new
layout repacks again; a folder per GGUF keeps only its newest entry. Nothing here is
needed for correctness: a cache that cannot be written or read is skipped (and said with
--verbose), and LAMINA_REPACK_CACHE=0 turns it off.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

from engine.loader import checkpoint
from engine.weights import ModelWeights
from kernels_cpu.jit_cache import cache_dir

ENV = "LAMINA_REPACK_CACHE"
# The code whose output the cache holds: any edit makes new keys.
_LAYOUT_SOURCES = ("engine/loader/gguf_blocks.py", "kernels_cpu/matmul_blocks.py")
_ROOT = Path(__file__).resolve().parents[2]


def enabled() -> bool:
    return os.environ.get(ENV, "1") != "0"


def entry_path(gguf: Path) -> Path:
    """Where the repacked weights of `gguf` (as it is now) are cached."""
    resolved = gguf.resolve()
    stat = resolved.stat()
    layout = hashlib.sha256()
    for name in _LAYOUT_SOURCES:
        layout.update((_ROOT / name).read_bytes())
    folder = hashlib.sha256(str(resolved).encode()).hexdigest()[:16]
    state = f"{stat.st_size}:{stat.st_mtime_ns}:{layout.hexdigest()}"
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
    """Write `weights` as the cache entry of `gguf` (atomically), remove its older entries;
    returns what happened."""
    path = entry_path(gguf)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".partial", delete=False) as f:
            partial = Path(f.name)
        try:
            checkpoint.save_weights_file(weights, partial)
            partial.replace(path)
        finally:
            partial.unlink(missing_ok=True)
        for old in path.parent.glob("*.safetensors"):
            if old != path:
                old.unlink(missing_ok=True)
    except OSError as exc:
        return f"repacked layout not cached ({exc.strerror or exc})"
    return f"repacked layout cached at {path}"
