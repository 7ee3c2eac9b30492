"""Entry point for `python -m compare`."""
import sys

from .cli import main

sys.exit(main())
