"""Mixture of experts (`E`): top-k router, fused expert weights, dropless sort-based dispatch.

    scores  = softmax(router x)            (Switch, Mixtral)   or sigmoid(router x)   (DeepSeek-V3)
    experts, weights = top_k(scores);  weights /= sum(weights)   (with `norm_topk_prob`)
    (DeepSeek-V3 / NemotronH options: experts chosen on scores + expert_bias within the best groups,
     weights *= routed_scaling_factor; see `route`)
    y = sum_j weights_j * expert_{e_j}(x) + shared_expert(x)
    (with `shared_expert_gate`: + sigmoid(shared_expert_gate x) * shared_expert(x), Qwen3-Next)

Experts are stored fused, as Hugging Face transformers 5 holds them in memory:
`experts.gate_up_proj [E, 2I, H]` (gate rows first) and `experts.down_proj [E, H, I]`; without a
gate (relu2, gelu, silu) `experts.up_proj [E, I, H]` (NemotronH). The router is `router.weight [E, H]`.

Dispatch: the (token, expert) pairs are sorted by expert (stable, so each expert sees its tokens in
order), each expert runs once on its contiguous slice, and the weighted outputs are scattered back
with `index_add_` - the grouped-GEMM layout of Megablocks (Gale et al. 2022, arXiv 2211.15841),
with a Python loop over experts in place of the grouped GEMM.

Capacity (`capacity_factor` set): each expert takes at most ceil(capacity_factor * N * k / E)
pairs of the N tokens in the batch; it keeps the earliest tokens in flattened (batch, seq) order
and drops the rest (Switch Transformer, Fedus et al. 2021, arXiv 2101.03961). A dropped pair adds
nothing; the token's other experts keep their weights (no renormalisation after dropping), so a
token that loses every expert gets only the shared expert's output (the residual carries it on).

Auxiliary losses, summed into `self.aux_loss` on every forward (the LM collects it):
  load balancing (Switch eq. 4): aux_loss_coeff * E * sum_i f_i * P_i, where f_i is the fraction of
    the N*k routed pairs that chose expert i (before capacity dropping; sum_i f_i = 1, so a uniform
    router gives exactly aux_loss_coeff for any k, as in Megatron-Core's `switch_load_balancing_loss_func`)
    and P_i the mean router probability of expert i. With a sigmoid router P uses the scores
    normalised to sum to 1 per token (Megatron-Core's `compute_routing_scores_for_aux_loss`).
  z-loss (ST-MoE eq. 5, Zoph et al. 2022, arXiv 2202.08906): z_loss_coeff * mean_n logsumexp(logits_n)^2.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from megahybrid.config import MLPConfig, fail
from megahybrid.mixers.base import Mixer, State
from megahybrid.mixers.common import linear
from megahybrid.mixers.mlp import MLP, check_mlp, expert_ffn, ffn_flops_per_token, is_gated, mlp_width


def _model_config(config):
    """Accept a Config or a ModelConfig (check() is called with either)."""
    return getattr(config, "model", config)


def expert_width(config) -> int:
    """Per-expert width: `moe.ffn_hidden_size`, else the dense MLP's resolved width."""
    m = _model_config(config)
    return m.moe.ffn_hidden_size or mlp_width(m)


def shared_expert_width(config) -> int:
    """Width of the single fused shared expert (0 = none)."""
    moe = _model_config(config).moe
    if moe.num_shared_experts == 0:
        return 0
    return moe.shared_ffn_hidden_size or moe.num_shared_experts * expert_width(config)


def route(logits: torch.Tensor, top_k: int, router: str, norm_topk_prob: bool, *,
          expert_bias: Optional[torch.Tensor] = None, num_groups: int = 1, topk_groups: int = 1,
          scaling: float = 1.0):
    """logits `[N, E]` -> (weights `[N, k]`, experts `[N, k]`, probs `[N, E]` for the aux loss).

    DeepSeek-V3 options (`moe.score_correction_bias`, `num_groups`/`topk_groups`, `routed_scaling_factor`):
    the experts are chosen on scores + expert_bias within the best groups, the weights are the
    unbiased scores of the chosen experts, renormalised, times `scaling`."""
    if router == "softmax":
        scores = probs = torch.softmax(logits, dim=-1)
    else:
        scores = torch.sigmoid(logits)
        probs = scores / scores.sum(-1, keepdim=True)
    choice = scores if expert_bias is None else scores + expert_bias.to(scores.dtype)
    if num_groups > 1:
        choice = limit_to_groups(choice, num_groups, topk_groups)
    experts = torch.topk(choice, top_k, dim=-1).indices
    weights = scores.gather(-1, experts)
    if norm_topk_prob:
        weights = weights / weights.sum(-1, keepdim=True)
    if scaling != 1.0:
        weights = weights * scaling
    return weights, experts, probs


