"""The thin command-line layer over the library."""

from steadytrain.cli.app import app, main

__all__ = ["app", "main"]
