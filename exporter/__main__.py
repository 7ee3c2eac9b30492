"""Entry point for `python -m exporter` and the `vit-export` console script: the same signal handling, exit codes
and one-line errors either way."""
from vitparity import entry_point

INTERRUPTED = "interrupted: no artifact was changed"


def _main():
    from .cli import main

    return main


def console() -> None:
    """The `vit-export` console script (pyproject.toml)."""
    entry_point(_main, INTERRUPTED)


if __name__ == "__main__":
    console()
