"""optimum-fair command-line subcommands: flags generated from code, and what each command does."""
