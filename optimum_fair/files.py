"""Writing files so that a crash never leaves a half-written one: the one atomic writer of the package.

`atomic_path(path)` yields a temporary name beside `path` (same folder, so the final rename stays on one
file system) and renames it over `path` only when the block finishes; on an error the temporary file is
removed and `path` is untouched. `atomic_dir(path)` does the same for a folder being assembled.
Both give what they create the modes a plain `open` / `mkdir` would (0666 / 0777 less the umask), not the
0600 / 0700 of Python's temporary files (nor of a writer such as safetensors' `save_file`, which makes
its file 0600: the mode is set again before the rename).

`output_path(path, protected)` is the one check of a path about to be written over: it resolves the path
once (the folder it sits in, symlinks and `..` included; the last name itself is kept, so a symlink there is
replaced, never followed) and refuses "", the current folder, a protected folder (a model being read) and
any folder holding one of them. `new_parents(path)` creates a missing parent folder and removes what it
created when the block fails.
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
        os.chmod(tmp, 0o666 & ~_umask())  # the writer may have made a new 0600 file under the name
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


def output_path(path: str | os.PathLike, protected: tuple = (), what: str = "output") -> Path:
    """`path` as an absolute path (its folder resolved, its last name kept), or ValueError when writing
    there could remove something else: "", the current folder or one holding it, a `protected` folder or
    one holding it."""
    text = os.fspath(path)
    if not text.strip():
        raise ValueError(f"the {what} path is empty: name the file or folder to write")
    head, tail = os.path.split(text.rstrip("/" + os.sep) or text)
    if tail in ("", ".", ".."):  # the path names a folder through '.' or '..': that folder is the output
        full = Path(os.path.realpath(text))
    else:
        full = Path(os.path.realpath(head or ".")) / tail
    here = Path(os.path.realpath(os.getcwd()))
    for folder, name in [(here, "the current folder")] + [(Path(os.path.realpath(p)), str(p)) for p in protected]:
        if full == folder or full in folder.parents:
            held = "is" if full == folder else "holds"
            raise ValueError(f"the {what} {text!r} ({full}) {held} {name}; writing there would replace it: "
                             "name a new file or folder")
    _check_parents(full, text)
    return full


def _check_parents(full: Path, text: str) -> None:
    """NotADirectoryError when an existing ancestor of `full` is a file (a folder was expected)."""
    for parent in full.parents:
        if parent.exists():
            if not parent.is_dir():
                raise NotADirectoryError(f"{text}: {parent} is a file, a folder was expected there")
            return


@contextlib.contextmanager
def new_parents(path: str | os.PathLike) -> Iterator[None]:
    """Create the missing folders above `path` for the block; remove those it created if the block fails."""
    path = Path(path)
    missing = [p for p in path.parents if not p.exists()]  # deepest first
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        yield
    except BaseException:
        for folder in missing:
            try:
                folder.rmdir()  # only while empty: nothing that appeared meanwhile is removed
            except OSError:
                break
        raise


def _umask() -> int:
    """The process umask (read by setting it and putting it back: the only portable way)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
