"""`python -m pipelines ...` is `subq ...`."""

from pipelines.cli import main

main()
