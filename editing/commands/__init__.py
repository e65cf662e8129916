"""Subcommands of the editlab CLI, one module each (see editing/cli.py)."""
