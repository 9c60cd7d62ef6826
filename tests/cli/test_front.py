"""The console script's front (`optimum_fair_cli`): --help and --version answered without importing torch
or optimum_fair, with the same text the full parser gives; everything else reaches the full parser."""

import subprocess
import sys

import pytest

import optimum_fair
from optimum_fair.cli import build_parser
from optimum_fair_cli import main


def _front(argv, capsys):
    with pytest.raises(SystemExit) as done:
        main(argv)
    out = capsys.readouterr()
    return done.value.code, out.out, out.err


def test_version_prints_the_package_version(capsys):
    for flag in ("--version", "-V"):
        assert _front([flag], capsys) == (0, f"optimum-fair {optimum_fair.__version__}\n", "")


def test_help_is_the_full_parsers_top_level(capsys):
    code, out, _ = _front(["--help"], capsys)
    assert code == 0 and out == build_parser().format_help()


def test_no_command_is_the_full_parsers_usage_error(capsys):
    code, _, err = _front([], capsys)
    with pytest.raises(SystemExit) as full:
        build_parser().parse_args([])
    assert code == full.value.code == 2 and err == capsys.readouterr().err


def test_a_command_reaches_the_full_parser(capsys):
    code, out, _ = _front(["push", "--help"], capsys)
    assert code == 0 and out.startswith("usage: optimum-fair push [-h] [--token TOKEN]")


@pytest.mark.parametrize("flag", ["--help", "--version"])
def test_help_and_version_import_neither_torch_nor_the_package(flag):
    code = ("import sys\nfrom optimum_fair_cli import main\n"
            f"try:\n    main([{flag!r}])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'optimum_fair')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"
