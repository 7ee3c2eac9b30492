"""The model registry: aliases, name resolution, and the model's own data config."""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path

from .artifact import MANIFEST, plain_name
from .errors import UserError

ALIASES = {
    "dinov2": "vit_small_patch14_reg4_dinov2.lvd142m",
    "dinov3": "vit_small_patch16_dinov3.lvd1689m",
}


@dataclass(frozen=True)
class ModelSpec:
    """A resolved model: the name the user gave, its timm name and its artifact folder name."""

    alias: str | None
    timm_name: str

    @property
    def key(self) -> str:
        """The artifact folder name: the alias when there is one, else the timm name."""
        return self.alias or self.timm_name

    @property
    def pretrained_tag(self) -> str:
        return self.timm_name.partition(".")[2]


def resolve(name: str, exported: Path | str | None = None) -> ModelSpec:
    """Turn an alias or a timm model name into a ModelSpec, or raise a UserError naming the closest matches.

    With `exported` (an artifacts root), a name that has an artifact there is taken as it is, without
    importing timm: the artifact's loader checks it, and a reader of artifacts need not pay for timm."""
    if name in ALIASES:
        return ModelSpec(alias=name, timm_name=ALIASES[name])
    for alias, timm_name in ALIASES.items():
        if name == timm_name:
            return ModelSpec(alias=alias, timm_name=timm_name)
    if exported is not None and plain_name(name) and (Path(exported) / name / MANIFEST).is_file():
        return ModelSpec(alias=None, timm_name=name)
    import timm  # only here: importing it (and torch) costs seconds that a registered name need not pay

    architecture = name.partition(".")[0]
    if timm.is_model(architecture):
        return ModelSpec(alias=None, timm_name=name)
    candidates = list(ALIASES) + timm.list_models(pretrained=True) + timm.list_models()
    close = difflib.get_close_matches(name, candidates, n=5, cutoff=0.5)
    hint = f" Closest: {', '.join(close)}." if close else ""
    raise UserError(
        f"model '{name}' is not known.{hint} See: python -m exporter --list"
    )


# What timm.create_model takes for itself, what the artifact sets (no classifier, the size option, 3 channels), and
# what reads files or the hub: never a --model-kwargs key.
RESERVED_KWARGS = ("pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path", "cache_dir", "num_classes",
                   "dynamic_img_size", "features_only", "in_chans", "scriptable", "exportable", "no_jit")


def parse_model_kwargs(words) -> dict:
    """timm's --model-kwargs: KEY=VALUE words as {key: value}, VALUE read as a Python literal (2, 1e-5, True, None,
    'token', [224, 224]) and otherwise taken as the word itself (global_pool=token). A UserError for anything else."""
    import ast

    found = {}
    for word in words:
        key, equals, text = word.partition("=")
        if not equals or not key.isidentifier():
            raise UserError(f"--model-kwargs takes KEY=VALUE words (e.g. depth=2 global_pool=token); {word!r} is not one "
                            f"(model names go before --model-kwargs)")
        if key in RESERVED_KWARGS:
            raise UserError(f"--model-kwargs {key}=... is set by vit-parity itself (or reads files); leave it out"
                            + (" and use --dynamic-size" if key == "dynamic_img_size" else ""))
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            value = text
        found[key] = _plain(value, word)
    return found


def _plain(value, word: str):
    """`value` as JSON can hold it in a manifest (a tuple as a list); a UserError for what it cannot."""
    if isinstance(value, (tuple, list)):
        return [_plain(item, word) for item in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise UserError(f"--model-kwargs {word}: the value is a {type(value).__name__}; give a number, a word, True/False/None "
                    f"or a list of them")


def kwargs_words(kwargs: dict) -> list[str]:
    """The --model-kwargs words that parse back to `kwargs` exactly (a string quoted: global_pool='token')."""
    return [f"{key}={value!r}" for key, value in kwargs.items()]


def kwargs_label(kwargs: dict) -> str:
    """The model kwargs as a user would type them: "depth=2 global_pool=token" ("" for none)."""
    return " ".join(f"{key}={value}" for key, value in kwargs.items())


def create(spec: ModelSpec, model_kwargs: dict | None = None, **kwargs):
    """Build the timm model with no classifier and no download, with the artifact's `model_kwargs` (--model-kwargs)
    and the options `kwargs` of vit-parity's own. The weights are set by the caller. A keyword the architecture does
    not take is a UserError naming it."""
    import timm

    reserved = [key for key in (model_kwargs or {}) if key in RESERVED_KWARGS]  # a manifest is read as data too
    if reserved:
        raise UserError(f"model kwargs {reserved[0]}=... is set by vit-parity itself (or reads files): not taken")
    try:
        return timm.create_model(spec.timm_name, pretrained=False, num_classes=0, **(model_kwargs or {}), **kwargs).eval()
    except Exception as error:  # noqa: BLE001 - a constructor given a value it refuses raises any type (assert, range)
        if not model_kwargs or "dynamic_img_size" in str(error):  # not the user's kwargs (build_model reads this one)
            raise
        architecture = spec.timm_name.partition(".")[0]
        wrong = [key for key in model_kwargs if isinstance(error, TypeError) and f"'{key}'" in str(error)]
        if wrong:
            raise UserError(f"--model-kwargs {wrong[0]}=...: timm's {architecture} does not take it ({error})") from None
        said = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"timm's {architecture} cannot be built with --model-kwargs {kwargs_label(model_kwargs)}: "
                        f"{said}") from None


def data_config(model) -> dict:
    """The model's own preprocessing config from timm: input_size, mean, std, interpolation, crop_pct."""
    from timm.data import resolve_model_data_config

    config = resolve_model_data_config(model)
    return {key: list(value) if isinstance(value, tuple) else value for key, value in config.items()}


GROUPS = ("cls", "registers", "patches")


def token_layout(model, tokens_shape) -> dict | None:
    """How the `tokens` output splits, from timm's own attributes: {"cls": n, "registers": n, "patches": n,
    "grid": [h, w]}, or None when the model's tokens are not a [prefix tokens, patch grid] sequence (SAM's
    NHWC map, XCiT) or the attributes do not add up to the output's length."""
    prefix = getattr(model, "num_prefix_tokens", None)
    grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
    if prefix is None or grid is None or len(tokens_shape) != 3:
        return None
    cls = 1 if getattr(model, "cls_token", None) is not None else 0
    reg_token = getattr(model, "reg_token", None)  # Eva has reg_token but no num_reg_tokens
    registers = int(reg_token.shape[1]) if reg_token is not None else int(getattr(model, "num_reg_tokens", 0) or 0)
    patches = int(grid[0]) * int(grid[1])
    if cls + registers != prefix or prefix + patches != tokens_shape[1]:
        return None
    return {"cls": cls, "registers": registers, "patches": patches, "grid": [int(grid[0]), int(grid[1])]}


def layout_of(timm_name: str, tokens_shape) -> dict | None:
    """The token layout of an architecture, built on the meta device (no memory, no weights): for artifacts
    exported before the manifest recorded it."""
    import timm
    import torch

    with torch.device("meta"):
        model = timm.create_model(timm_name, pretrained=False, num_classes=0)
    return token_layout(model, tokens_shape)


def token_groups(layout: dict | None) -> dict[str, slice]:
    """The token axis slice of each group the model has, in order: cls, registers, patches."""
    if not layout:
        return {}
    starts = {"cls": 0, "registers": layout["cls"], "patches": layout["cls"] + layout["registers"]}
    return {name: slice(starts[name], starts[name] + layout[name]) for name in GROUPS if layout.get(name)}
