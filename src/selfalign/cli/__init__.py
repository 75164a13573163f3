"""The command line: ``selfalign`` (the console script) is :data:`app`; see :mod:`selfalign.cli.app`."""

from selfalign.cli.app import app, main

__all__ = ["app", "main"]
