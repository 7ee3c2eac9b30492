"""Find and load weights: a local file or folder, the Hugging Face cache, the hub, or a seeded random init."""
from __future__ import annotations

import math
import os
import pickle
import socket
import sys
import threading
import warnings
from pathlib import Path
from urllib.parse import urlparse

from vitparity.errors import UserError

HF_FILES = ("model.safetensors", "pytorch_model.bin")
PICKLE_SUFFIXES = (".bin", ".pth", ".pt")
HUB_PROBE_SECONDS = 5.0
DEFAULT_ENDPOINT = "https://huggingface.co"


def hf_cache_dir() -> Path:
    """The hub cache folder, read from the environment at call time (HF_HUB_CACHE, then HF_HOME)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "huggingface"
    )
    return Path(home).expanduser() / "hub"


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT


def hub_reachable(endpoint: str, timeout: float = HUB_PROBE_SECONDS) -> bool:
    """True when a TCP connection to the endpoint opens within `timeout` seconds (DNS included).

    huggingface_hub retries for about a minute before it gives up on an unreachable network,
    so one bounded probe decides first whether a download can work at all.
    """
    url = urlparse(endpoint)
    host, port = url.hostname, url.port or (443 if url.scheme == "https" else 80)
    if not host:
        return False
    result = []

    def probe():
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append(True)
        except OSError:
            pass

    # getaddrinfo has no timeout of its own, so the probe runs in a thread we stop waiting for.
    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result)


def find_in_hf_cache(repo_id: str) -> Path | None:
    """The cached weights file of a hub repo, or None. Honours HF_HOME and HF_HUB_CACHE."""
    from huggingface_hub import try_to_load_from_cache

    for filename in HF_FILES:
        found = try_to_load_from_cache(repo_id, filename, cache_dir=str(hf_cache_dir()))
        if isinstance(found, str) and os.path.isfile(found):
            return Path(found)
    return None


def download_from_hub(repo_id: str) -> Path | None:
    """Download the weights from the hub (or HF_ENDPOINT's mirror) when it can work, else None."""
    if hub_offline() or not hub_reachable(hub_endpoint()):
        return None
    from huggingface_hub import hf_hub_download

    for filename in HF_FILES:
        try:
            return Path(
                hf_hub_download(
                    repo_id, filename, cache_dir=str(hf_cache_dir()), endpoint=hub_endpoint(), etag_timeout=10
                )
            )
        except Exception:  # noqa: BLE001 - any hub failure means "try the next file, then random init"
            continue
    return None


def weights_file(path: Path) -> Path:
    """The weights file inside `path` (a file, or a folder laid out like a hub download)."""
    if path.is_dir():
        for filename in HF_FILES:
            if (path / filename).is_file():
                return path / filename
        raise UserError(
            f"weights folder {path} holds neither {' nor '.join(HF_FILES)}; "
            "pass the weights file itself or a Hugging Face download of timm/<model>"
        )
    if not path.is_file():
        raise UserError(f"weights path {path} does not exist; pass a .safetensors/.bin/.pth file or a folder")
    return path


def read_state_dict(path: Path) -> dict:
    """Read tensors from a .safetensors file, or a .bin/.pth file with torch.load(weights_only=True)."""
    import torch

    path = weights_file(Path(path))
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        elif path.suffix in PICKLE_SUFFIXES:
            # weights_only refuses to unpickle arbitrary objects: a checkpoint cannot run code.
            with warnings.catch_warnings():  # torch's own notes (pickle protocol, weights_only=False) are noise here
                warnings.simplefilter("ignore")
                state = torch.load(str(path), map_location="cpu", weights_only=True)
        else:
            raise UserError(f"weights file {path} has suffix '{path.suffix}'; expected .safetensors, .bin or .pth")
    except UserError:
        raise
    except pickle.UnpicklingError as error:
        if "Weights only load failed" not in str(error):
            raise UserError(f"cannot read weights from {path}: {_first_line(error)}") from error
        raise UserError(
            f"weights file {path} holds pickled Python objects besides tensors; refused, since loading them could run "
            f"code. Convert it to .safetensors where you trust its origin, and pass that file"
        ) from error
    except Exception as error:  # noqa: BLE001 - corrupt or foreign files come in many shapes
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"cannot read weights from {path}: {first_line}") from error
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not state:
        raise UserError(f"weights file {path} holds no tensors")
    return state


