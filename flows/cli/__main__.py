"""`python -m flows.cli ...`, as the `refresh` console script."""

from flows.cli import main

main()
