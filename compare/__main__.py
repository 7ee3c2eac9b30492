"""Entry point for `python -m compare`."""
import os
import sys

try:
    from .cli import main
except KeyboardInterrupt:  # Ctrl-C while rich, numpy and the rest are still importing
    print("interrupted", file=sys.stderr)
    sys.exit(130)

code = main()
if code == 130:
    # Interrupted, possibly halfway through importing torch: leave without the interpreter's teardown,
    # which a half-imported extension can turn into a second KeyboardInterrupt and a traceback.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
sys.exit(code)
