"""MoDr (`o`): one shared core block applied `repeats` times, with per-token routed LoRA branches.

From the MegaCpp hybrid family (megahybrid issue 13). The source names the idea, not the math;
what is built here, at one `o` position with normed input x:

    h_0 = x
    for i in 0 .. repeats-1:
        p_i = softmax(router_i h_i)                          [tokens, num_branches]
        e, w = top_k(p_i)                                    (w renormalised when top_k > 1)
        u_i = h_i + sum_j w_j B^in_{i,e_j} A^in_{i,e_j} h_i      LoRA branch on the core's input
        c~_i = core(u_i, state_i)
        c_i = c~_i + sum_j w_j B^out_{i,e_j} A^out_{i,e_j} c~_i    LoRA branch on the core's output
        h_{i+1} = h_i + c_i                                  (residual between applications)
    y = h_R - x                                              (the block adds y to its residual)

Why this is "LoRA on the core's input/output projection" for any core: if the core starts with a
linear W_in, W_in (h + B A h) = (W_in + W_in B A) h, a rank-r update of W_in; if it ends with W_out z,
W_out z + B A W_out z = (W_out + B A W_out) z, a rank-r update of W_out. So one generic wrapper gives
every registered mixer (or the MLP) per-token low-rank specialisation without reaching into its
modules. The B matrices start at zero (Hu et al. 2021, arXiv 2106.09685), so at init the layer is
the core applied `repeats` times with a residual: h <- h + core(h).

Routing is top-k over `num_branches` per token and per application, as in Switch / Mixtral MoE
(megahybrid/mixers/moe.py); the chosen branch weights are the router probabilities, so the router
learns through them. The routers and branches of application i are shared like the core.

Sharing: every `o` position uses the same parameter set (core, routers, branches), held in the model's
`shared` dict under "modr" (as megahybrid/mixers/shared_attention.py shares its block); the first `o`
layer owns the weights, `parameters()` yields them once, gradients of every use add up.

Bookkeeping of the last forward, per position (the tensors are detached):
    branch_counts [repeats, num_branches]  routed (token, slot) pairs per branch
    branch_load   [repeats, num_branches]  branch_counts / pairs of that application (sums to 1)
    router_probs  [repeats, num_branches]  mean router probability per branch
    aux_loss      modr.aux_loss_coeff * mean_i Switch_i,  Switch_i = E * sum_e load_{i,e} * P_{i,e}
                  (Fedus et al. 2021, arXiv 2101.03961, eq. 4; P with gradient); ReferenceLM.aux_loss
                  collects it and the training loop logs it as `aux_loss`.
In a packed training batch (seq_idx, no state) the documents are right-padded into one batch by the
base class, so padding tokens are routed and counted too.

State: the core's state of every application, keys "<i>.<core key>" (application i has its own).
"""

from __future__ import annotations

import torch
from torch import nn

from megahybrid.config import fail
from megahybrid.mixers.base import Mixer, State
from megahybrid.mixers.common import linear
from megahybrid.mixers.moe import load_balancing_loss
from megahybrid.mixers.parallel import refuse_side_streams

SHARED_KEY = "modr"
"""Key in the model's `shared` dict of the one MoDr parameter set."""

EXCLUDED_CORES = ("o", "s", "f", "p", "E", "+", "D")
"""Not usable as the core: MoDr itself, layers with their own cross-layer sharing (`s`, `f`), the
composite `p`, MoE and DSA `D` (their own aux losses, collected per layer) and the Megatron-only `+`."""


def _model_config(config):
    return getattr(config, "model", config)


def core_type(config):
    """The registered `LayerType` named by `model.modr.core`, checked."""
    from megahybrid.mixers import REGISTRY, by_name

    name = _model_config(config).modr.core
    lt = by_name(name)
    if lt is None or lt.symbol in EXCLUDED_CORES:
        choices = sorted(t.name for t in REGISTRY.values() if t.symbol not in EXCLUDED_CORES)
        fail("model.modr.core", name, f"must name a layer type usable as the shared core; choose from {choices}")
    return lt


