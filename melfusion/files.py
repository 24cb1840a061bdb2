"""Writes that never leave a partial file or folder behind, and give it the mode the umask asks for.

The one home for "write beside, then rename": WAVs and spectrograms (CLI and storage), the training cache,
checkpoints and bundles all go through `replacing`. The temporary sibling is created with 0666 / 0777
filtered by the umask (0644 / 0755 by default), as `open()` and `mkdir()` would, not `mkstemp`'s 0600:
a clip written by the worker is readable by the web server that serves it.
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def replacing(path: str | os.PathLike, *, folder: bool = False) -> Iterator[Path]:
    """Yield a new temporary sibling of `path` to write into: a file, or with `folder=True` a folder.

    When the block ends without an error the sibling takes `path`'s place by rename (an old folder is moved
    aside first and deleted after, so a crash leaves the old or the new one complete, never neither); on an
    error, or an interrupt, it is removed and `path` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.{secrets.token_hex(4)}.part")
    if folder:
        staging.mkdir(0o777)  # the umask applies, as for any new folder
    else:
        os.close(os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        yield staging
        if folder and path.exists():
            retired = path.with_name(f".{path.name}.{secrets.token_hex(4)}.retired")
            path.rename(retired)
            try:
                staging.rename(path)
            except BaseException:
                retired.rename(path)
                raise
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, path)
    except BaseException:
        if staging.is_dir():
            shutil.rmtree(staging, ignore_errors=True)
        else:
            staging.unlink(missing_ok=True)
        raise


def write_atomically(path: str | os.PathLike, data: bytes) -> Path:
    """Readers see the whole file or none."""
    with replacing(path) as staging:
        staging.write_bytes(data)
    return Path(path)
