"""onnxruntime, opened with care: an import that names the fix when the install is broken, and
output captured where onnxruntime says why a provider was not created, so the reason is kept, not lost."""
from __future__ import annotations

import contextlib
import io
import os
import sys
import tempfile
import warnings
from pathlib import Path

from . import environment
from .errors import UserError


class RuntimeMissing(UserError):
    """onnxruntime cannot be imported here; the message says which fix applies."""


def cpu_threads() -> int:
    """The cores this process may run on (a container or taskset limit included), not the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@contextlib.contextmanager
def captured_output():
    """Collect what is written to stdout and stderr, by Python and by C++ libraries, into a list of lines.

    onnxruntime's C++ logger and NumPy's ABI complaint write to file descriptor 2, bypassing
    sys.stderr, and onnxruntime's Python layer print()s its "EP Error ... Falling back" notice to
    stdout: only swapping both file descriptors sees all of it, and keeps it off the user's terminal.
    """
    lines: list[str] = []
    sys.stdout.flush()
    sys.stderr.flush()
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    with tempfile.TemporaryFile() as sink, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        python_side = io.StringIO()
        for fd in saved:
            os.dup2(sink.fileno(), fd)
        try:
            with contextlib.redirect_stderr(python_side), contextlib.redirect_stdout(python_side):
                yield lines
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            for fd, copy in saved.items():
                os.dup2(copy, fd)
                os.close(copy)
            sink.seek(0)
            text = sink.read().decode(errors="replace") + python_side.getvalue()
            lines += [line.strip() for line in text.splitlines() if line.strip()]
            lines += [str(w.message) for w in caught]


def load_onnxruntime():
    """`import onnxruntime`, or a RuntimeMissing naming the distribution and the fix."""
    dists = environment.distributions("onnxruntime")
    if not dists:
        raise RuntimeMissing("onnxruntime is not installed: pip install -e '.[cpu]' (or the gpu / cann extra on such hosts)")
    dist = f"{dists[0]} {environment.version('onnxruntime')}"
    with captured_output() as said:
        try:
            import onnxruntime
        except Exception as error:  # noqa: BLE001 - ImportError, AttributeError (_ARRAY_API) or OSError
            failed = error
        else:
            return onnxruntime
    # Read once the capture has closed: only then does `said` hold what was printed.
    text = " ".join([str(failed), *said])
    if "NumPy 1.x" in text or "_ARRAY_API" in text or "numpy.core.multiarray" in text:
        import numpy

        raise RuntimeMissing(
            f"{dist} is built for NumPy 1.x but NumPy {numpy.__version__} is installed: pip install 'numpy<2'"
        ) from failed
    raise RuntimeMissing(f"{dist} cannot be imported: {_first_line(failed)}") from failed


# onnxruntime's U8U8 mode (kOrtSessionOptionsAvx2PrecisionMode in its session options header): on x86 without VNNI its
# u8s8 kernels sum pairs of products in 16 bits and saturate there; with this entry it turns the s8 weights of
# DynamicQuantizeMatMul, MatMulInteger and the like into u8 when it loads the graph and sums exactly, as VNNI does.
X64_PRECISION = "session.x64quantprecision"


def session_config(host: dict | None = None) -> dict[str, str]:
    """The config entries of every session here: onnxruntime's U8U8 mode where u8s8 can saturate (x86 without VNNI),
    so that a dynamic int8 graph computes the integer products a VNNI host verified, and its recipe keeps 8-bit
    weights on every host. Not on VNNI hosts: there u8s8 is exact already, and U8U8 was slower (docs/benchmarks.md)."""
    import platform

    if host is None:
        if platform.machine().lower() not in environment.X86_MACHINES:  # not x86: no CPU features read at all
            return {}
        host = environment.cpu()
    return {X64_PRECISION: "1"} if environment.u8s8_saturates(host) else {}


def session(path: Path, providers=("CPUExecutionProvider",), threads: int = 0, profile_prefix: str | None = None):
    """An InferenceSession at ORT_ENABLE_ALL, with `session_config`. `providers` are names or (name, options) pairs,
    as onnxruntime takes them."""
    ort = load_onnxruntime()
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    for key, value in session_config().items():
        options.add_session_config_entry(key, value)
    if profile_prefix:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    return ort.InferenceSession(str(path), options, providers=list(providers))


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
