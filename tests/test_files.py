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
