"""Writing files so that a crash never leaves a half-written one: the one atomic writer of the package.

`atomic_path(path)` yields a temporary name beside `path` (same folder, so the final rename stays on one
file system) and renames it over `path` only when the block finishes; on an error the temporary file is
removed and `path` is untouched. `atomic_dir(path)` does the same for a folder being assembled.
Both give what they create the modes a plain `open` / `mkdir` would (0666 / 0777 less the umask), not the
0600 / 0700 of Python's temporary files.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary file name beside `path`, moved onto `path` when the block exits without error."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` (plus a newline) to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text + "\n")


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary folder beside `path` (created, parents too); removed afterwards whatever happens.

    The caller moves its contents into place (see `export.folder`); nothing is left behind on an error.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.partial-", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _umask() -> int:
    """The process umask (read by setting it and putting it back: the only portable way)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
