"""Entry point for `python -m compare`."""
import sys

try:
    from .cli import main
except KeyboardInterrupt:  # Ctrl-C while rich, numpy and the rest are still importing
    print("interrupted", file=sys.stderr)
    sys.exit(130)

sys.exit(main())
