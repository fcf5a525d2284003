"""The whole reference LM under context parallelism (issue 7), reference path.

    comm = DistributedCP(cp_group, layout)          # or SimulatedCP(size, layout) in one process
    logits_local = cp_forward_lm(model, comm.shard(input_ids), comm, comm.shard(seq_idx))
    loss_share = cp_lm_loss(logits_local, comm.shard(labels), comm)   # shares sum to the mean loss

Every layer of `ReferenceLM` runs on this rank's tokens only:
- embedding, norms, final norm and head act per token and run as they are;
- linear-recurrent mixers (M, G, d, r) pass state between ranks (`forward_cp`, `mixers.py`);
- softmax attention (*, w) all-gathers keys and values (`attention.py`);
- channel mixers (-, E) act per token. MoE's load-balancing and z-loss are statistics over *all*
  tokens of the sequence, so `moe_aux_loss_cp` all-reduces the expert counts and the token count and
  gives each rank its share: the shares sum over the CP ranks to the single-process aux loss (and
  their gradients to its gradient). Capacity dropping keeps each expert's earliest tokens of the
  batch, which one rank cannot see: MoE with `capacity_factor` is refused under CP.
Packed documents (`seq_idx`, sharded like the tokens) reach every layer: attention masks other
documents and restarts RoPE per document, the recurrent mixers drop state at document starts.
Layer types with no CP form (shared attention `s`, Hymba `h`, Mamba1 `m`, parallel mixers `p`, MLA,
DSA) are refused by `check_context_parallel` with one line naming the layer and symbol.

`ContextParallelLM` wraps a model for the training loop so DistributedDataParallel sees one module
whose forward is the CP forward (DDP prepares its gradient all-reduce in forward).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from megahybrid.config import ConfigError
from megahybrid.mixers import REGISTRY
from megahybrid.mixers.attention import Attention, SlidingWindowAttention
from megahybrid.mixers.moe import MoE, route, z_loss
from megahybrid.parallel.attention import attention_cp
from megahybrid.parallel.group import CPGroup
from megahybrid.parallel.mixers import CP_FORWARDS, cp_token_loss, forward_cp
from megahybrid.pattern import resolve_layers

ATTENTION_CLASSES = (Attention, SlidingWindowAttention)
"""Exact classes with an all-gather CP form (subclasses such as Zamba's shared attention differ)."""


def cp_forward_lm(model, input_ids: torch.Tensor, comm: CPGroup, seq_idx: Optional[torch.Tensor] = None):
    """This rank's logits of `model(input_ids_whole, seq_idx=seq_idx_whole)`.

    input_ids, seq_idx: this rank's tokens `[B, T_local]` as `comm.shard` lays them out. After the call
    every MoE layer's `aux_loss` holds this rank's share (`moe_aux_loss_cp`), so `model.aux_loss()` is
    the rank's share of the single-process aux loss."""
    _check_layers(model.specs, model.config, comm.size)
    x = model.embed(input_ids)
    for layer in model.layers:
        h = x if layer.post_norm else layer.norm(x)
        y = _mixer_cp(layer.mixer, h, comm, seq_idx)
        if layer.post_norm:
            y = layer.norm(y)
        x = x + (y if layer.residual_scale == 1.0 else layer.residual_scale * y)
    return model.head(x)


def cp_lm_loss(logits: torch.Tensor, labels: torch.Tensor, comm: CPGroup, ignore_index: int = -100):
    """This rank's share of the mean next-token cross entropy over the CP group's tokens (labels equal to
    `ignore_index` do not count); the shares sum to the unsplit mean, and a rank holding only ignored
    labels gives 0 with finite gradients (`cp_token_loss`)."""
    mask = labels != ignore_index
    logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits  # float64 stays
    per_token = F.cross_entropy(logits.flatten(0, 1), labels.clamp_min(0).flatten(), reduction="none")
    return cp_token_loss(per_token.view_as(labels), mask, comm)


def moe_aux_loss_cp(moe: MoE, x: torch.Tensor, comm: CPGroup) -> torch.Tensor:
    """This rank's share of `moe`'s aux loss on the whole sequence (Switch load balancing + z-loss):
    the router is rerun on this rank's tokens `x` (`[..., hidden]`, the MoE's input), the expert counts
    f_i and the token count are all-reduced over the CP group, and the mean router probability P_i and
    the z-loss mean are this rank's sums divided by the global token count. Summed over ranks: exactly
    aux_loss_coeff * E * sum_i f_i P_i + z_loss_coeff * mean z^2 of the single process."""
    x = x.reshape(-1, x.shape[-1])
    logits = moe.router(x)
    logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    _, experts, probs = route(logits, moe.top_k, moe.router_type, moe.norm_topk_prob,
                              expert_bias=getattr(moe.router, "expert_bias", None), num_groups=moe.num_groups,
                              topk_groups=moe.topk_groups, scaling=moe.routed_scaling_factor)
    counts = torch.bincount(experts.flatten(), minlength=moe.num_experts).to(probs.dtype)
    totals = comm.all_reduce_sum_(torch.cat([counts, counts.new_tensor([x.shape[0]])]))
    counts, tokens = totals[:-1], totals[-1].clamp_min(1)
    fraction = counts / (tokens * moe.top_k)
    aux = moe.aux_loss_coeff * moe.num_experts * (fraction * probs.sum(0) / tokens).sum()
    if moe.z_loss_coeff:
        aux = aux + moe.z_loss_coeff * z_loss(logits) * (x.shape[0] / tokens)
    return aux


class ContextParallelLM(nn.Module):
    """`model` under context parallelism as one module: forward(input_ids, seq_idx) on this rank's tokens
    -> its logits. Parameters (and state-dict keys, under `model.`) are the model's."""

    def __init__(self, model: nn.Module, comm: CPGroup):
        super().__init__()
        self.model, self.comm = model, comm

    def forward(self, input_ids: torch.Tensor, seq_idx: Optional[torch.Tensor] = None) -> torch.Tensor:
        return cp_forward_lm(self.model, input_ids, self.comm, seq_idx)

    def aux_loss(self) -> torch.Tensor:
        """This rank's share of the aux loss of the last forward (see `cp_forward_lm`)."""
        return self.model.aux_loss()


def check_context_parallel(config) -> None:
    """Raise a one-line `ConfigError` if `config`'s model cannot run under `parallel.cp` > 1."""
    if config.parallel.cp > 1:
        _check_layers(resolve_layers(config), config.model, config.parallel.cp)


# ------------------------------------------------------------------------------------------ internals


def _mixer_cp(mixer, h: torch.Tensor, comm: CPGroup, seq_idx: Optional[torch.Tensor]) -> torch.Tensor:
    if type(mixer) in ATTENTION_CLASSES:
        return attention_cp(mixer, h, comm, seq_idx)[0]
    if mixer.token_wise:
        y, _ = mixer(h, need_state=False)
        if isinstance(mixer, MoE):
            mixer.aux_loss = moe_aux_loss_cp(mixer, h, comm)
        return y
    return forward_cp(mixer, h, comm, seq_idx=seq_idx)[0]


def _has_cp_form(cls) -> bool:
    return cls.token_wise or cls in ATTENTION_CLASSES or cls in CP_FORWARDS


def _check_layers(specs, model_config, cp: int) -> None:
    # cp_forward_lm walks the plain residual; the block features of megahybrid/blocks/ are not wired here.
    if model_config.hyper_connections.streams != 1:
        raise ConfigError(f"model.hyper_connections.streams={model_config.hyper_connections.streams}: mHC has no "
                          f"context-parallel form yet (parallel.cp={cp}); set it to 1 or parallel.cp=1")
    if model_config.mod.layers:
        raise ConfigError(f"model.mod.layers={model_config.mod.layers}: Mixture-of-Depths has no context-parallel "
                          f"form yet (parallel.cp={cp}; top-k routing needs the whole row); set it to [] or "
                          "parallel.cp=1")
    for spec in specs:
        layer_type = REGISTRY[spec.symbol]
        cls = layer_type.cls()
        if not _has_cp_form(cls):
            supported = " ".join(lt.symbol for lt in REGISTRY.values() if _has_cp_form(lt.cls()))
            raise ConfigError(
                f"model.pattern: layer {spec.index} {spec.symbol!r} ({layer_type.name}) has no context-parallel "
                f"form (parallel.cp={cp} supports {supported}); set parallel.cp=1 or change the pattern")
        if cls is MoE and model_config.moe.capacity_factor is not None:
            raise ConfigError(
                f"model.moe.capacity_factor={model_config.moe.capacity_factor}: capacity dropping keeps each "
                f"expert's earliest tokens of the whole batch, which no rank sees under parallel.cp={cp}; set "
                "it to null (dropless) or parallel.cp=1")
