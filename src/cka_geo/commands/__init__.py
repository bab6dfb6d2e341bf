"""Subcommands of the ``cka-geo`` CLI; each module defines NAME, HELP, add_arguments, run."""
