"""Megatron symbols the reference backend does not build yet.

They parse (Megatron parity) and appear in `describe`'s layer list, but building one in the
reference backend raises a one-line error instead of silently substituting another layer.
"""

from megahybrid.config import ConfigError
from megahybrid.mixers.base import Mixer


class _Unsupported(Mixer):
    symbol = "?"
    name = "?"

    def __init__(self, config, index: int = 0, shared=None):
        super().__init__()
        raise ConfigError(
            f"layer {index} {self.symbol!r} ({self.name}): the reference backend has no {self.name} "
            "yet; use train.backend=megatron or replace the symbol in model.pattern")


class MultiLatentAttention(_Unsupported):
    symbol, name = "+", "multi-latent attention"

