"""`python -m app.cli`: the `rag` command."""

from app.cli import main

main()
