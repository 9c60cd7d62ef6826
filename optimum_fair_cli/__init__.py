"""The `optimum-fair` console script's front: `--help` and `--version` without importing `optimum_fair`.

Importing anything under `optimum_fair` registers the quantizer with transformers, and that imports torch
(seconds). The top-level help and the version need neither, so they are answered here, from the command
table below and the installed package's version; every other command line goes to
`optimum_fair.cli.main`, whose full parser (one flag per FairCalibConfig field) starts from the same
`top_parser` and `COMMANDS`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from importlib.metadata import version

PROG = "optimum-fair"
DESCRIPTION = "`optimum-fair`: quantize, build a prior, evaluate, push and sample diffusion LMs from the shell."
COMMANDS = {
    "quantize": "quantize a model with FAIR-Calib and save (and/or push) the folder",
    "prior": "run Stage I alone: the position prior from the full-precision teacher's rollouts",
    "eval": "held-out NLL and decoding-stability metrics of one model, or two side by side",
    "push": "upload a folder written by `quantize` to a Hub repo",
    "export": "write a folder written by `quantize` as GGUF (llama.cpp) or compressed-tensors (vLLM)",
    "generate": "decode a prompt with the diffusion sampler",
}
_ANSWERED_HERE = ("-h", "--help", "-V", "--version")


def top_parser(prog: str = PROG) -> argparse.ArgumentParser:
    """The parser's top level: description, epilog and ``-V`` / ``--version`` (no subcommands yet)."""
    parser = argparse.ArgumentParser(prog=prog, description=DESCRIPTION,
                                     epilog="Run `optimum-fair <command> --help` for a command's flags.")
    parser.add_argument("-V", "--version", action="version", version=f"{PROG} {version('optimum-fair')}")
    return parser


def subcommands(parser: argparse.ArgumentParser) -> argparse._SubParsersAction:
    """The (required) subcommand slot of ``parser``, listing `COMMANDS` in its help."""
    sub = parser.add_subparsers(dest="fair_command", metavar="{" + ",".join(COMMANDS) + "}")
    sub.required = True
    return sub


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `optimum-fair` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in _ANSWERED_HERE:  # help, version, or the missing-command usage error
        parser = top_parser()
        sub = subcommands(parser)
        for name, text in COMMANDS.items():
            sub.add_parser(name, help=text)
        parser.parse_args(argv[:1])  # prints and exits
    from optimum_fair.cli.main import main as run

    return run(argv)
