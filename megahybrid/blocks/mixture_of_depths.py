"""Mixture-of-Depths (Raposo et al. 2024, arXiv 2404.02258): a router decides which tokens pay for a
block; the others skip it on the residual.

With router logit r_t = w . x_t and gate g_t = sigmoid(r_t), a routed block's residual branch is

    y_t = g_t F(norm(x_t))   if token t is selected,   0 otherwise        (the block adds x_t + y_t)

and the routing modes choose the selected set:
- "topk": the ceil(capacity * T) tokens of each row with the largest r (the paper's expert-choice
  routing); the block runs on the gathered tokens and the result is scattered back. Top-k over a
  sequence is not causal (a later token can push an earlier one out), so the paper's auxiliary
  fix is used: a BCE loss (weight `aux_loss_coeff`) teaches r_t > threshold <=> t is in the top k,
  and at inference (module.eval()) selection is r_t > threshold, which reads token t alone.
- "threshold": r_t > threshold in training and inference (causal; the capacity is not enforced).
- "soft": every token runs and y_t = g_t F(norm(x_t)) (no gather/scatter; no compute saved).

Gathering tokens is exact only for token-wise sublayers (MLP, MoE): a recurrent mixer would see a
different sequence and attention would need the gathered tokens' positions and masks, so routing is
allowed on channel blocks alone (check_mixture_of_depths refuses the rest).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def gather_scatter(x: torch.Tensor, fn, selected: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """weight_t * fn(x_t) at the `selected` [B, T] tokens, 0 elsewhere; `fn` runs once on the selected
    tokens of the whole batch gathered into one [1, N, C] sequence (token-wise `fn` only)."""
    y = torch.zeros_like(x)
    if not bool(selected.any()):
        return y
    ys = fn(x[selected].unsqueeze(0)).squeeze(0)
    return y.index_put((selected,), weight[selected].unsqueeze(-1).to(ys.dtype) * ys)


def soft_gate(x: torch.Tensor, fn, weight: torch.Tensor) -> torch.Tensor:
    """weight_t * fn(x_t) for every token (no gather/scatter)."""
    return weight.unsqueeze(-1).to(x.dtype) * fn(x)


def topk_mask(scores: torch.Tensor, capacity: float) -> torch.Tensor:
    """[B, T] bool: the ceil(capacity * T) highest scores of each row."""
    k = max(1, math.ceil(capacity * scores.shape[-1]))
    idx = scores.topk(min(k, scores.shape[-1]), dim=-1).indices
    return torch.zeros_like(scores, dtype=torch.bool).scatter(-1, idx, True)


class MixtureOfDepths(nn.Module):
    """`forward(x, fn)` -> the routed residual branch y (module docstring); `fn(u)` = F(norm(u))."""

    def __init__(self, hidden_size: int, capacity: float, routing: str, threshold: float, aux_loss_coeff: float,
                 init_std: float):
        super().__init__()
        self.capacity, self.routing, self.threshold, self.aux_loss_coeff = capacity, routing, threshold, aux_loss_coeff
        self.router = nn.Linear(hidden_size, 1, bias=False)
        nn.init.normal_(self.router.weight, std=init_std)
        self.aux_loss = None
        self.last_fraction = None
        """Fraction of tokens that ran the block in the last forward (for logging)."""

    def forward(self, x: torch.Tensor, fn) -> torch.Tensor:
        r = self.router(x).squeeze(-1)
        r = r.float() if r.dtype in (torch.bfloat16, torch.float16) else r  # scores and BCE in >= float32
        gate = torch.sigmoid(r)
        self.aux_loss = None
        if self.routing == "soft":
            self.last_fraction = 1.0
            return soft_gate(x, fn, gate)
        if self.routing == "topk" and self.training:
            selected = topk_mask(r.detach(), self.capacity)
            if self.aux_loss_coeff:
                target = selected.to(r.dtype)
                self.aux_loss = self.aux_loss_coeff * F.binary_cross_entropy_with_logits(r - self.threshold, target)
        else:
            selected = r > self.threshold
        self.last_fraction = float(selected.float().mean())
        return gather_scatter(x, fn, selected, gate)


def check_mixture_of_depths(m, specs) -> None:
    """One-line errors for bad `model.mod` settings (config.validate calls it)."""
    from megahybrid.config import fail
    from megahybrid.mixers import REGISTRY

    mod = m.mod
    if not mod.layers:
        return
    if len(set(mod.layers)) != len(mod.layers) or any(i < 0 or i >= len(specs) for i in mod.layers):
        fail("model.mod.layers", mod.layers, f"must list distinct block indices in [0, {len(specs)})")
    if not 0.0 < mod.capacity <= 1.0:
        fail("model.mod.capacity", mod.capacity, "must be in (0, 1] (fraction of each row's tokens that run the block)")
    for i in mod.layers:
        if i in (m.post_norm_layers or ()):
            fail("model.mod.layers", mod.layers, f"block {i} is post-norm (model.post_norm_layers); routing wraps "
                 "pre-norm blocks only: remove it from one of the two lists")
        lt = REGISTRY[specs[i].symbol]
        if lt.kind != "channel":
            fail("model.mod.layers", mod.layers, f"block {i} is {lt.symbol!r} ({lt.name}), a sequence mixer: gathering "
                 "tokens would change its recurrence or positions; route only channel blocks ('-', 'E')")
        if not lt.cls().token_wise:
            fail("model.mod.layers", mod.layers, f"block {i} is {lt.symbol!r} ({lt.name}), a channel layer that reads "
                 "the previous token (token shift): gathering tokens would change which token that is; route only "
                 "per-token channel blocks ('-', 'E')")
