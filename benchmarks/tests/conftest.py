"""The benchmark scripts' tests use the package tests' set-up: one torch thread and a fixed seed per test."""

import importlib
from pathlib import Path

import pytest

from tests.conftest import _seed  # noqa: F401  (autouse: torch.manual_seed(0) before every test)


@pytest.fixture
def bench_module(monkeypatch):
    """import_module for the scripts in benchmarks/ (their directory on sys.path for this test)."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1]))
    return importlib.import_module
