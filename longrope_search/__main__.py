"""`python -m longrope_search ...` (and `torchrun -m longrope_search ...`) runs the CLI."""

from longrope_search.cli import app

if __name__ == "__main__":
    app()