def apply_state_dict(model, state: dict) -> None:
    """Load `state` into `model` strictly; a mismatch is a UserError naming missing and unexpected keys."""
    # The model is built with num_classes=0, so a classifier in the checkpoint has nowhere to go.
    classifier = model.pretrained_cfg.get("classifier", "head")
    classifiers = classifier if isinstance(classifier, (list, tuple)) else [classifier]
    state = {k: v for k, v in state.items() if not any(k.startswith(f"{c}.") for c in classifiers)}
    expected = set(model.state_dict())
    if set(state) != expected:
        # Checkpoints in the original (non-timm) layout, like Meta's DINOv2/DINOv3 files, are
        # converted by the filter of the model's own timm module.
        convert = getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", None)
        if convert is not None:
            try:
                state = convert(state, model)
            except Exception:  # noqa: BLE001 - the strict check below reports what is wrong
                pass
    missing = sorted(expected - set(state))
    unexpected = sorted(set(state) - expected)
    if missing or unexpected:
        raise UserError(
            "weights do not fit the architecture: "
            f"missing keys {_few(missing)}; unexpected keys {_few(unexpected)}. "
            "Check that the file belongs to this model."
        )
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        mismatch = [line.strip() for line in str(error).splitlines() if "size mismatch" in line]
        raise UserError(f"weights do not fit the architecture: {'; '.join(mismatch[:3]) or error}") from error


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _few(keys: list[str], limit: int = 5) -> str:
    if not keys:
        return "none"
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return "[" + ", ".join(keys[:limit]) + "]" + more


def trained_like_init(model, seed: int) -> None:
    """Re-initialise `model` with seeded weights whose magnitudes resemble a trained network.

    timm starts LayerScale gammas at 1e-5 and linear weights at std 0.02, which makes every block
    nearly the identity and every attention map nearly uniform; a comparison on such weights is
    blind to a broken block. Here gammas are near 1 and linear weights have std 1/sqrt(fan_in),
    so every block, and the shape of every attention map, moves the output.
    """
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                std = 1.0 / math.sqrt(module.in_features)
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * std)
                if module.bias is not None:
                    module.bias.copy_(torch.randn(module.bias.shape, generator=generator) * 0.02)
        for name, param in model.named_parameters():
            if name.rsplit(".", 1)[-1].startswith("gamma"):
                param.copy_(1.0 + 0.1 * torch.randn(param.shape, generator=generator))


def load_weights(model, weights: str, seed: int = 0) -> str:
    """Put weights into `model` and return where they came from, for the manifest.

    `weights` is "auto" (HF cache, then the hub when reachable, then random init), "random",
    or a path to a weights file or folder.
    """
    if weights == "random":
        trained_like_init(model, seed)
        return f"random-init (seed {seed})"
    if weights != "auto":
        path = weights_file(Path(weights).expanduser())
        apply_state_dict(model, read_state_dict(path))
        return f"file {path}"
    repo_id = (model.pretrained_cfg.get("hf_hub_id") or "").strip()
    why = "timm names no hub repository for this model"
    if repo_id:
        cached = find_in_hf_cache(repo_id)
        if cached is not None:
            apply_state_dict(model, read_state_dict(cached))
            return f"hf-cache {repo_id}"
        downloaded = download_from_hub(repo_id)
        if downloaded is not None:
            apply_state_dict(model, read_state_dict(downloaded))
            return f"hub {repo_id} via {hub_endpoint()}"
        why = (f"{repo_id} is not in the Hugging Face cache ({hf_cache_dir()}), and "
               + ("HF_HUB_OFFLINE=1" if hub_offline() else f"{hub_endpoint()} gave no weights"))
    trained_like_init(model, seed)
    return f"random-init (seed {seed}; {AUTO_FELL_BACK}: {why})"


AUTO_FELL_BACK = "--weights auto fell back"  # in a weights source: random weights nobody asked for, and why


def is_random(source: str) -> bool:
    return source.startswith("random-init")
