"""Writing files so that a crash never leaves a half-written one: the one atomic writer of the package.

`atomic_path(path)` yields a temporary name beside `path` (same folder, so the final rename stays on one
file system) and renames it over `path` only when the block finishes; on an error the temporary file is
removed and `path` is untouched. `atomic_dir(path)` does the same for a folder being assembled.
Both give what they create the modes a plain `open` / `mkdir` would (0666 / 0777 less the umask), not the
0600 / 0700 of Python's temporary files (nor of a writer such as safetensors' `save_file`, which makes
its file 0600: the mode is set again before the rename). A temporary name carries the writing process
(`.<name>.<pid>@<host>-...`): a process killed by SIGKILL / SIGTERM cannot remove its own, so the next write
to the same path removes those of processes of this host that no longer run.

`output_path(path, protected)` is the one check of a path about to be written over: it resolves the path
once (the folder it sits in, symlinks and `..` included; the last name itself is kept, so a symlink there is
replaced, never followed) and refuses "", the current folder, a protected folder (a model being read) and
any folder holding one of them. `new_parents(path)` creates a missing parent folder and removes what it
created when the block fails.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary file name beside `path`, moved onto `path` when the block exits without error."""
    path = Path(path)
    _remove_leftovers(path.parent, f".{path.name}.")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{_writer()}-", suffix=".tmp", dir=path.parent)
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
def atomic_dir(path: str | os.PathLike, inside_ok: bool = False) -> Iterator[Path]:
    """A temporary folder beside `path` (created, parents too); removed afterwards whatever happens.

    The caller moves its contents into place (see `export.folder`); nothing is left behind on an error.
    inside_ok: when the folder holding `path` refuses new entries but `path` is an existing folder, make the
    temporary folder inside `path` (a caller that moves entries one by one into `path` can use it; one
    that renames `path` itself cannot).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        _remove_leftovers(path.parent, f".{path.name}.partial-")
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.partial-{_writer()}-", dir=path.parent))
    except PermissionError:
        if not (inside_ok and path.is_dir()):
            raise
        _remove_leftovers(path, ".partial-")
        tmp = Path(tempfile.mkdtemp(prefix=f".partial-{_writer()}-", dir=path))  # a read-only parent
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


def _writer() -> str:
    """This process, as temporary names record it: "<pid>@<host>"."""
    return f"{os.getpid()}@{socket.gethostname()}"


def _remove_leftovers(folder: Path, prefix: str) -> None:
    """Remove the temporary files / folders `prefix<pid>@<host>-...` in `folder` that a process of this host,
    now gone, left behind (killed before it could clean up); others' and live processes' are kept."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)@(.+?)-[^-]+$")
    host = socket.gethostname()
    with contextlib.suppress(OSError):
        for entry in os.scandir(folder):
            found = pattern.match(entry.name)
            if found and found.group(2) == host and not _alive(int(found.group(1))):
                logger.info("removing %s, left by a killed write (process %s)", entry.path, found.group(1))
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path, ignore_errors=True)
                else:
                    os.unlink(entry.path)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


def _umask() -> int:
    """The process umask (read by setting it and putting it back: the only portable way)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
