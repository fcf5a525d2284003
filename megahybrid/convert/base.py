"""The pieces every Hugging Face architecture converter is built from.

An `HFArchitecture` is four pure functions between two worlds:

    HF config.json dict  --config_from_hf-->  megahybrid `model` dict   --config_to_hf-->  config.json dict
    HF tensors (on-disk) --state_from_hf--->  `ReferenceLM` tensors     --state_to_hf--->  HF tensors

HF tensors are always the *hub (on-disk) layout*, the one `save_pretrained` writes and every
transformers version loads (per-expert MoE keys, `backbone.` prefixes; shared/notes/hf-conversion.md).
`Tensors` pops what it uses, so a converter that forgets a tensor fails with its name instead of
silently dropping weights.
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import torch


class ConversionError(ValueError):
    """A checkpoint or config that cannot be converted; the message names the tensor or field."""


@dataclass(frozen=True)
class HFArchitecture:
    model_type: str
    """`config.json`'s `model_type`."""
    hf_class: str
    """"module:Class" of the transformers (or FLA) causal-LM class, for tests and docs."""
    config_from_hf: Callable[[dict], dict]
    """HF config dict -> megahybrid `model` section (a dict of `ModelConfig` fields)."""
    config_to_hf: Callable[[object], dict]
    """`ModelConfig` -> HF config dict; raises ConversionError for a model HF cannot express."""
    state_from_hf: Callable[["Tensors", object], dict]
    """HF tensors (hub layout) + the converted `ModelConfig` -> `ReferenceLM` state dict."""
    state_to_hf: Callable[["Tensors", object], dict]
    """`ReferenceLM` state dict + `ModelConfig` -> HF tensors (hub layout)."""
    note: str = ""
    """What the conversion folds, drops or cannot express (shown by `megahybrid convert --list`)."""


ARCHITECTURES: dict[str, HFArchitecture] = {}

_MODULES = ("mamba2", "nemotron_h", "bamba", "granitemoehybrid", "qwen3_next", "qwen3_5", "olmo_hybrid",
            "fla", "recurrent_gemma", "jamba", "zamba2", "falcon_h1")
"""`megahybrid.convert.hf_<name>` modules; each registers its architectures on import."""


def register(arch: HFArchitecture) -> HFArchitecture:
    if arch.model_type in ARCHITECTURES:
        raise ValueError(f"HF architecture {arch.model_type!r} registered twice")
    ARCHITECTURES[arch.model_type] = arch
    return arch


def load_all() -> dict[str, HFArchitecture]:
    for name in _MODULES:
        try:
            importlib.import_module(f"megahybrid.convert.hf_{name}")
        except ModuleNotFoundError as e:
            if e.name != f"megahybrid.convert.hf_{name}":
                raise
    return ARCHITECTURES


def get(model_type: Optional[str]) -> HFArchitecture:
    archs = load_all()
    if model_type not in archs:
        raise ConversionError(f"HF model_type {model_type!r} is not supported; supported: "
                              f"{', '.join(sorted(archs))}")
    return archs[model_type]


class Tensors:
    """A state dict that is consumed: `pop` names a missing key and lists near ones, `done`
    names every tensor nobody used."""

    def __init__(self, tensors: dict, where: str, source_config: Optional[dict] = None):
        self.tensors = dict(tensors)
        self.where = where
        self.source_config = source_config or {}
        """The HF config.json dict the tensors came from (HF -> megahybrid only): converters that fold
        per-weight multipliers (Falcon-H1's µP constants) read them here."""

    def __contains__(self, key: str) -> bool:
        return key in self.tensors

    def pop(self, key: str, shape: Optional[Iterable[int]] = None) -> torch.Tensor:
        if key not in self.tensors:
            stem = key.rsplit(".", 2)[0]
            near = sorted(k for k in self.tensors if k.startswith(stem))[:6]
            raise ConversionError(f"{self.where}: tensor {key!r} is missing"
                                  + (f" (present under {stem!r}: {', '.join(near)})" if near else ""))
        tensor = self.tensors.pop(key)
        if shape is not None:
            check_shape(key, tensor, shape)
        return tensor

    def get(self, key: str, default=None):
        return self.tensors.pop(key, default)

    def done(self) -> None:
        if self.tensors:
            keys = sorted(self.tensors)
            more = f" and {len(keys) - 8} more" if len(keys) > 8 else ""
            raise ConversionError(f"{self.where}: {len(keys)} tensor(s) not used by the conversion: "
                                  f"{', '.join(keys[:8])}{more}")


def check_shape(name: str, tensor: torch.Tensor, expected: Iterable[int]) -> None:
    expected = tuple(expected)
    if tuple(tensor.shape) != expected:
        raise ConversionError(f"tensor {name!r}: shape {tuple(tensor.shape)} in the checkpoint, "
                              f"{expected} expected from the config")


def hf_field(hf: dict, *names: str, default=dataclasses.MISSING):
    """The first of `names` present in the HF config dict (HF renames fields between classes)."""
    for name in names:
        if name in hf and hf[name] is not None:
            return hf[name]
    if default is dataclasses.MISSING:
        raise ConversionError(f"HF config: none of the fields {', '.join(names)} is set")
    return default


def unsupported(field: str, value, why: str) -> ConversionError:
    """The error for a megahybrid model the target format cannot express."""
    return ConversionError(f"model.{field}={value!r}: {why}")
