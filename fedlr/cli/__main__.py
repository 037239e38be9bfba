"""`python -m fedlr.cli`."""

from fedlr.cli import entry

entry()
