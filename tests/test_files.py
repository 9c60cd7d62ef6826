"""The one atomic writer: all or nothing, and the modes a plain write would give."""

import os
import stat

import pytest

from optimum_fair.files import atomic_dir, atomic_path, atomic_write_text


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    yield
    os.umask(old)


def test_atomic_write_replaces_whole_or_not_at_all(tmp_path):
    target = tmp_path / "f.json"
    atomic_write_text(target, "one")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert target.read_text() == "one\n"
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]  # no temporary file left


def test_modes_follow_the_umask(tmp_path, umask_027):
    atomic_write_text(tmp_path / "f.txt", "x")
    assert stat.S_IMODE((tmp_path / "f.txt").stat().st_mode) == 0o640
    with atomic_dir(tmp_path / "out") as tmp:
        assert stat.S_IMODE(tmp.stat().st_mode) == 0o750
    assert not tmp.exists()


def test_a_killed_writer_leaves_temporaries_that_the_next_write_removes(tmp_path):
    """issue 32 W12: an export killed by SIGKILL / SIGTERM left `.k.gguf.XXXX.tmp` / `.k-ct.partial-XXXX/`
    beside its output, full size and hidden, and nothing removed them. The next write to the same path
    removes those of gone processes of this host; a live process's are kept."""
    import signal
    import subprocess
    import sys

    import optimum_fair.files

    script = ("import importlib.util, os, signal, sys\n"  # files.py alone: no torch import, a fast start
              "spec = importlib.util.spec_from_file_location('files', sys.argv[3])\n"
              "files = importlib.util.module_from_spec(spec); spec.loader.exec_module(files)\n"
              "with files.atomic_path(sys.argv[1] + '/k.gguf') as f, files.atomic_dir(sys.argv[1] + '/k-ct') as d:\n"
              "    f.write_bytes(b'x' * 1000); (d / 'model.safetensors').write_bytes(b'y' * 1000)\n"
              "    os.kill(os.getpid(), getattr(signal, sys.argv[2]))\n")
    for sig in ("SIGKILL", "SIGTERM"):  # the second run removes the first's leftovers
        run = subprocess.run([sys.executable, "-c", script, str(tmp_path), sig, optimum_fair.files.__file__],
                             capture_output=True, timeout=120)
        assert run.returncode == -getattr(signal, sig), run.stderr
        left = sorted(p.name for p in tmp_path.iterdir())
        assert [name.split(".")[1] for name in left] == ["k-ct", "k"], left
        assert all(p.stat().st_size == 1000 for p in tmp_path.iterdir() if p.is_file())
    live = tmp_path / f".k.gguf.{os.getpid()}@{os.uname().nodename}-abc.tmp"  # this process: alive
    live.write_text("in use")
    atomic_write_text(tmp_path / "k.gguf", "new")
    with atomic_dir(tmp_path / "k-ct") as tmp:
        (tmp / "config.json").write_text("{}")
        os.replace(tmp, tmp_path / "k-ct")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["k.gguf", "k-ct", live.name])
