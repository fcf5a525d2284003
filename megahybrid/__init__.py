"""megahybrid: pretraining of hybrid language models (attention + SSM / delta rule / MoE)."""

from megahybrid.config import Config, ConfigError, load_config

__all__ = ["Config", "ConfigError", "load_config", "build_model", "load_checkpoint"]
__version__ = "0.1.0"


def build_model(config, backend: str = "reference"):
    """`config` (Config, ModelConfig or anything `load_config` takes) -> torch.nn.Module;
    `model(input_ids)` returns logits `[batch, seq, vocab]`."""
    if not isinstance(config, Config) and type(config).__name__ != "ModelConfig":
        config = load_config(config)
    if backend == "reference":
        from megahybrid.adapters import apply_adapters
        from megahybrid.reference.model import ReferenceLM

        return apply_adapters(ReferenceLM(config), getattr(config, "model", config).adapters)
    if backend == "megatron":
        from megahybrid.megatron.model import build_megatron_model

        return build_megatron_model(config)
    raise ConfigError(f"backend={backend!r}: must be 'reference' or 'megatron'")


def load_checkpoint(path):
    """A megahybrid checkpoint directory -> (model, config)."""
    from megahybrid.train.checkpoint import load_model_checkpoint

    return load_model_checkpoint(path)
