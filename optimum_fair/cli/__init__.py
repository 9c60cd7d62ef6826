"""`optimum-fair` / `optimum-cli fair`: the command line (`main`), its flags (`flags`), what each
subcommand does (`actions`)."""

from .main import add_commands, build_parser, main, run

__all__ = ["add_commands", "build_parser", "main", "run"]
