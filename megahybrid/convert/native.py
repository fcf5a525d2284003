"""megahybrid's native checkpoint: a directory with `model.safetensors` (`ReferenceLM` names) and
`config.yaml` (the resolved config), the same two files every training checkpoint holds, so a run
directory, one of its `step_*` checkpoints and a converted model are all read the same way.
`source.json`, when present, records where a converted model came from (its HF `model_type`),
so converting it back to Hugging Face needs no `--arch`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file

from megahybrid.convert.base import ConversionError
from megahybrid.convert.hf_io import save_tensors
from megahybrid.train.checkpoint import CONFIG, MODEL, config_yaml, find_latest, read_config

SOURCE = "source.json"


def is_native_dir(path: Path) -> bool:
    return (path / CONFIG).is_file() and (path / MODEL).is_file() or (path / "checkpoints").is_dir()


def resolve(path: Path) -> Path:
    """A run directory resolves to its newest valid checkpoint."""
    if (path / CONFIG).is_file() and (path / MODEL).is_file():
        return path
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    found = find_latest(root)
    if found is None:
        raise ConversionError(f"{path}: not a megahybrid checkpoint (no {MODEL} + {CONFIG}, no checkpoints/)")
    return found[0]


def read(path: Path):
    """(Config, state dict, source dict) of a native checkpoint; tied weights appear under both names."""
    path = resolve(Path(path))
    config = read_config(path)
    tensors = load_file(path / MODEL)
    source = json.loads((path / SOURCE).read_text()) if (path / SOURCE).is_file() else {}
    return config, tensors, source


def write(path: Path, config, tensors: dict[str, torch.Tensor], source: Optional[dict] = None) -> None:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / CONFIG).write_text(config_yaml(config))
    save_tensors(tensors, path / MODEL)
    if source:
        (path / SOURCE).write_text(json.dumps(source, indent=2) + "\n")

