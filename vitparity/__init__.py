"""vit-parity's shared core, below the exporter and the comparator: errors, metrics, tolerances, the artifact
format, the model registry, images, processes, the CLI toolkit. Neither tool imports the other; both import this.
"""
import os

# torch auto-loads device backends such as torch_npu on import; on a host where torch_npu is
# installed but CANN is not, that makes `import torch` itself crash (libhccl.so). Backends that
# need torch_npu import it explicitly, so auto-loading is never needed here.
os.environ.setdefault("TORCH_DEVICE_BACKEND_AUTOLOAD", "0")


class Stopped(KeyboardInterrupt):
    """SIGTERM or SIGHUP, handled like Ctrl-C: the same clean stop, then exit 128 + the signal number."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


# Interrupts whose exception Python swallowed. A signal that lands while Python runs a callback (logging's at-fork
# _releaseLock, run when subprocess forks for a preexec_fn) raises there; Python hands that exception to
# sys.unraisablehook ("Exception ignored ...") and goes on, and the run would finish with exit 0 after a Ctrl-C (seen
# once in a test, 2 s into a compare). The hook entry_point installs records them here instead.
_swallowed: list[int] = []


def raise_pending_interrupt() -> None:
    """Raise again, at a safe point, an interrupt whose exception a callback swallowed (see _swallowed)."""
    if _swallowed:
        signum = _swallowed[-1]
        _swallowed.clear()
        raise KeyboardInterrupt if signum == 2 else Stopped(signum)


def _quiet_unraisable(hook):
    """sys.unraisablehook that records a swallowed interrupt, silently (raise_pending_interrupt raises it again),
    and passes every other unraisable exception to `hook`: a Ctrl-C never prints a traceback."""

    def quiet(unraisable) -> None:
        if isinstance(unraisable.exc_value, KeyboardInterrupt):
            _swallowed.append(exit_code(unraisable.exc_value) - 128)
        else:
            hook(unraisable)

    return quiet


def exit_code(interrupt: KeyboardInterrupt) -> int:
    """130 for Ctrl-C, 143 for SIGTERM, 129 for SIGHUP."""
    return 128 + getattr(interrupt, "signum", 2)


def _interrupt_handler(interrupted: str):
    """SIGINT handler: KeyboardInterrupt, except inside an import, where it leaves at once.

    Raised while an extension module (torch, onnx and onnxruntime are pybind11) runs Python code
    during its import, the interrupt escapes as a C++ exception and the process aborts ("terminate
    called after throwing an instance of 'pybind11::error_already_set'"; seen under load about once
    in a hundred Ctrl-Cs at startup). Leaving with os._exit is then no worse than a kill -9, which an
    export survives by design (vitparity/artifact.py).
    """

    def handler(signum, frame) -> None:
        while frame is not None:
            if frame.f_code.co_filename.startswith("<frozen importlib"):
                os.write(2, f"{interrupted}\n".encode())
                os._exit(128 + signum)
            frame = frame.f_back
        raise KeyboardInterrupt if signum == 2 else Stopped(signum)

    return handler


def entry_point(load_main, interrupted: str) -> None:
    """Run a `python -m` entry point: Ctrl-C while importing or while running exits 130 without a traceback.

    `load_main` imports and returns the CLI's main, so that an interrupt during those imports is caught too.
    """
    import signal
    import sys

    handler = _interrupt_handler(interrupted)
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not when started with SIGINT ignored
        signal.signal(signal.SIGINT, handler)
    # SIGTERM (Slurm, Kubernetes, systemd) and SIGHUP (a closed terminal) stop as cleanly as Ctrl-C:
    # the running worker is stopped, temp folders are removed, and the exit code says which signal.
    for signum in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(signum) is signal.SIG_DFL:
            signal.signal(signum, handler)
    sys.unraisablehook = _quiet_unraisable(sys.unraisablehook)
    try:
        main = load_main()
    except KeyboardInterrupt as stop:
        print(interrupted, file=sys.stderr)
        sys.exit(exit_code(stop))
    code = main()
    if _swallowed and code not in (129, 130, 143):  # an interrupt that a callback swallowed after the last safe point
        print(interrupted, file=sys.stderr)
        code = 128 + _swallowed[-1]
    if code in (129, 130, 143):
        # Interrupted, possibly halfway through importing torch: leave without the interpreter's teardown,
        # which a half-imported extension can turn into a second KeyboardInterrupt and a traceback.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
