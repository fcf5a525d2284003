"""The layer-type registry: the single source for symbols, long names, building, params and FLOPs.

Megatron's symbols keep Megatron's meaning (megatron/core/models/hybrid/hybrid_layer_allocation.py);
megahybrid's own layer types use lowercase symbols. Nothing else in the package hard-codes a symbol.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class LayerType:
    symbol: str
    name: str
    kind: Literal["mixer", "channel"]
    """mixer: mixes positions (attention, SSM, ...); channel: the FFN slot after a mixer (MLP, MoE per
    token; RWKV-7's channel mixing also reads the previous token, so check `token_wise` for "per token")."""
    target: str
    """"module:Class" of the reference implementation (imported lazily)."""
    aliases: tuple[str, ...] = ()
    megatron: bool = False
    """True if Megatron-Core's hybrid pattern defines this symbol."""
    description: str = ""

    def cls(self):
        module, _, name = self.target.partition(":")
        return getattr(importlib.import_module(module), name)


REGISTRY: dict[str, LayerType] = {}


def register(layer_type: LayerType) -> None:
    """Add a layer type; symbols and names must be unique (plug-ins call this too)."""
    if len(layer_type.symbol) != 1 or layer_type.symbol in "()|/ \t\nx0123456789":
        raise ValueError(f"layer symbol {layer_type.symbol!r}: must be one character, not a digit, "
                         "'x', whitespace or one of ( ) | /")
    for other in REGISTRY.values():
        names = {other.name, *other.aliases}
        if other.symbol == layer_type.symbol or layer_type.name in names:
            raise ValueError(f"layer type {layer_type.name!r} ({layer_type.symbol!r}) clashes with "
                             f"{other.name!r} ({other.symbol!r}); pick another symbol and name")
    REGISTRY[layer_type.symbol] = layer_type


def by_name(name: str) -> LayerType | None:
    """Look a layer type up by symbol, long name or alias."""
    if name in REGISTRY:
        return REGISTRY[name]
    for lt in REGISTRY.values():
        if name == lt.name or name in lt.aliases:
            return lt
    return None


_M = "megahybrid.mixers"
for _lt in [
    # Megatron-Core 0.19.2 symbols.
    LayerType("M", "mamba2", "mixer", f"{_M}.mamba2:Mamba2", ("mamba",), True, "Mamba2 SSD"),
    LayerType("G", "gdn", "mixer", f"{_M}.gated_deltanet:GatedDeltaNet", ("gated_deltanet",), True,
              "Gated DeltaNet"),
    LayerType("*", "attention", "mixer", f"{_M}.attention:Attention", ("attn",), True,
              "softmax attention (MHA/GQA, RoPE)"),
    LayerType("-", "mlp", "channel", f"{_M}.mlp:MLP", (), True, "dense MLP"),
    LayerType("E", "moe", "channel", f"{_M}.moe:MoE", (), True, "mixture of experts"),
    LayerType("+", "mla", "mixer", f"{_M}.unsupported:MultiLatentAttention", (), True,
              "multi-latent attention (Megatron backend only)"),
    LayerType("D", "dsa", "mixer", f"{_M}.sparse_attention:DeepSeekSparseAttention",
              ("deepseek_sparse_attention",), True, "DeepSeek sparse attention (top-k indexer, GQA heads)"),
    # megahybrid's own.
    LayerType("d", "deltanet", "mixer", f"{_M}.deltanet:DeltaNet", (), False, "DeltaNet"),
    LayerType("w", "swa", "mixer", f"{_M}.attention:SlidingWindowAttention",
              ("sliding_window_attention",), False, "sliding-window attention"),
    LayerType("r", "rglru", "mixer", f"{_M}.rglru:RGLRUBlock", ("griffin",), False,
              "Griffin recurrent block (RG-LRU)"),
    LayerType("s", "shared_attention", "mixer", f"{_M}.shared_attention:SharedAttention", ("zamba",), False,
              "Zamba shared attention with per-use LoRA"),
    LayerType("h", "hymba", "mixer", f"{_M}.hymba:Hymba", (), False, "Hymba parallel attention + SSM heads"),
    LayerType("m", "mamba1", "mixer", f"{_M}.mamba1:Mamba1", (), False, "Mamba1 selective scan"),
    LayerType("p", "parallel", "mixer", f"{_M}.parallel:ParallelMixers", ("parallel_mixers",), False,
              "mixers side by side on one input, outputs summed (Falcon-H1)"),
    LayerType("u", "gru", "mixer", f"{_M}.gru:MinGRU", ("mingru",), False, "minGRU (parallel-scan GRU)"),
    LayerType("k", "rwkv7", "mixer", f"{_M}.rwkv7:RWKV7", (), False, "RWKV-7 time mixing (generalised delta rule)"),
    LayerType("c", "rwkv7_ffn", "channel", f"{_M}.rwkv7_ffn:RWKV7FeedForward", ("rwkv7_channel_mix",), False,
              "RWKV-7 channel mixing (token-shift squared-ReLU FFN)"),
    LayerType("y", "hyena", "mixer", f"{_M}.hyena:Hyena", (), False, "Hyena long convolution (implicit filters)"),
    LayerType("b", "based", "mixer", f"{_M}.based:Based", (), False, "Based Taylor linear attention"),
    LayerType("f", "goldfinch", "mixer", f"{_M}.goldfinch:GoldAttention", ("gold",), False,
              "GoldFinch GOLD attention over one shared compressed KV cache"),
    LayerType("o", "modr", "mixer", f"{_M}.modr:MoDr", (), False,
              "MoDr: one shared core applied repeatedly with per-token routed LoRA branches"),
    LayerType("n", "engram", "mixer", f"{_M}.engram:Engram", (), False,
              "Engram hashed N-gram memory with context-aware gating (reads the token ids)"),
]:
    register(_lt)
