"""A bundle's `manifest.json` and its verification stamp, without torch (tools that only look stay quick).

The manifest lists every file with its size and sha256. Hashing a full bundle (5-10 GB) takes minutes, so
a complete check records a stamp beside the manifest, `verified.json`: the manifest's own sha256 and every
listed file's size and modification time. A later start that finds the stamp current (same manifest, no
file resized or touched since) skips the hashes. A copy that keeps modification times keeps the stamp valid
(`cp -a`, rsync -a); any other copy or rewrite is hashed again. The stamp guards against partial copies and
replaced files, not against someone who forges times: `model_store verify` always hashes.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from .errors import BundleError
from .files import write_atomically

MANIFEST = "manifest.json"
STAMP = "verified.json"
FORMAT = "melfusion-bundle"
BUNDLE_VERSION = 1


def default_tiny_bundle_dir() -> Path:
    """Where the embedded tiny bundle lives: $MELFUSION_HOME (default ~/.cache/melfusion). Torch-free, so
    the CLI can check a request against its limits before loading anything."""
    home = Path(os.environ.get("MELFUSION_HOME", Path.home() / ".cache" / "melfusion"))
    return home / f"tiny-bundle-v{BUNDLE_VERSION}"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_manifest(directory: str | os.PathLike) -> dict:
    directory = Path(directory)
    if not directory.is_dir():
        raise BundleError(f"{directory}: no such bundle directory")
    path = directory / MANIFEST
    if not path.is_file():
        raise BundleError(f"{directory}: not a MelFusion bundle ({MANIFEST} missing)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise BundleError(f"{path}: unreadable manifest ({exc})") from None
    if manifest.get("format") != FORMAT:
        raise BundleError(f"{path}: not a MelFusion manifest (format {manifest.get('format')!r})")
    if manifest.get("bundle_version") != BUNDLE_VERSION:
        raise BundleError(f"{path}: bundle version {manifest.get('bundle_version')}, this code reads {BUNDLE_VERSION}")
    return manifest


def _current_stamp(directory: Path, manifest: dict) -> dict:
    """What the stamp of `directory` says now: the manifest's sha256, each listed file's [bytes, mtime_ns]."""
    files = {relative: (directory / relative).stat() for relative in manifest["files"]}
    return {
        "manifest_sha256": file_sha256(directory / MANIFEST),
        "files": {relative: [stat.st_size, stat.st_mtime_ns] for relative, stat in files.items()},
    }


def write_stamp(directory: Path, manifest: dict) -> bool:
    """Record a complete check of `directory`; False where the folder is read-only (a worker's mount)."""
    try:
        write_atomically(directory / STAMP, json.dumps(_current_stamp(directory, manifest)).encode())
    except OSError:
        return False
    return True


def stamp_is_current(directory: Path, manifest: dict) -> bool:
    """True if a complete check was recorded and nothing it covered changed since."""
    try:
        return json.loads((directory / STAMP).read_text()) == _current_stamp(directory, manifest)
    except (OSError, ValueError):  # no stamp, an unreadable one, or a listed file gone
        return False
