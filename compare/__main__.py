"""Entry point for `python -m compare` and the `vit-compare` console script: the same signal handling, exit codes
and one-line errors either way."""
from vitparity import entry_point


def _main():
    from .cli import main

    return main


def console() -> None:
    """The `vit-compare` console script (pyproject.toml)."""
    entry_point(_main, "interrupted")


if __name__ == "__main__":
    console()
