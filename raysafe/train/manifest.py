"""A manifest of SHA-256 digests written with every training checkpoint, checked before anything in it is loaded.

``deepspeed.load_checkpoint`` unpickles its files (``torch.load(weights_only=False)``): loading a file that raysafe
did not write can run arbitrary code. Each worker writes ``manifest/rank-NNNNN.json`` listing the digest of every
file it put into the checkpoint; :func:`verify_manifest` refuses a checkpoint with no manifest, a rank's manifest
missing, a listed file missing or altered, or a file that no manifest lists. (It detects damaged, replaced or
foreign files; someone who can rewrite the manifest too can defeat it.)
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from raysafe.atomic import atomic_write_json
from raysafe.errors import OutputError

MANIFEST_DIR = "manifest"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _files(root: Path) -> list[Path]:
    """Every file of the checkpoint but the manifests and Ray's own top-level metadata (dot files)."""
    out = []
    for p in root.rglob("*"):
        parts = p.relative_to(root).parts
        if p.is_file() and parts[0] != MANIFEST_DIR and not (len(parts) == 1 and p.name.startswith(".")):
            out.append(p)
    return sorted(out)


def write_manifest(root: Path, rank: int) -> None:
    """List every file under ``root`` (this rank's part of a checkpoint) with its digest."""
    files = {str(p.relative_to(root)): _sha256(p) for p in _files(root)}
    atomic_write_json(root / MANIFEST_DIR / f"rank-{rank:05d}.json", {"rank": rank, "sha256": files})


def verify_manifest(root: Path, world_size: int | None = None) -> None:
    """Raise OutputError unless every file of checkpoint ``root`` is listed, with its digest, in its manifest."""
    fix = (
        "resume only from checkpoints written by `raysafe train`; for a damaged one start afresh with `--restart` "
        "(the old run is moved aside) or give the run a new `checkpoint.name`"
    )
    manifests = sorted((root / MANIFEST_DIR).glob("rank-*.json"))
    if not manifests:
        raise OutputError(
            f"checkpoint {root} has no manifest of digests ({MANIFEST_DIR}/): it was not written by this raysafe, "
            "and its DeepSpeed files are pickles that are not loaded unchecked",
            where=str(root),
            fix=fix,
        )
    listed: dict[str, str] = {}
    for m in manifests:
        listed.update(json.loads(m.read_text())["sha256"])
    if world_size is not None and len(manifests) != world_size:
        raise OutputError(
            f"checkpoint {root} has {len(manifests)} rank manifest(s), its run had {world_size} workers",
            where=str(root / MANIFEST_DIR),
            fix=fix,
        )
    for rel, digest in sorted(listed.items()):
        p = root / rel
        if not p.is_file():
            raise OutputError(f"checkpoint file {rel} is missing", where=str(p), fix=fix)
        if _sha256(p) != digest:
            raise OutputError(
                f"checkpoint file {rel} differs from what was written (SHA-256 mismatch): refusing to load it",
                where=str(p),
                fix=fix,
            )
    extra = [str(p.relative_to(root)) for p in _files(root) if str(p.relative_to(root)) not in listed]
    if extra:
        raise OutputError(
            f"checkpoint {root} holds file(s) its manifest does not list: {extra[:5]}",
            where=str(root / extra[0]),
            fix=fix,
        )
