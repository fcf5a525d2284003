"""Reading and writing Hugging Face model directories without building the model.

Weights are read with safetensors (single file or `model.safetensors.index.json` shards) or, for
old `pytorch_model*.bin` files, `torch.load(weights_only=True)`: nothing is unpickled as code.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from megahybrid.convert.base import ConversionError


def is_hf_dir(path: Path) -> bool:
    return (path / "config.json").is_file()


def _decode(value):
    """transformers 5 writes non-finite floats as {"__float__": "Infinity"}."""
    if isinstance(value, dict):
        if set(value) == {"__float__"}:
            return float(value["__float__"])
        return {k: _decode(v) for k, v in value.items()}
    return [_decode(v) for v in value] if isinstance(value, list) else value


def _encode(value):
    if isinstance(value, float) and not math.isfinite(value):
        return {"__float__": str(value).replace("inf", "Infinity").replace("nan", "NaN")}
    if isinstance(value, dict):
        return {k: _encode(v) for k, v in value.items()}
    return [_encode(v) for v in value] if isinstance(value, (list, tuple)) else value


def read_config(path: Path) -> dict:
    config = _decode(json.loads((path / "config.json").read_text()))
    if "model_type" not in config:
        raise ConversionError(f"{path / 'config.json'}: no model_type field; is this a Hugging Face model?")
    return config


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        tensors: dict = {}
        for name in files:
            tensors.update(load_file(path / name))
        return tensors
    if (path / "model.safetensors").is_file():
        return load_file(path / "model.safetensors")
    bins = sorted(path.glob("pytorch_model*.bin"))
    if bins:
        tensors = {}
        for name in bins:
            tensors.update(torch.load(name, map_location="cpu", weights_only=True))
        return tensors
    raise ConversionError(f"{path}: no model.safetensors, model.safetensors.index.json or pytorch_model*.bin")


def write(path: Path, config: dict, tensors: dict[str, torch.Tensor]) -> None:
    """config.json + model.safetensors (one file; tensors made contiguous and unshared)."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(_encode(config), indent=2, sort_keys=True) + "\n")
    save_tensors(tensors, path / "model.safetensors")


def save_tensors(tensors: dict[str, torch.Tensor], file: Path) -> None:
    """safetensors refuses shared or strided storage: every tensor is made contiguous, CPU and its own."""
    seen: set[int] = set()
    out = {}
    for key, t in tensors.items():
        t = t.detach().cpu().contiguous()
        if t.data_ptr() in seen and t.numel():
            t = t.clone()
        seen.add(t.data_ptr())
        out[key] = t
    save_file(out, str(file), metadata={"format": "pt"})
