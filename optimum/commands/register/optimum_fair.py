"""`optimum-cli fair ...`: the optimum-fair subcommands under optimum's CLI.

optimum-cli imports every module of the `optimum.commands.register` namespace package at start-up, so
this file stays light: the `fair` parser takes the rest of the command line and `run()` hands it to
`optimum_fair.cli`, which builds its own parser (one flag per FairCalibConfig field) only then. Its help
lists the commands from the console script's front, `optimum_fair_cli` (which imports no torch either).
"""

import argparse
import sys

from optimum.commands.base import BaseOptimumCLICommand, CommandInfo

from optimum_fair_cli import COMMANDS  # the command table, light (no torch)

_USAGE = "subcommands (`optimum-cli fair <command> --help` for their flags):\n" + "\n".join(
    f"  {name:<9} {text}" for name, text in COMMANDS.items())


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
