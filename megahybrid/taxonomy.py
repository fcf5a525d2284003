"""MegaCpp's block taxonomy (A/M/D/E/R/C) mapped onto megahybrid's layer symbols, for `describe`.

MegaCpp's hybrid family labels blocks A (attention; its constructor picks a dense, sparse or Engram
branch), M (Mamba), D (DeltaNet), E (experts), R (recurrent) and C (convolution). The source leaves C
undefined and says nothing about dense MLPs or several of megahybrid's mixers; the choices made here:
- C: long-convolution mixers (`y` Hyena) and any future block whose only token mixing is a short
  causal conv. Short convs inside other mixers (Mamba, GDN) do not make those blocks C.
- `-` dense MLP: E with branch "dense". E is the channel-mixing (FFN) slot of a block; a dense MLP is
  its one-expert, always-on case, next to `E`'s "routed" branch. `c` (RWKV-7 channel mixing) is a dense
  FFN too, whose input also mixes in the previous token: E, "dense: token shift".
- `k` RWKV-7: D, its state update is a generalised delta rule (arXiv 2503.14456), not a plain gated
  recurrence.
- `b` Based: R, Taylor linear attention keeps a fixed-size recurrent state (no softmax over keys).
- `h` Hymba: A, "dense + SSM heads" (attention and SSM heads in one block, attention decides the cost).
- `p` parallel mixers: the labels of its branches joined with "|", e.g. "A|M" (Falcon-H1), when the
  config is given; "?" without it.
- `o` MoDr: R (one shared core reapplied in depth), whatever its core.
A-branches: "dense" (full softmax attention), "sparse: ..." (which keys each query sees is limited:
`w`'s window, `D`'s top-k indexer, and `*` itself when `attention.sparsity` is on, given the config),
"engram" (`n`, Engram conditional memory, arXiv 2601.07372: MegaCpp builds it as an A-block branch).
Plug-in or unknown symbols are labelled "?" (never an error).
"""

from __future__ import annotations

LABELS = "AMDERC"
"""MegaCpp's block labels: Attention, Mamba, DeltaNet, Experts, Recurrent, Convolution."""

TAXONOMY: dict[str, tuple[str, str]] = {
    # A: attention blocks, with their branch
    "*": ("A", "dense"),
    "+": ("A", "dense: latent KV (MLA)"),
    "s": ("A", "dense: shared block + LoRA"),
    "f": ("A", "dense: shared compressed KV"),
    "h": ("A", "dense + SSM heads"),
    "w": ("A", "sparse: sliding window"),
    "D": ("A", "sparse: top-k indexer (DSA)"),
    "n": ("A", "engram: hashed N-gram memory"),
    # M: Mamba
    "M": ("M", "Mamba2 SSD"),
    "m": ("M", "Mamba1 selective scan"),
    # D: delta rule
    "d": ("D", "DeltaNet"),
    "G": ("D", "gated DeltaNet"),
    "k": ("D", "generalised delta rule (RWKV-7)"),
    # E: channel mixing
    "E": ("E", "routed"),
    "-": ("E", "dense"),
    "c": ("E", "dense: token shift (RWKV-7)"),
    # R: other recurrences
    "r": ("R", "RG-LRU"),
    "u": ("R", "minGRU"),
    "b": ("R", "linear attention (Taylor)"),
    "o": ("R", "MoDr shared core + routed LoRA"),
    # C: convolution
    "y": ("C", "long conv (Hyena)"),
}
"""symbol -> (label, branch). `p` is resolved from its branches (see `block_label`)."""


def block_label(symbol: str, config=None) -> tuple[str, str]:
    """(label, branch) of a layer symbol; "?" for unknown or plug-in symbols."""
    if symbol == "p":
        return _parallel_label(config)
    if symbol == "D" and config is not None:
        d = getattr(config, "model", config).dsa
        return "A", f"sparse: top-k indexer (DSA, top_k {d.top_k}, {d.index_heads} index heads)"
    if symbol == "*" and config is not None:
        sp = getattr(config, "model", config).attention.sparsity
        if sp.kind == "local_global":
            return "A", (f"sparse: local + global blocks (block_size {sp.block_size}, {sp.local_blocks} local, "
                         f"{sp.global_blocks} global)")
    if symbol == "o" and config is not None:
        core = getattr(getattr(config, "model", config), "modr", None)
        if core is not None:
            return "R", f"MoDr shared {core.core} core + routed LoRA"
    return TAXONOMY.get(symbol, ("?", ""))


def _parallel_label(config) -> tuple[str, str]:
    if config is None:
        return "?", "parallel mixers"
    from megahybrid.mixers.parallel import branch_types

    labels = [block_label(lt.symbol, config)[0] for lt in branch_types(config)]
    return "|".join(labels), "parallel: " + " + ".join(lt.name for lt in branch_types(config))
