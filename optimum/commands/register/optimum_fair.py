"""`optimum-cli fair ...`: the optimum-fair subcommands under optimum's CLI.

optimum-cli imports every module of the `optimum.commands.register` namespace package at start-up, so
this file stays light: the `fair` parser takes the rest of the command line and `run()` hands it to
`optimum_fair.cli`, which builds its own parser (one flag per FairCalibConfig field) only then.
"""

import argparse
import sys

from optimum.commands.base import BaseOptimumCLICommand, CommandInfo

_USAGE = """subcommands (`optimum-cli fair <command> --help` for their flags):
  quantize  quantize a model with FAIR-Calib and save (and/or push) the folder
  prior     run Stage I alone: the position prior from the full-precision teacher's rollouts
  eval      held-out NLL and decoding-stability metrics of one model, or two side by side
  push      upload a folder written by `quantize` to a Hub repo
  export    write a folder written by `quantize` as GGUF (llama.cpp) or compressed-tensors (vLLM)
  generate  decode a prompt with the diffusion sampler"""


class FairCommand(BaseOptimumCLICommand):
    """`optimum-cli fair <command> ...` == `optimum-fair <command> ...`."""

    COMMAND = CommandInfo(name="fair", help="FAIR-Calib quantization of diffusion LLMs (optimum-fair)")

    @staticmethod
    def parse_args(parser: argparse.ArgumentParser) -> None:
        parser.formatter_class = argparse.RawDescriptionHelpFormatter
        parser.epilog = _USAGE
        parser.add_argument("fair_args", nargs=argparse.REMAINDER, metavar="COMMAND ...",
                            help="an optimum-fair subcommand and its arguments")

    def run(self) -> None:
        from optimum_fair.cli import build_parser, run

        parser = build_parser(prog="optimum-cli fair")
        if not self.args.fair_args:
            parser.print_help()
            sys.exit(2)
        sys.exit(run(parser.parse_args(self.args.fair_args)))


REGISTER_COMMANDS = [FairCommand]