def limit_to_groups(choice: torch.Tensor, num_groups: int, topk_groups: int) -> torch.Tensor:
    """Group-limited routing (DeepSeek-V3, arXiv 2412.19437 section 2.1.2): a group's score is the sum
    of its two best expert scores; experts outside the `topk_groups` best groups get -inf."""
    N, E = choice.shape
    grouped = choice.view(N, num_groups, E // num_groups)
    group_scores = grouped.topk(2, dim=-1).values.sum(-1)  # [N, groups]
    best = group_scores.topk(topk_groups, dim=-1).indices
    keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best, True)
    return grouped.masked_fill(~keep[..., None], float("-inf")).view(N, E)


def load_balancing_loss(probs: torch.Tensor, experts: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Switch eq. 4, E * sum_i f_i P_i, with f_i the fraction of routed pairs sent to expert i."""
    counts = torch.bincount(experts.flatten(), minlength=num_experts).to(probs.dtype)
    f = counts / experts.numel()
    return num_experts * (f * probs.mean(0)).sum()


def z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss: mean squared log-partition function."""
    return torch.logsumexp(logits, dim=-1).square().mean()


def sort_by_expert(experts: torch.Tensor, num_experts: int, capacity: Optional[int]):
    """Flatten (token, slot) pairs and order them by expert, earliest token first within an expert.

    Returns (pair `[P]` indices into the flattened `[N*k]` pairs, tokens per expert `[E]` as a list);
    with `capacity`, each expert keeps only its first `capacity` pairs."""
    flat = experts.flatten()
    order = torch.argsort(flat, stable=True)  # flat index = token * k + slot, so token order is kept
    counts = torch.bincount(flat, minlength=num_experts)
    if capacity is not None:
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.arange(flat.numel(), device=flat.device) - starts[flat[order]]
        order = order[rank < capacity]
        counts = counts.clamp(max=capacity)
    return order, counts.tolist()


class Experts(nn.Module):
    """E FFNs in fused 3-D weights (layout in the module docstring)."""

    def __init__(self, num_experts: int, hidden: int, width: int, activation: str, std: float):
        super().__init__()
        self.activation = activation
        rows = 2 * width if is_gated(activation) else width
        w_in = nn.Parameter(torch.randn(num_experts, rows, hidden) * std)
        if is_gated(activation):
            self.gate_up_proj = w_in
        else:
            self.up_proj = w_in
        self.down_proj = nn.Parameter(torch.randn(num_experts, hidden, width) * std)

    @property
    def w_in(self) -> torch.Tensor:
        return self.gate_up_proj if is_gated(self.activation) else self.up_proj

    def forward(self, x: torch.Tensor, expert_counts: list[int]) -> torch.Tensor:
        """x `[P, H]` sorted by expert, `expert_counts[e]` rows each -> `[P, H]`."""
        outs = [expert_ffn(chunk, self.w_in[e], self.down_proj[e], self.activation)
                for e, chunk in enumerate(torch.split(x, expert_counts)) if chunk.shape[0]]
        return torch.cat(outs) if outs else x.new_zeros(x.shape)


def check_groups(moe) -> None:
    """The `moe.num_groups` / `moe.topk_groups` rules of group-limited routing."""
    p, groups = "model.moe", moe.num_groups
    if groups < 1 or moe.num_experts % groups:
        fail(f"{p}.num_groups", groups, f"must be >= 1 and divide num_experts={moe.num_experts} (1 = no grouping)")
    if groups > 1 and moe.num_experts // groups < 2:
        fail(f"{p}.num_groups", groups, f"leaves {moe.num_experts // groups} expert per group; a group scores "
             "its two best experts, so use at most num_experts/2 groups")
    if not 1 <= moe.topk_groups <= groups:
        fail(f"{p}.topk_groups", moe.topk_groups, f"must be in [1, num_groups={groups}]")
    if moe.top_k > moe.topk_groups * (moe.num_experts // groups):
        fail(f"{p}.topk_groups", moe.topk_groups, f"keeps fewer experts than top_k={moe.top_k}; raise it")


class MoE(Mixer):
    """Token-choice top-k MoE with an optional shared expert; see the module docstring."""

    token_wise = True

    def __init__(self, config, index: int = 0, shared: dict | None = None):
        super().__init__()
        config = _model_config(config)
        self.check(config)
        moe = config.moe
        hidden = config.hidden_size
        self.num_experts, self.top_k = moe.num_experts, moe.top_k
        self.router_type, self.norm_topk_prob = moe.router, moe.norm_topk_prob
        self.aux_loss_coeff, self.z_loss_coeff = moe.aux_loss_coeff, moe.z_loss_coeff
        self.capacity_factor = moe.capacity_factor
        self.router = nn.Linear(hidden, moe.num_experts, bias=False)
        nn.init.normal_(self.router.weight, std=config.init_std)
        self.routed_scaling_factor, self.num_groups, self.topk_groups = \
            moe.routed_scaling_factor, moe.num_groups, moe.topk_groups
        if moe.score_correction_bias:  # a buffer: a balancing rule sets it, not the gradient (DeepSeek-V3)
            self.router.register_buffer("expert_bias", torch.zeros(moe.num_experts))
        self.experts = Experts(moe.num_experts, hidden, expert_width(config), moe.activation, config.init_std)
        width = shared_expert_width(config)
        self.shared_expert = MLP(config, mlp=MLPConfig(width, moe.activation)) if width else None
        # Qwen3-Next's per-token scalar gate on the shared expert, `shared_expert_gate.weight [1, H]`.
        self.shared_expert_gate = linear(hidden, 1, config.init_std) if moe.shared_expert_gate else None
        self.aux_loss: Optional[torch.Tensor] = None
        """Weighted load-balancing + z-loss of the last forward (None before the first)."""

    def capacity(self, num_tokens: int) -> Optional[int]:
        if self.capacity_factor is None:
            return None
        return math.ceil(self.capacity_factor * num_tokens * self.top_k / self.num_experts)

    def forward_segment(self, x: torch.Tensor, state: State = None):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        logits = self.router(x)
        # Routing in float32 for 16-bit inputs (Mixtral/Qwen3-MoE do the same); float64 stays float64.
        logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
        weights, experts, probs = route(logits, self.top_k, self.router_type, self.norm_topk_prob,
                                        expert_bias=getattr(self.router, "expert_bias", None),
                                        num_groups=self.num_groups, topk_groups=self.topk_groups,
                                        scaling=self.routed_scaling_factor)
        self.aux_loss = self.aux_loss_coeff * load_balancing_loss(probs, experts, self.num_experts)
        if self.z_loss_coeff:
            self.aux_loss = self.aux_loss + self.z_loss_coeff * z_loss(logits)

        order, counts = sort_by_expert(experts, self.num_experts, self.capacity(x.shape[0]))
        token = order // self.top_k
        out = self.experts(x[token], counts) * weights.flatten()[order, None].to(x.dtype)
        y = torch.zeros_like(x).index_add_(0, token, out.to(x.dtype))  # autocast: out may be 16-bit
        if self.shared_expert is not None:
            shared = self.shared_expert(x)[0]
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(x)) * shared
            y = y + shared
        return y.reshape(shape), None

    @classmethod
    def check(cls, config) -> None:
        m = _model_config(config)
        moe, p = m.moe, "model.moe"
        if moe.num_experts < 1:
            fail(f"{p}.num_experts", moe.num_experts, "must be >= 1")
        if not 1 <= moe.top_k <= moe.num_experts:
            fail(f"{p}.top_k", moe.top_k, f"must be in [1, num_experts={moe.num_experts}]")
        if moe.router not in ("softmax", "sigmoid"):
            fail(f"{p}.router", moe.router, "must be 'softmax' or 'sigmoid'")
        check_mlp(p, MLPConfig(moe.ffn_hidden_size, moe.activation))
        if moe.num_shared_experts < 0:
            fail(f"{p}.num_shared_experts", moe.num_shared_experts, "must be >= 0")
        if moe.shared_ffn_hidden_size is not None and (moe.shared_ffn_hidden_size < 1 or moe.num_shared_experts == 0):
            fail(f"{p}.shared_ffn_hidden_size", moe.shared_ffn_hidden_size,
                 "must be >= 1 and needs num_shared_experts >= 1 (or set it to null)")
        if moe.shared_expert_gate and moe.num_shared_experts == 0:
            fail(f"{p}.shared_expert_gate", True,
                 "gates the shared expert; set num_shared_experts >= 1 or set it to false")
        if moe.capacity_factor is not None and moe.capacity_factor <= 0:
            fail(f"{p}.capacity_factor", moe.capacity_factor, "must be > 0 (or null for dropless)")
        for name in ("aux_loss_coeff", "z_loss_coeff"):
            if getattr(moe, name) < 0:
                fail(f"{p}.{name}", getattr(moe, name), "must be >= 0 (0 disables the loss)")
        if moe.routed_scaling_factor <= 0:
            fail(f"{p}.routed_scaling_factor", moe.routed_scaling_factor, "must be > 0 (1.0 = no scaling)")
        check_groups(moe)

    @classmethod
    def flops_per_token(cls, config, seq_len: int, causal: bool = True) -> float:
        """Active parameters only: router + top_k routed experts + the shared expert."""
        m = _model_config(config)
        moe, hidden = m.moe, m.hidden_size
        routed = moe.top_k * ffn_flops_per_token(hidden, expert_width(m), moe.activation)
        shared = ffn_flops_per_token(hidden, shared_expert_width(m), moe.activation)
        return 2.0 * hidden * moe.num_experts + routed + shared
