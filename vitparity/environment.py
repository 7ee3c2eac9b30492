"""Versions of the libraries whose behaviour decides the numbers, read without importing them.

Reading package metadata instead of importing keeps a broken install (an onnxruntime built for
NumPy 1.x, a torch_npu without CANN) from crashing the tool before it can say what is wrong.
"""
from __future__ import annotations

import functools
import importlib.metadata as md
import importlib.util
import platform
from pathlib import Path

# Module name -> the distributions that can provide it. pip treats each as its own project, so
# one may silently replace another; which one is installed decides which providers exist.
PROVIDERS = {
    "torch": ("torch",),
    "timm": ("timm",),
    "onnx": ("onnx",),
    "onnxruntime": ("onnxruntime", "onnxruntime-gpu", "onnxruntime-cann", "onnxruntime-openvino", "onnxruntime-directml"),
    "onnxscript": ("onnxscript",),
    "torch_npu": ("torch-npu",),
}


@functools.lru_cache(maxsize=None)  # scanning every installed distribution takes 0.1-0.3 s; installs do not change mid-run
def _by_module() -> dict[str, list[str]]:
    return md.packages_distributions()


def _provides(name: str, module: str) -> bool:
    """Whether distribution `name` is installed and ships top-level package `module` (what packages_distributions
    reads, for one distribution: its top_level.txt, else the first folder of each file it installed)."""
    try:
        dist = md.distribution(name)
    except md.PackageNotFoundError:
        return False
    top = dist.read_text("top_level.txt")
    if top is not None:
        return module in top.split()
    record = dist.read_text("RECORD")  # "path,hash,size" lines; scanned as text: torch lists 17,000 files, and
    if record is not None:  # dist.files makes a path object of each (0.1 s)
        return any(line.split(",", 1)[0].split("/", 1)[0] in (module, f"{module}.py") for line in record.splitlines())
    return any(file.parts and file.parts[0] == module for file in dist.files or ())


def distributions(module: str) -> list[str]:
    """The installed distributions that provide `module`, the one `import module` would load first
    (e.g. ["onnxruntime-cann"]). More than one means their files may be mixed: pip does not know
    that onnxruntime and onnxruntime-cann are the same package."""
    return list(_distributions(module))


@functools.lru_cache(maxsize=None)  # installs do not change mid-run; every compare run asks twice
def _distributions(module: str) -> tuple[str, ...]:
    known = PROVIDERS.get(module, (module,))
    spec = importlib.util.find_spec(module)  # finds, does not run, the module import would load
    # The known providers are asked one by one; scanning every installed distribution (packages_distributions, 0.6 s
    # on a full environment) is left for a module that none of them provides and that can be imported: one that is
    # not there at all (torch_npu off an Ascend host) has no distribution to find. Names as their metadata spells them.
    names = [name for name in known if _provides(name, module)] or (sorted(
        {name.lower().replace("_", "-") for name in _by_module().get(module, [])}) if spec is not None else [])
    origin = Path(spec.origin).resolve() if spec and spec.origin else None

    def imported(name: str) -> bool:
        try:
            return Path(md.distribution(name).locate_file(f"{module}/__init__.py")).resolve() == origin
        except (md.PackageNotFoundError, OSError, TypeError):
            return False

    return tuple(sorted(names, key=lambda name: not imported(name)))


def version(module: str) -> str | None:
    """The installed version of the distribution that provides `module`, or None when none does."""
    for dist in distributions(module):
        try:
            return md.version(dist)
        except md.PackageNotFoundError:
            continue
    return None


def versions() -> dict:
    """python, torch, timm, onnx, onnxruntime (and which distribution provides it), onnxscript; None when absent."""
    found = {"python": platform.python_version()}
    for module in ("torch", "timm", "onnx", "onnxruntime", "onnxscript"):
        found[module] = version(module)
    found["onnxruntime_distribution"] = ", ".join(distributions("onnxruntime")) or None
    return found


# What `make host-deps` keeps: the host's own accelerator builds, pinned as pip constraints.
KEPT = ("torch", "torchvision", "torch-npu", *PROVIDERS["onnxruntime"])
# The project's extra for each onnxruntime distribution (pyproject.toml); plain onnxruntime when none is installed.
EXTRAS = {"onnxruntime": "cpu", "onnxruntime-gpu": "gpu", "onnxruntime-cann": "cann"}


def host_constraints() -> list[str]:
    """`name==version` for every installed distribution in KEPT, and NumPy kept to its major version.

    The host's accelerator builds are compiled against its NumPy: onnxruntime-cann 1.24.4 cannot be
    imported under NumPy 2, and ml_dtypes 0.6 (through onnxscript) would make pip upgrade to 2.
    """
    pins = []
    for name in KEPT:
        try:
            pins.append(f"{name}=={md.version(name)}")
        except md.PackageNotFoundError:
            continue
    try:
        pins.append(f"numpy<{int(md.version('numpy').split('.')[0]) + 1}")
    except (md.PackageNotFoundError, ValueError):
        pass
    return pins


def onnxruntime_extra() -> str:
    """The extra that keeps the installed onnxruntime variant (cpu when there is none)."""
    installed = distributions("onnxruntime")
    return EXTRAS.get(installed[0], "cpu") if installed else "cpu"


