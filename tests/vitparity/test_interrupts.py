"""A Ctrl-C is never lost: one that lands inside a callback whose exceptions Python swallows is raised again."""
from __future__ import annotations

import sys

import pytest

import vitparity


def test_an_interrupt_a_callback_swallowed_is_raised_again_at_the_next_safe_point():
    # As when SIGINT arrives while logging's at-fork _releaseLock runs (subprocess forking for a preexec_fn): the
    # handler's KeyboardInterrupt is "ignored" by Python, and the run went on to exit 0 (seen 2 s into a compare).
    handler = vitparity._interrupt_handler("interrupted")

    class Callback:
        def __del__(self):
            handler(2, None)

    printed = []
    saved = sys.unraisablehook
    sys.unraisablehook = vitparity._quiet_unraisable(printed.append)
    try:
        Callback()  # dropped at once: its __del__ raises KeyboardInterrupt, which Python cannot raise to us
        with pytest.raises(KeyboardInterrupt):
            vitparity.raise_pending_interrupt()
        vitparity.raise_pending_interrupt()  # raised once: nothing is pending any more
    finally:
        sys.unraisablehook = saved
    assert printed == []  # no "Exception ignored ... Traceback" on the terminal


def test_other_unraisable_exceptions_are_still_reported():
    printed = []
    hook = vitparity._quiet_unraisable(printed.append)

    class Unraisable:
        exc_value = ValueError("a real bug in a __del__")

    hook(Unraisable)
    assert printed == [Unraisable]
