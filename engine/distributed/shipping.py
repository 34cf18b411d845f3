"""A model for nodes that cannot see its path: its files go once into Ray's object store,
and each node writes them to a local cache folder the first time an actor there asks.

The folder is keyed by the model's name and its files' names, sizes and modification times,
so a changed model is shipped anew; a node's actors share one copy (written to a temporary
folder and renamed into place, so a racing actor never loads a half-written model).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from engine.errors import InvalidInputError

SHIPPED_ROOT = Path(os.environ.get("LAMINA_CACHE", Path.home() / ".cache" / "lamina")) / "shipped"


@dataclass(frozen=True)
class ShippedModel:
    """A model folder or file in the object store: file path (relative) -> object ref."""

    name: str
    key: str
    files: dict[str, object]
    is_file: bool


def ship_model(path: str | Path) -> ShippedModel:
    """Put the model at `path` (a folder or a .gguf file) into the object store."""
    import ray

    path = Path(path)
    if not path.exists():
        raise InvalidInputError(f"--ship-model: {path} does not exist on this machine")
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    digest = hashlib.sha256(str(path.resolve()).encode())
    refs = {}
    for file in files:
        rel = file.name if path.is_file() else str(file.relative_to(path))
        stat = file.stat()
        digest.update(f"{rel}\0{stat.st_size}\0{stat.st_mtime_ns}\0".encode())
        refs[rel] = ray.put(file.read_bytes())
    return ShippedModel(path.name, digest.hexdigest()[:16], refs, path.is_file())


def materialize(shipped: ShippedModel, root: Path = SHIPPED_ROOT) -> Path:
    """The node-local path of a shipped model, written from the object store if missing."""
    import ray

    home = root / shipped.key
    target = home / shipped.name
    if target.exists():
        return target
    home.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=home.parent, prefix=f".{shipped.key}."))
    try:
        for rel, ref in shipped.files.items():
            dest = tmp / shipped.name / rel if not shipped.is_file else tmp / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(ray.get(ref))
        try:
            os.rename(tmp, home)
        except OSError:  # another actor of this node was first
            if not target.exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
