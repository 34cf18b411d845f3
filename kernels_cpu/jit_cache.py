"""Where numba keeps the kernels' compiled code: a folder per version of the kernels' source.

numba keys a cached function on the content of its own file only. A kernel that inlines a
helper from another file (an intrinsic in simd.py, a row function in norms.py) kept running the
old machine code after that file changed: after an upgrade that edited only the helper, or
during development (an edited intrinsic went unused, silently). So the cache folder is named
after a hash of every kernel source file, and any edit starts a fresh one.

The folder lies under NUMBA_CACHE_DIR/lamina when the user set it, else under lamina's cache
folder (LAMINA_CACHE, default ~/.cache/lamina). Each start marks its version's folder as
used; folders of other versions unused for PRUNE_AFTER_S are removed, so upgrades and edits
do not pile up. Where no folder can be made (a read-only home), numba's own default stays.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import time
from pathlib import Path

import numba

from kernels_cpu.simd import ISA_ENV

PRUNE_AFTER_S = 30 * 86400
_KEY = re.compile(r"[0-9a-f]{16}")  # what `source_key` names a folder: only those are pruned
# Every package whose njit or cuda.jit functions are cached.
KERNEL_PACKAGES = ("kernels_cpu", "kernels_gpu")


def cache_dir() -> Path:
    """lamina's cache folder: built llama.cpp tools, random bench models, compiled kernels."""
    return Path(os.environ.get("LAMINA_CACHE") or Path.home() / ".cache" / "lamina")


def source_key(folders: list[Path], isa: str = "") -> str:
    """A hash of the names and contents of the .py files in `folders`, and of the kernel kind
    chosen through $LAMINA_ISA (a constant compiled into the kernels that numba cannot see)."""
    digest = hashlib.sha256(isa.encode())
    for folder in folders:
        for path in sorted(folder.glob("*.py")):
            digest.update(f"{folder.name}/{path.name}\0".encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def configure() -> Path | None:
    """Point numba's cache at the folder for this source and return it (None: numba's default
    stays, as no folder could be made). Call before any cached function is defined
    (kernels_cpu and kernels_gpu do, on import)."""
    root = Path(__file__).resolve().parent.parent
    key = source_key(
        [root / name for name in KERNEL_PACKAGES if (root / name).is_dir()],
        os.environ.get(ISA_ENV, ""),
    )
    user = os.environ.get("NUMBA_CACHE_DIR")
    base = Path(user) / "lamina" if user else cache_dir() / "numba"
    folder = base / key
    if numba.config.CACHE_DIR == str(folder):
        return folder
    try:
        folder.mkdir(parents=True, exist_ok=True)
        os.utime(folder)  # in use: numba writes below it, which leaves its own time alone
    except OSError:
        return None
    _prune(base, keep=folder)
    numba.config.CACHE_DIR = str(folder)
    return folder


def _prune(base: Path, keep: Path) -> None:
    """Remove other versions' folders unused for PRUNE_AFTER_S; another process may be
    pruning too, so a folder gone meanwhile is no error."""
    stale = time.time() - PRUNE_AFTER_S
    for other in base.iterdir():
        if other == keep or not _KEY.fullmatch(other.name):
            continue
        try:
            if other.is_dir() and other.stat().st_mtime < stale:
                shutil.rmtree(other, ignore_errors=True)
        except OSError:
            pass
