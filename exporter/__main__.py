"""Entry point for `python -m exporter`."""
import sys

try:
    from .cli import main
except KeyboardInterrupt:  # Ctrl-C while rich and the rest are still importing
    print("interrupted: no artifact was changed", file=sys.stderr)
    sys.exit(130)

sys.exit(main())
