"""Entry point for `python -m exporter`."""
from vitparity import entry_point


def _main():
    from .cli import main

    return main


entry_point(_main, "interrupted: no artifact was changed")
