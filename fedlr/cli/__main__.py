"""`python -m fedlr.cli`."""

from fedlr.cli import main

main()
