"""Checkpoints: `RUN/checkpoints/step_00000100/` holds

    model.safetensors      weights (tied weights stored once)
    optimizer.safetensors  optimizer state tensors; param groups as JSON in the header
    rng.safetensors        torch CPU (and CUDA) generator states
    config.yaml            the resolved config
    adapters.json          only with adapters: method, rank, alpha, targets, dtype, modules, base sha256
    meta.json              step, tokens, elapsed time, NaN-skip streak, and size + sha256 per file

Nothing is unpickled: every tensor comes from safetensors, everything else from JSON/YAML, so a
checkpoint from an untrusted source cannot run code. A checkpoint is written into a temporary
directory, fsynced and renamed into place, so it is either complete or absent; its meta.json
checksums catch later truncation or corruption, and `find_latest` then warns and falls back to
the previous one. Only the newest `keep_last` are kept.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from collections import defaultdict
from pathlib import Path
from typing import Optional

import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, load_model, save_file, save_model

from megahybrid import adapters
from megahybrid.config import ConfigError

FORMAT = 1
MODEL, OPTIMIZER, RNG, CONFIG, META = ("model.safetensors", "optimizer.safetensors", "rng.safetensors",
                                       "config.yaml", "meta.json")


class CheckpointError(RuntimeError):
    """A checkpoint that is incomplete, corrupt or from another model."""


def config_yaml(config) -> str:
    def plain(x):
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        return [plain(v) for v in x] if isinstance(x, (list, tuple)) else x

    return yaml.safe_dump(plain(config.to_dict()), sort_keys=False)


def upgrade_saved_config(data: dict) -> dict:
    """A config dict read from a checkpoint's config.yaml, with the fields added since it was written set
    to what the checkpoint was built with where that differs from the new default (a saved config always
    holds every section, so a missing field means an older megahybrid wrote it):
    - model.rwkv7.value_residual (issue 12): `k` layers had no value residual (no v_lora) before; false."""
    rwkv7 = (data.get("model") or {}).get("rwkv7")
    if isinstance(rwkv7, dict) and "value_residual" not in rwkv7:
        data = {**data, "model": {**data["model"], "rwkv7": {**rwkv7, "value_residual": False}}}
    return data


def read_config(path: Path):
    """The `Config` saved in the checkpoint directory `path` (config.yaml, upgraded)."""
    import megahybrid

    return megahybrid.load_config(upgrade_saved_config(yaml.safe_load((path / CONFIG).read_text())))


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _optimizer_tensors(optimizer) -> tuple[dict, dict]:
    state = optimizer.state_dict()
    tensors = {f"{pid}.{key}": (v if torch.is_tensor(v) else torch.tensor(v)).detach().contiguous()
               for pid, per_param in state["state"].items() for key, v in per_param.items()}
    return tensors, {"param_groups": json.dumps(state["param_groups"])}


def _load_optimizer(optimizer, path: Path, device) -> None:
    state: dict = defaultdict(dict)
    for key, value in load_file(path, device=str(device)).items():
        pid, name = key.split(".", 1)
        state[int(pid)][name] = value.cpu() if name == "step" else value
    with safe_open(path, "pt") as f:
        groups = json.loads(f.metadata()["param_groups"])
    for group in groups:
        if "betas" in group:
            group["betas"] = tuple(group["betas"])
    optimizer.load_state_dict({"state": dict(state), "param_groups": groups})


def save(root: Path, step: int, model, optimizer, config, meta: dict, keep_last: int) -> Path:
    """Write checkpoint `step` atomically under `root`; prune to the newest `keep_last`."""
    root.mkdir(parents=True, exist_ok=True)
    for junk in [*root.glob(".tmp-*"), *root.glob(".stale-*")]:  # left by a writer that was killed
        shutil.rmtree(junk, ignore_errors=True)
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp-step_{step:08d}-{os.getpid()}"
    tmp.mkdir()
    save_model(model, str(tmp / MODEL))
    tensors, header = _optimizer_tensors(optimizer)
    save_file(tensors, str(tmp / OPTIMIZER), metadata=header)
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    save_file(rng, str(tmp / RNG))
    (tmp / CONFIG).write_text(config_yaml(config))
    adapter_meta = adapters.metadata(model)
    if adapter_meta is not None:
        (tmp / adapters.METADATA).write_text(json.dumps(adapter_meta, indent=1))
    files = {}
    for name in (MODEL, OPTIMIZER, RNG, CONFIG, *([adapters.METADATA] if adapter_meta is not None else [])):
        _fsync(tmp / name)
        files[name] = {"bytes": (tmp / name).stat().st_size, "sha256": _sha256(tmp / name)}
    (tmp / META).write_text(json.dumps({"format": FORMAT, "step": step, **meta, "files": files}, indent=1))
    _fsync(tmp / META)
    _fsync(tmp)
    if final.exists():  # e.g. a corrupt checkpoint of this step that the run fell back from
        stale = root / f".stale-{final.name}-{os.getpid()}"
        final.rename(stale)
        shutil.rmtree(stale)
    tmp.rename(final)
    _fsync(root)
    for old in checkpoints(root)[max(1, keep_last):]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def checkpoints(root: Path) -> list[Path]:
    """Checkpoint directories under `root`, newest first."""
    if not root.is_dir():
        return []
    return sorted((p for p in root.glob("step_*") if p.is_dir()), key=lambda p: p.name, reverse=True)


def verify(path: Path) -> dict:
    """meta.json of `path` after checking every file's size and sha256; CheckpointError if not."""
    try:
        meta = json.loads((path / META).read_text())
        files = meta["files"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{META} unreadable: {err}") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"format {meta.get('format')!r}, expected {FORMAT}")
    for name in (MODEL, OPTIMIZER, RNG, CONFIG, *([adapters.METADATA] if adapters.METADATA in files else [])):
        file = path / name
        if name not in files or not file.is_file():
            raise CheckpointError(f"{name} missing")
        if file.stat().st_size != files[name]["bytes"]:
            raise CheckpointError(f"{name} has {file.stat().st_size} bytes, expected {files[name]['bytes']} (truncated?)")
        if _sha256(file) != files[name]["sha256"]:
            raise CheckpointError(f"{name} checksum mismatch (corrupt)")
    return meta


def config_changes(path: Path, config) -> list[str]:
    """Dotted names of the fields where `config` differs from the checkpoint's config.yaml."""
    def flat(d, prefix=""):
        out = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    old = flat(upgrade_saved_config(yaml.safe_load((path / CONFIG).read_text())))
    new = flat(yaml.safe_load(config_yaml(config)))
    return [k for k in new if old.get(k) != new[k]] + [k for k in old if k not in new]


def find_latest(root: Path, warn=None) -> Optional[tuple[Path, dict]]:
    """The newest checkpoint that verifies, warning about each newer one that does not."""
    warn = warn or (lambda msg: print(f"megahybrid: warning: {msg}", file=sys.stderr, flush=True))
    for path in checkpoints(root):
        try:
            return path, verify(path)
        except CheckpointError as err:
            warn(f"checkpoint {path} is unusable ({err}); falling back to the previous one")
    return None


def restore(path: Path, model, optimizer, device) -> None:
    """Load weights, optimizer state and RNG states of a verified checkpoint into place."""
    check_adapters(path, model)
    try:
        load_model(model, str(path / MODEL), strict=True, device=str(device))
    except (RuntimeError, KeyError) as err:
        raise CheckpointError(f"checkpoint {path} does not fit this model (was the model config changed?): "
                              f"{str(err).splitlines()[0]}") from None
    if optimizer is not None:
        _load_optimizer(optimizer, path / OPTIMIZER, device)
    rng = load_file(str(path / RNG))
    torch.set_rng_state(rng["cpu"])
    cuda = [rng[f"cuda.{i}"] for i in range(len(rng) - 1)]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def check_adapters(path: Path, model) -> None:
    """CheckpointError naming the field if the checkpoint's adapters.json (or its absence) disagrees
    with the adapters of `model` (its base weights come from this checkpoint, so no base hash check)."""
    saved_file = path / adapters.METADATA
    if not saved_file.is_file():
        if adapters.metadata(model, with_base_hash=False) is not None:
            raise CheckpointError(f"checkpoint {path} has no adapters but the model has "
                                  f"{model.adapter_metadata['method']} adapters; set model.adapters.method='none'")
        return
    try:
        adapters.check_metadata(json.loads(saved_file.read_text()), model, str(saved_file), check_base=False)
    except ConfigError as err:
        raise CheckpointError(str(err)) from None


def load_model_checkpoint(path) -> tuple[torch.nn.Module, object]:
    """(model, config) from a checkpoint directory, or the newest valid checkpoint of a run
    directory (or of its `checkpoints/`). The model is the reference backend's, in eval mode."""
    import megahybrid

    path = Path(path)
    if not (path / META).is_file():
        root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
        found = find_latest(root)
        if found is None:
            raise CheckpointError(f"{path}: no valid checkpoint found (expected a step_* directory with {META})")
        path = found[0]
    else:
        verify(path)
    config = read_config(path)
    model = megahybrid.build_model(config)
    check_adapters(path, model)
    load_model(model, str(path / MODEL), strict=True)
    return model.eval(), config
