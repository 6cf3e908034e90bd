"""One module per ``nasrt`` subcommand (see :mod:`nasrt.cli`)."""
