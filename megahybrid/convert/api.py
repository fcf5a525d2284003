"""`convert(src, dst, to=...)`: the one entry point behind `megahybrid convert`.

Every path goes through megahybrid's own form (Config + `ReferenceLM` state dict), so N formats
need 2N converters, and every conversion is checked against the reference model by the tests.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

import torch


from megahybrid.convert import hf_io, native
from megahybrid.convert.base import ConversionError, Tensors, get

Format = Literal["hf", "megahybrid", "megatron"]


def detect(path: Path) -> Format:
    path = Path(path)
    if not path.exists():
        raise ConversionError(f"{path}: no such file or directory")
    if hf_io.is_hf_dir(path):
        return "hf"
    if (path / ".metadata").is_file() or (path / "metadata.json").is_file():
        return "megatron"
    if native.is_native_dir(path):
        return "megahybrid"
    raise ConversionError(f"{path}: not a Hugging Face model (config.json), a megahybrid checkpoint "
                          "(config.yaml + model.safetensors, or a run directory) or a Megatron dist checkpoint")


def from_hf(path: Path):
    """(Config, ReferenceLM state dict, source) from a Hugging Face model directory."""
    import megahybrid

    hf_config = hf_io.read_config(path)
    arch = get(hf_config["model_type"])
    config = megahybrid.load_config({"model": arch.config_from_hf(hf_config), "name": hf_config["model_type"]})
    tensors = Tensors(hf_io.read_tensors(path), f"{path} ({arch.model_type})", source_config=hf_config)
    state = arch.state_from_hf(tensors, config.model)
    check_fits(config, state, f"{path} ({arch.model_type})")
    return config, state, {"hf_model_type": arch.model_type}


def to_hf(path: Path, config, state: dict, model_type: str) -> None:
    arch = get(model_type)
    sparsity = config.model.attention.sparsity.kind
    if sparsity != "none":  # no converted architecture has block-sparse attention; a dense export would differ
        raise ConversionError(f"attention.sparsity.kind={sparsity!r}: {arch.model_type} has dense attention only; "
                              "convert a model with sparsity 'none'")
    hf_config = arch.config_to_hf(config.model)
    hf_config.setdefault("model_type", arch.model_type)
    hf_config.setdefault("architectures", [arch.hf_class.rpartition(":")[2]])
    hf_config.setdefault("torch_dtype", str(next(iter(state.values())).dtype).replace("torch.", ""))
    tensors = arch.state_to_hf(Tensors(state, f"megahybrid -> {model_type}"), config.model)
    hf_io.write(Path(path), hf_config, tensors)


def read(path: Path, fmt: Optional[Format] = None):
    """(Config, ReferenceLM state dict, source) from any supported format."""
    path = Path(path)
    fmt = fmt or detect(path)
    if fmt == "hf":
        return from_hf(path)
    if fmt == "megahybrid":
        return native.read(path)
    from megahybrid.convert import megatron_dist

    return megatron_dist.read(path)


def convert(src, dst, to: Format, arch: Optional[str] = None, tp: int = 1, pp: int = 1, ep: int = 1) -> Path:
    """Convert `src` (any format, detected) into `dst` in format `to`. `arch`: the HF model_type
    when writing Hugging Face (default: the one the source came from). tp/pp/ep: the Megatron layout."""
    src, dst = Path(src), Path(dst)
    config, state, source = read(src)
    if to == "megahybrid":
        native.write(dst, config, state, source)
    elif to == "hf":
        model_type = arch or source.get("hf_model_type")
        if model_type is None:
            raise ConversionError(f"{src}: converting to Hugging Face needs --arch MODEL_TYPE (the source "
                                  "records none); `megahybrid convert --list` shows the choices")
        to_hf(dst, config, state, model_type)
    elif to == "megatron":
        from megahybrid.convert import megatron_dist

        megatron_dist.write(dst, config, state, tp=tp, pp=pp, ep=ep, source=source)
    else:
        raise ConversionError(f"--to {to!r}: must be one of hf, megahybrid, megatron")
    return dst


def check_fits(config, state: dict, where: str) -> None:
    """Every ReferenceLM tensor present with its shape, nothing extra; the model is built on the meta
    device, so this costs no memory. Errors name the tensor and both shapes."""
    import megahybrid

    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in megahybrid.build_model(config).state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ConversionError(f"{where}: the tensors do not fit the model; missing {missing[:6]}, "
                              f"unexpected {unexpected[:6]}")
    for key, t in state.items():
        if tuple(t.shape) != expected[key]:
            raise ConversionError(f"{where}: tensor {key!r} has shape {tuple(t.shape)}, the model expects "
                                  f"{expected[key]}")


def load_reference(path, fmt: Optional[Format] = None):
    """(ReferenceLM in eval mode, Config) from any supported format; strict: every tensor must fit."""
    import megahybrid

    config, state, _ = read(Path(path), fmt)
    check_fits(config, state, str(path))
    model = megahybrid.build_model(config)
    expected = model.state_dict()
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()}, strict=True)
    return model.eval(), config