class LoRABank(nn.Module):
    """`num_branches` LoRA pairs in stacked weights: down [E, r, H] ~ N(0, std), up [E, H, r] = 0."""

    def __init__(self, num_branches: int, hidden: int, rank: int, std: float):
        super().__init__()
        self.down = nn.Parameter(torch.randn(num_branches, rank, hidden) * std)
        self.up = nn.Parameter(torch.zeros(num_branches, hidden, rank))

    def forward(self, x: torch.Tensor, branches: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [N, H], branches and weights [N, k] -> sum_j w_j up_{e_j} down_{e_j} x, [N, H].
        Gathers each token's branch matrices: fine at LoRA ranks (a grouped GEMM is the fast path)."""
        down = self.down[branches]  # [N, k, r, H]
        up = self.up[branches]  # [N, k, H, r]
        low = torch.einsum("nkrh,nh->nkr", down, x)
        return torch.einsum("nkhr,nkr,nk->nh", up, low, weights.to(x.dtype))


class MoDrShared(nn.Module):
    """The one parameter set of every `o` position: the core, and per application a router and the
    input- and output-side LoRA banks."""

    def __init__(self, config, index: int):
        super().__init__()
        m = _model_config(config)
        md, hidden, std = m.modr, m.hidden_size, m.init_std
        self.core = core_type(m).cls()(config, index=index, shared={})
        refuse_side_streams(self.core, "model.modr.core", md.core, "the MoDr core")
        self.routers = nn.ModuleList(linear(hidden, md.num_branches, std) for _ in range(md.repeats))
        self.lora_in = nn.ModuleList(LoRABank(md.num_branches, hidden, md.lora_rank, std) for _ in range(md.repeats))
        self.lora_out = nn.ModuleList(LoRABank(md.num_branches, hidden, md.lora_rank, std) for _ in range(md.repeats))


def route(logits: torch.Tensor, top_k: int):
    """logits [N, E] -> (probs [N, E], branches [N, k], weights [N, k]); top-1 keeps the raw
    probability as its weight (Switch), top-k > 1 renormalises over the chosen (Mixtral)."""
    probs = torch.softmax(logits, dim=-1)
    weights, branches = torch.topk(probs, top_k, dim=-1)
    if top_k > 1:
        weights = weights / weights.sum(-1, keepdim=True)
    return probs, branches, weights


class MoDr(Mixer):
    """One use of the shared MoDr block (module docstring)."""

    def __init__(self, config, index: int = 0, shared: dict | None = None):
        super().__init__()
        self.check(config)
        md = _model_config(config).modr
        shared = {} if shared is None else shared  # built alone: the layer owns a private block
        if SHARED_KEY not in shared:
            shared[SHARED_KEY] = MoDrShared(config, index)
        self.block: MoDrShared = shared[SHARED_KEY]
        self.token_wise = self.block.core.token_wise
        self.repeats, self.num_branches, self.top_k = md.repeats, md.num_branches, md.top_k
        self.aux_loss_coeff = md.aux_loss_coeff
        self.branch_counts = self.branch_load = self.router_probs = None
        self.aux_loss = None

    def forward_segment(self, x: torch.Tensor, state: State = None):
        b, core = self.block, self.block.core
        h, new_state = x, {}
        counts, probs_mean, switch = [], [], []
        for i in range(self.repeats):
            flat = h.reshape(-1, h.shape[-1])
            probs, branches, weights = route(b.routers[i](flat), self.top_k)
            u = h + b.lora_in[i](flat, branches, weights).view_as(h)
            own = None if state is None else {k.split(".", 1)[1]: v for k, v in state.items()
                                              if k.split(".", 1)[0] == str(i)}
            c, s = core.forward_segment(u, own or None)
            c = c + b.lora_out[i](c.reshape(-1, c.shape[-1]), branches, weights).view_as(c)
            h = h + c
            new_state.update({f"{i}.{k}": v for k, v in (s or {}).items()})
            count = torch.bincount(branches.flatten(), minlength=self.num_branches)
            counts.append(count)
            probs_mean.append(probs.mean(0))
            switch.append(load_balancing_loss(probs, branches, self.num_branches))
        self.branch_counts = torch.stack(counts).detach()
        load = self.branch_counts.to(x.dtype)
        self.branch_load = load / load.sum(-1, keepdim=True)
        self.router_probs = torch.stack(probs_mean).detach()
        self.aux_loss = self.aux_loss_coeff * torch.stack(switch).mean() if self.aux_loss_coeff else None
        return h - x, (new_state or None)

    @classmethod
    def check(cls, config) -> None:
        md = _model_config(config).modr
        lt = core_type(config)
        if md.repeats < 1:
            fail("model.modr.repeats", md.repeats, "must be >= 1 (applications of the core per position)")
        if md.num_branches < 1:
            fail("model.modr.num_branches", md.num_branches, "must be >= 1")
        if not 1 <= md.top_k <= md.num_branches:
            fail("model.modr.top_k", md.top_k, f"must be in [1, num_branches={md.num_branches}]")
        if md.lora_rank < 1:
            fail("model.modr.lora_rank", md.lora_rank, "must be >= 1")
        if md.aux_loss_coeff < 0:
            fail("model.modr.aux_loss_coeff", md.aux_loss_coeff, "must be >= 0 (0 = no balance loss)")
        lt.cls().check(config)

    @classmethod
    def flops_per_token(cls, config, seq_len: int, causal: bool = True) -> float:
        """repeats x (core + router 2*H*E + top_k * two LoRA branches of 2*r*2H each). Sharing saves
        parameters, not FLOPs; the softmax, top-k and residual adds are not counted."""
        m = _model_config(config)
        md, hidden = m.modr, m.hidden_size
        core = core_type(m).cls().flops_per_token(config, seq_len, causal)
        per_application = core + 2.0 * hidden * md.num_branches + md.top_k * 2 * (2.0 * md.lora_rank * 2 * hidden)
        return md.repeats * per_application
