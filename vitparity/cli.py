"""The command-line toolkit every CLI of vit-parity shares: argparse whose errors are one line, consoles that
print user text as written, and `guarded`, which turns user errors into one line and an exit code."""
from __future__ import annotations

import argparse
import math

from rich.console import Console
from rich.text import Text

from .errors import UserError


class Parser(argparse.ArgumentParser):
    """argparse whose usage errors are UserErrors: one line, exit code 2, no usage dump."""

    def error(self, message):
        raise UserError(f"{message}. See: {self.prog} --help")


def check_thresholds(min_cosine: float | None, max_error: float | None, error_flag: str, what: str) -> None:
    """Refuse thresholds no comparison can mean: a cosine outside (0, 1], an error bound that is not positive and finite."""
    if min_cosine is not None and not (0 < min_cosine <= 1):  # NaN fails this too
        raise UserError(f"--min-cosine must be in (0, 1], got {min_cosine:g}; e.g. --min-cosine 0.999")
    if max_error is not None and not (0 < max_error < math.inf):
        raise UserError(f"{error_flag} must be {what} above 0 and finite, got {max_error:g}; e.g. {error_flag} 1e-2")


def console(stderr: bool = False) -> Console:
    """A Rich console; piped output (CI, make, files) gets a wide one so tables keep their columns.

    Markup is off: messages and table cells carry user text (model names, paths, key names such as
    "[blocks.0.norm1.weight]") that must print as written. Styles come from Text objects.
    """
    # log_path=False: a log line ends with its time, not with the source line that printed it.
    probe = Console(stderr=stderr, markup=False, log_path=False)
    return probe if probe.is_terminal else Console(stderr=stderr, width=200, markup=False, log_path=False)


def _first(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def os_error_line(error: OSError) -> str:
    """What an OSError means, in one line: a full disk names the folder; a temp folder of this run that vanished is
    ours to say (an internal error), not the user's path; anything else names the path to check."""
    import errno
    import tempfile

    where = error.filename or ""
    if error.errno == errno.ENOSPC:
        return (f"no space left on the device that holds {where or 'a folder this run writes'}; free some space there "
                f"(temp files go to TMPDIR, now {tempfile.gettempdir()}) and run again")
    if where and "vit-parity-" in str(where) and str(where).startswith(tempfile.gettempdir()):
        return (f"internal error: {where} of this run's temp folder is gone ({error.strerror}); another program removed "
                f"it, or {tempfile.gettempdir()} is unusable: run again")
    return f"{error}; check the path and the free space"


def _error(message: str) -> Text:
    return Text.assemble(("error:", "bold red"), " ", message)


def guarded(body, err: Console, interrupted: str = "interrupted") -> int:
    """Run a CLI body and return its exit code; user errors become one line and a code, never a traceback.

    Every command first removes what killed runs of any command left in the temp folder (their owner is dead).
    """
    from .processes import remove_all_stale

    try:
        remove_all_stale()
        return body()
    except UserError as error:
        err.print(_error(str(error)), highlight=False, soft_wrap=True)
        return error.exit_code
    except OSError as error:  # a path cannot be written or read: full disk, no permission, a folder of ours gone
        err.print(_error(os_error_line(error)), highlight=False, soft_wrap=True)
        return 2
    except (ImportError, SystemError) as error:  # a package that cannot be imported here (a NumPy/ml_dtypes mismatch)
        err.print(_error(f"a package cannot be imported: {type(error).__name__}: {_first(error)}; reinstall it for this "
                         f"Python, or on a host with its own torch run make host-deps PYTHON=python3 (it keeps NumPy's major "
                         f"version): see docs/install.md"), highlight=False, soft_wrap=True)
        return 2
    except MemoryError:  # what a size check did not foresee: one line, never a traceback
        err.print(_error("out of memory; use a smaller batch, fewer images, or a host with more memory"), highlight=False)
        return 2
    except KeyboardInterrupt as stop:  # Ctrl-C, or SIGTERM/SIGHUP (exporter.Stopped)
        from . import exit_code

        err.print(Text(interrupted, style="bold red"))
        return exit_code(stop)


