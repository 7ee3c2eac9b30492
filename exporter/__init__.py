"""Export timm Vision Transformers to verified ONNX artifacts at their native resolution."""
import os

# torch auto-loads device backends such as torch_npu on import; on a host where torch_npu is
# installed but CANN is not, that makes `import torch` itself crash (libhccl.so). Backends that
# need torch_npu import it explicitly, so auto-loading is never needed here.
os.environ.setdefault("TORCH_DEVICE_BACKEND_AUTOLOAD", "0")


def entry_point(load_main, interrupted: str) -> None:
    """Run a `python -m` entry point: Ctrl-C while importing or while running exits 130 without a traceback.

    `load_main` imports and returns the CLI's main, so that an interrupt during those imports is caught too.
    """
    import sys

    try:
        main = load_main()
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        sys.exit(130)
    code = main()
    if code == 130:
        # Interrupted, possibly halfway through importing torch: leave without the interpreter's teardown,
        # which a half-imported extension can turn into a second KeyboardInterrupt and a traceback.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
