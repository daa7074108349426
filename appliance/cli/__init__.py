"""The `appliance` command: argument parsing and printing only, one module per command group."""

from appliance.cli.command import main

__all__ = ["main"]
