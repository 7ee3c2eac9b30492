"""The eager model of an artifact, as both tools run it: rebuilt from the artifact's own weights, and called so
that one call gives both outputs (pooled, tokens)."""
from __future__ import annotations

import numpy as np
import torch

from . import artifact, registry
from .errors import UserError


class TwoOutputs(torch.nn.Module):
    """Wraps a timm model so one call returns (pooled, tokens): model(x) and forward_features(x)."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.eval()

    def forward(self, pixel_values):
        tokens = self.model.forward_features(pixel_values)
        return self.model.forward_head(tokens), tokens


def eager_outputs(model, batch: np.ndarray) -> dict[str, np.ndarray]:
    """The model's float32 outputs for `batch` (NCHW float32), in inference mode."""
    with torch.inference_mode():
        pooled, tokens = TwoOutputs(model)(torch.from_numpy(batch))
    return {"pooled": pooled.numpy(), "tokens": tokens.numpy()}


def rebuild_model(art: artifact.Artifact):
    """The eager model of an artifact, rebuilt from its weights.safetensors with a strict load."""
    from safetensors.torch import load_file

    from . import sizes

    spec = registry.ModelSpec(alias=art.manifest.get("alias"), timm_name=art.manifest["timm_name"])
    # A graph for every size was traced from timm's dynamic-size model: the eager model runs at any size too.
    model = registry.create(spec, artifact.model_kwargs(art.manifest),
                            **({"dynamic_img_size": True} if sizes.record(art.manifest)["dynamic"] else {}))
    try:
        model.load_state_dict(load_file(str(art.path("weights.safetensors"))), strict=True)
    except RuntimeError as error:
        raise UserError(f"{art.path('weights.safetensors')} does not fit {spec.timm_name}: {(str(error).splitlines() or [''])[0]}") from error
    return model
