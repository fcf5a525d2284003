"""Parallel mixers in one block (`p`): several sequence mixers on the same normed input, outputs summed.

    y = sum_i mixer_i(x)        (x is the block's normed input; the block adds y to the residual)

Falcon-H1 (TII 2025) runs attention and a Mamba2 mixer side by side in every layer this way, each
branch with its own projections; its µP multipliers are per-branch constants that a converter
folds into the branch weights (megahybrid/convert/hf_falcon_h1.py). This differs from Hymba (`h`),
whose branches share one in_proj and one out_proj and whose outputs are normed and averaged.

The branches are the registered mixers named in `model.parallel_mixers.mixers`, built from their
own config sections, so every mixer keeps its math, parameters and state contract:
    parameters: `<long name>.<the mixer's own parameter>`, e.g. `attention.q_proj.weight`, `mamba2.in_proj.weight`
    state:      `<long name>.<the mixer's own state key>`, e.g. `attention.k`, `mamba2.ssm`
"""

from __future__ import annotations

from typing import Optional

import torch

from megahybrid.config import fail
from megahybrid.mixers.base import Mixer, State


def branch_types(config) -> list:
    """The `LayerType`s of `model.parallel_mixers.mixers`, checked (Config or ModelConfig)."""
    from megahybrid.mixers import REGISTRY, by_name

    m = getattr(config, "model", config)
    names = m.parallel_mixers.mixers
    field = "model.parallel_mixers.mixers"
    if not names:
        fail(field, names, "must name at least one mixer, e.g. [attention, mamba2]")
    types = []
    for name in names:
        lt = by_name(name)
        if lt is None or lt.kind != "mixer" or lt.symbol == "p":
            choices = sorted(t.name for t in REGISTRY.values() if t.kind == "mixer" and t.symbol != "p")
            fail(field, names, f"{name!r} is not a sequence mixer; choose from {choices}")
        if lt in types:
            fail(field, names, f"names {lt.name!r} twice; each mixer can run once per block")
        if lt.cls().forward is not Mixer.forward:  # branches run forward_segment only
            fail(field, names, f"{lt.name!r} ({lt.symbol}) works in its own forward (DSA sets its indexer loss "
                 "there, Engram reads the token ids), which a branch does not run; give it its own block")
        types.append(lt)
    return types


def refuse_side_streams(mixer, field: str, value, where: str) -> None:
    """One-line ConfigError (`field`=`value`) if `mixer` reads or writes a side stream (reference/model.py,
    `Block`): a composite layer hands its inner mixers plain hidden states, so the stream would be lost.
    Mixers set their streams per config at build time (GoldFinch's cache, RWKV-7's v_first), hence a
    check on the built mixer."""
    if getattr(mixer, "side_inputs", ()) or getattr(mixer, "side_output", None):
        fail(field, value, f"{type(mixer).__name__} passes a side stream between layers (GoldFinch's cache, "
             f"RWKV-7's value residual), which {where} cannot carry; use another layer, or for rwkv7 set "
             "model.rwkv7.value_residual=false")


class ParallelMixers(Mixer):
    """The mixers of `model.parallel_mixers.mixers`, each on the same input, outputs summed."""

    def __init__(self, config, index: int = 0, shared: Optional[dict] = None):
        self.check(config)
        super().__init__()
        self.branch_names = []
        for lt in branch_types(config):
            branch = lt.cls()(config, index=index, shared=shared)
            refuse_side_streams(branch, "model.parallel_mixers.mixers",
                                getattr(config, "model", config).parallel_mixers.mixers, "a parallel branch")
            self.add_module(lt.name, branch)
            self.branch_names.append(lt.name)

    def forward_segment(self, x: torch.Tensor, state: State = None):
        y, new_state = None, {}
        for name in self.branch_names:
            prefix = name + "."
            own = None if state is None else {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            out, s = getattr(self, name).forward_segment(x, own or None)
            y = out if y is None else y + out
            new_state.update({prefix + k: v for k, v in (s or {}).items()})
        return y, new_state

    @classmethod
    def check(cls, config) -> None:
        for lt in branch_types(config):
            lt.cls().check(config)

    @classmethod
    def flops_per_token(cls, config, seq_len: int, causal: bool = True) -> float:
        """The branches' FLOPs added up (the sum itself is not counted, as residual adds are not)."""
        return float(sum(lt.cls().flops_per_token(config, seq_len, causal) for lt in branch_types(config)))