if __name__ == "__main__":  # used by `make host-deps`
    import sys

    print("\n".join(host_constraints()) if sys.argv[1:] == ["constraints"] else onnxruntime_extra())


# The CPU features that change int8 numerics: with VNNI (or AMX) onnxruntime's u8s8 kernels accumulate exactly;
# with AVX2 alone they use vpmaddubsw, whose 16-bit intermediate sums can saturate (onnxruntime's quantization
# docs advise reduce_range there); ARM's dot-product extensions (asimddp, i8mm) take the place of VNNI.
INT8_FEATURES = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "asimddp", "i8mm")
VNNI = ("avx512_vnni", "avx_vnni", "amx_int8")
X86_MACHINES = ("x86_64", "amd64", "i386", "i686")  # platform.machine() on x86


@functools.lru_cache(maxsize=None)  # the CPU does not change during a run
def cpu() -> dict:
    """This host's CPU as int8 numerics see it: {"model", "machine", "int8_features"}. On Linux from the kernel's
    /proc/cpuinfo; elsewhere with py-cpuinfo (CPUID). Unknown where neither can tell."""
    info = _proc_cpuinfo() or _py_cpuinfo()
    flags = {flag.lower() for flag in info.get("flags", [])}
    # py-cpuinfo spells some flags both ways (avx512_vnni and avx512vnni): accept either.
    found = [feature for feature in INT8_FEATURES if feature in flags or feature.replace("_", "") in flags]
    return {"model": info.get("brand_raw") or platform.processor() or "unknown", "machine": platform.machine(),
            "int8_features": found if info else None}


def _proc_cpuinfo(path: str = "/proc/cpuinfo") -> dict:
    """The first processor's model name and flags ("flags" on x86, "Features" on ARM) as py-cpuinfo names them,
    or {} where the file is missing or has no flags. Read here rather than through py-cpuinfo, which takes about
    a second on every call: it runs CPUID in a helper process it starts."""
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return {}
    fields = {}
    for line in text.split("\n\n", 1)[0].splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip().lower(), value.strip())
    flags = fields.get("flags") or fields.get("features")
    if not flags:
        return {}
    return {"brand_raw": fields.get("model name", ""), "flags": flags.split()}


def _py_cpuinfo() -> dict:
    try:
        import cpuinfo  # py-cpuinfo

        return cpuinfo.get_cpu_info()
    except Exception:  # noqa: BLE001 - an exotic host: the features are then unknown, never a crash
        return {}


def u8s8_saturates(host: dict) -> bool:
    """Whether onnxruntime's u8s8 int8 kernels can saturate on `host`: x86 without VNNI, where they sum pairs of
    products in 16 bits (VNNI sums them in 32). There every session runs u8 by s8 products as u8 by u8, which sums
    exactly (vitparity/runtime.py), and the calibrated int8 recipe uses 7-bit weights. False where the features
    are unknown."""
    features = host.get("int8_features")
    return bool(features is not None and is_x86(host) and not any(f in features for f in VNNI))


def is_x86(host: dict | None) -> bool:
    """Whether `host` (a cpu() record, or None where none was recorded) is an x86 machine."""
    return bool(host) and str(host.get("machine", "")).lower() in X86_MACHINES


def int8_host_note(verified: dict | None, here: dict) -> str | None:
    """Why an int8 graph's verify figures may not hold here, or None: the verifying host's int8 features
    differ from this host's (or were not recorded). For dynamic int8 between two x86 hosts, whose products are
    summed exactly on both (compare.run.host_warnings), the caller does not ask."""
    if not verified or verified.get("int8_features") is None:
        return "its verifying host's CPU features were not recorded (an older export): int8 numerics depend on them"
    if here.get("int8_features") is None or set(verified["int8_features"]) == set(here["int8_features"]):
        return None
    shown = lambda host: ", ".join(host["int8_features"]) or "none of " + "/".join(INT8_FEATURES[:3])  # noqa: E731
    return (f"verified on {verified.get('model', 'another CPU')} ({shown(verified)}), but this host's "
            f"{here.get('model', 'CPU')} has {shown(here)}: int8 numerics depend on VNNI, so its verify figures do not carry over")


# The device files each accelerator's driver makes: what says "this host has one", whatever Python has installed.
DEVICE_FILES = {"ascend": "davinci[0-9]*", "cuda": "nvidia[0-9]*"}
DEVICE_ROOT = "VIT_PARITY_DEVICE_ROOT"  # where they are looked for: /dev, or another folder (a container's, the tests')
FIX = {
    "ascend": "the host has an Ascend NPU: run with its own torch and torch_npu: source /usr/local/Ascend/ascend-toolkit/"
              "set_env.sh, then make host-deps PYTHON=python3 once, then make compare PYTHON=python3",
    "cuda": "the host has an NVIDIA GPU: install onnxruntime-gpu (make host-deps PYTHON=python3 with a CUDA torch) or use "
            "a CUDA build of torch, then run again",
}


def accelerators() -> dict[str, list[str]]:
    """{"ascend": ["/dev/davinci0", ...], "cuda": [...]}: the accelerators whose device files this host has."""
    import glob
    import os

    root = os.environ.get(DEVICE_ROOT) or "/dev"
    found = {kind: sorted(glob.glob(os.path.join(root, pattern))) for kind, pattern in DEVICE_FILES.items()}
    return {kind: files for kind, files in found.items() if files}

