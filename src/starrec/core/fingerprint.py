"""What identifies a model on disk, as a short hash: evaluation records it in every
results JSON and records file, training keys what it measured of a starting model by it."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

# files up to this size are hashed whole; larger ones (weights) by size, head and tail, so
# that identifying a model of several GB takes milliseconds, not a minute
WHOLE_FILE_BYTES = 8 << 20
EDGE_BYTES = 4 << 20


def _file_digest(path: Path, digest: Any) -> None:
    size = path.stat().st_size
    digest.update(f"{size}\n".encode())
    with path.open("rb") as handle:
        if size <= WHOLE_FILE_BYTES:
            digest.update(handle.read())
        else:
            digest.update(handle.read(EDGE_BYTES))
            handle.seek(size - EDGE_BYTES)
            digest.update(handle.read(EDGE_BYTES))


def model_hash(spec: str | Path | None) -> str | None:
    """16 hex digits identifying a model: a file (a GGUF) or a folder (weights, config,
    tokenizer, star_model.json card) by its files' names and contents (large files by
    size, first and last 4 MiB); a hub id, an alias or an endpoint by the spec itself,
    which is all that is known of it here. None without a model (baselines)."""
    if spec is None:
        return None
    path = Path(spec).expanduser()
    digest = hashlib.sha256()
    if path.is_file():
        digest.update(b"file\n")
        _file_digest(path, digest)
    elif path.is_dir():
        digest.update(b"folder\n")
        for file in sorted(p for p in path.rglob("*") if p.is_file()):
            relative = file.relative_to(path)
            if any(part.startswith(".") for part in relative.parts):
                continue  # caches, locks: not the model
            digest.update(f"{relative.as_posix()}\n".encode())
            _file_digest(file, digest)
    else:
        digest.update(f"spec\n{spec}".encode())
    return digest.hexdigest()[:16]
