"""The benchmark scripts' tests use the package tests' set-up: one torch thread and a fixed seed per test."""

from tests.conftest import _seed  # noqa: F401  (autouse: torch.manual_seed(0) before every test)
