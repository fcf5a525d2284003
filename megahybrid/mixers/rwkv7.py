"""RWKV-7 "Goose" time mixing (`k`), Peng et al. 2025 (arXiv 2503.14456), with flash-linear-attention
0.6.0's `RWKV7Attention` semantics and parameter names (`fla/layers/rwkv7.py`), so its weights copy 1:1.

    x*_t = x_t + (x_{t-1} - x_t) * x_*               token shift, one mix vector per branch (r w k v a g)
    r = r_proj(x^r);  k = k_proj(x^k);  v = v_proj(x^v)
    w = -e^{-1/2} sigmoid(w_lora(x^w))               log-decay in (-0.607, 0): decay exp(w) in (0.545, 1)
    a = sigmoid(a_lora(x^a));  g = g_lora(x^g)       in-context learning rate; output gate (sigmoid inside)
    kk = normalize_per_head(k * k_k);  k = k * (1 + (a - 1) * k_a)
    S_t = (diag(exp w_t) + b_t a_t^T) S_{t-1} + k_t v_t^T   with a_t = -kk_t, b_t = kk_t * a_t   (per head)
    o_t = S_t^T r_t                                  (scale 1)
    y = o_proj((GroupNorm_heads(o) + (sum(r * k * r_k) per head) v) * g)

S is key-major `[K, V]` per head (FLA's layout); the paper writes the transpose, S_t = S_{t-1}(diag(w_t)
+ a_t^T b_t) + v_t^T k_t. LoRAs are `Linear(no bias) -> act -> Linear` under `.lora.0` / `.lora.2`
(w: tanh, a: none, g: sigmoid and no bias), as FLA's `LoRA`.

The core has two forms here: `naive_recurrent_rwkv7` (one token at a time, the transition matrix written
out: the oracle) and `chunked_rwkv7`, the chunked DPLR algorithm FLA's `chunk_rwkv7` kernel implements
(Yang et al. 2024 WY form generalised to diag + rank-1; FLA `generalized_delta_rule/dplr`): within a chunk
the rank-1 reads u_i = S_{i-1}^T a_i solve one unit-triangular system, then the chunk's outputs and its
final state are matmuls. Decays enter as exp(Gamma_i - Gamma_j) per key channel with the masked
exponent <= 0, so nothing overflows. On GPU the Megatron backend would call FLA's `chunk_rwkv7`; the
reference backend uses `chunked_rwkv7` everywhere.

Value residual (RWKV-7's v_first, `rwkv7.value_residual`, on by default): the model's first `k` layer
keeps its v; every later `k` layer mixes its own v towards it per channel,
    v = lerp(v, v_first, sigmoid(v_lora(x^v)))       v_lora: Linear(no bias) -> Linear (FLA's `LoRA`)
which is FLA's `layer_idx == 0` / `!= 0` split (the first layer has no v_lora). v_first travels as a
side stream of the reference LM (reference/model.py, `Block`): the first `k` layer built (counted in
the model's `shared` dict) returns concat(y, v) and its Block stores v as the stream "rwkv7.v_first";
later `k` layers read concat(norm(x), v_first). Riding along x keeps it inside the mixer contract:
packed documents and state pieces split it with x, and since v_first is a per-token value (no
recurrence), a model run in pieces recomputes it for the new tokens and needs no state for it.
A `k` layer built on its own (no `shared`) or with `value_residual: false` is the layer-0 form.
Layers that cannot carry a stream refuse it: parallel branches (`p`), the MoDr core (`o`),
hyper-connections, post-norm blocks; context parallelism refuses `k` altogether (no CP form).
RWKV-7's channel mixing (token-shift squared-ReLU FFN) is its own layer, `c` (mixers/rwkv7_ffn.py).

Init follows FLA's `_initialize_weights` at FLA's layer index (`fla_layer_index`: the block this
sublayer belongs to, a block being a sequence mixer and the channel layers after it).
State: `{"shift": [B, hidden] (the last input token), "recurrent": [B, H, K, V]}`; no state = zeros.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from megahybrid.config import ConfigError, fail
from megahybrid.mixers.base import Mixer, State
from megahybrid.mixers.delta_rule import _chunks, _work_dtype

V_FIRST_STREAM = "rwkv7.v_first"
"""Name of the side stream that carries the first `k` layer's v to the later `k` layers."""
USES_KEY = "rwkv7.uses"
"""Key in the model's `shared` dict counting the `k` layers built so far (the first one writes v_first)."""

DECAY_LOWER_BOUND = -math.exp(-0.5)
"""w = DECAY_LOWER_BOUND * sigmoid(.): RWKV-7's per-step decay exp(w) stays above e^{-0.607} = 0.545
(official RWKV-7 `w = -softplus(-w0 - ...) - 0.5` then exp(-exp(w)); FLA's -0.6065306597126334)."""


def _model_config(config):
    return getattr(config, "model", config)


# ------------------------------------------------------------------------------- the core


def naive_recurrent_rwkv7(r, w, k, v, a, b, initial_state=None, scale: float = 1.0):
    """S_t = (diag(exp w_t) + b_t a_t^T) S_{t-1} + k_t v_t^T,  o_t = S_t^T (scale r_t), per head.

    r, w, k, a, b `[B, T, H, K]`; v `[B, T, H, V]`; state `[B, H, K, V]`. Returns (o `[B, T, H, V]` in
    r's dtype, final state in the working dtype, float32 at least)."""
    B, T, H, K = r.shape
    dtype, work = r.dtype, _work_dtype(r)
    r, w, k, v, a, b = (t.to(work) for t in (r * scale, w, k, v, a, b))
    S = r.new_zeros(B, H, K, v.shape[-1]) if initial_state is None else initial_state.to(work)
    eye = torch.eye(K, dtype=work, device=r.device)
    outs = []
    for t in range(T):
        transition = eye * w[:, t].exp()[..., None, :] + b[:, t, :, :, None] * a[:, t, :, None, :]  # [B, H, K, K]
        S = transition @ S + k[:, t, :, :, None] * v[:, t, :, None, :]
        outs.append(torch.einsum("bhk,bhkv->bhv", r[:, t], S))
    o = torch.stack(outs, dim=1) if outs else v.clone()
    return o.to(dtype), S


def chunked_rwkv7(r, w, k, v, a, b, chunk_size: int = 16, initial_state=None, scale: float = 1.0):
    """Same arguments and result as `naive_recurrent_rwkv7`, in T/chunk sequential steps.

    Per chunk (positions i, j in 1..C), Gamma_i = w_1 + ... + w_i per key channel (Gamma_0 = 0),
    S_0 the entering state and u_j = S_{j-1}^T a_j the rank-1 reads:
        S_i = e^{Gamma_i} S_0 + sum_{j<=i} e^{Gamma_i - Gamma_j} (k_j v_j^T + b_j u_j^T)
        u_i = S_0^T (a_i e^{Gamma_{i-1}}) + sum_{j<i} <a_i, e^{Gamma_{i-1} - Gamma_j} k_j> v_j + <a_i, ... b_j> u_j
    so (I - A_ab) U = A_ak V + (a e^{Gamma_{i-1}}) S_0 (A strictly lower), solved once per chunk for the
    part that does not depend on S_0. T need not divide by the chunk: the tail is padded with w = 0 and
    everything else 0, which neither decays nor writes."""
    B, T, H, K = r.shape
    dtype, work = r.dtype, _work_dtype(r)
    C = max(1, min(chunk_size, T))
    r, w, k, v, a, b = (_chunks(t.to(work), C) for t in (r * scale, w, k, v, a, b))  # [B, H, N, C, d]

    # 1. Decays between positions, per key channel: masked to -inf before exp (exponents <= 0).
    gamma = w.cumsum(-2)
    gamma_before = gamma - w  # Gamma_{i-1}
    idx = torch.arange(C, device=r.device)
    upto = (idx[:, None] >= idx[None, :])[..., None]  # j <= i
    before = (idx[:, None] > idx[None, :])[..., None]  # j < i
    decay_upto = (gamma[..., :, None, :] - gamma[..., None, :, :]).masked_fill(~upto, -torch.inf).exp()
    decay_before = (gamma_before[..., :, None, :] - gamma[..., None, :, :]).masked_fill(~before, -torch.inf).exp()
    pair = lambda x, y, d: torch.einsum("...id,...jd,...ijd->...ij", x, y, d)  # noqa: E731
    A_rk, A_rb = pair(r, k, decay_upto), pair(r, b, decay_upto)
    A_ak, A_ab = pair(a, k, decay_before), pair(a, b, decay_before)

    # 2. The rank-1 reads, split into the part from this chunk (u0) and the map from S_0 (w_in).
    u0 = torch.linalg.solve_triangular(-A_ab, A_ak @ v, upper=False, unitriangular=True)
    w_in = torch.linalg.solve_triangular(-A_ab, a * gamma_before.exp(), upper=False, unitriangular=True)

    # 3. Sequential over chunks: reads, outputs, then the state at the chunk's end.
    r_in = r * gamma.exp()
    to_end = (gamma[..., -1:, :] - gamma).exp()
    k_out, b_out = k * to_end, b * to_end
    chunk_decay = gamma[..., -1, :].exp()[..., None]  # [B, H, N, K, 1]
    S = r.new_zeros(B, H, K, v.shape[-1]) if initial_state is None else initial_state.to(work)
    outs = []
    for n in range(r.shape[2]):
        u = u0[:, :, n] + w_in[:, :, n] @ S
        outs.append(r_in[:, :, n] @ S + A_rk[:, :, n] @ v[:, :, n] + A_rb[:, :, n] @ u)
        S = (S * chunk_decay[:, :, n] + k_out[:, :, n].transpose(-1, -2) @ v[:, :, n]
             + b_out[:, :, n].transpose(-1, -2) @ u)

    # 4. Back to [B, T, H, V], dropping the padded tail.
    o = torch.stack(outs, dim=2).movedim(1, 3).flatten(1, 2)[:, :T]
    return o.to(dtype), S


# ------------------------------------------------------------------------------- the layer


class LoRA(nn.Module):
    """FLA's `LoRA`: `lora = Sequential(Linear(in, rank, no bias), act, Linear(rank, out, bias))`."""

    def __init__(self, in_dim: int, out_dim: int, rank: int, activation: Optional[str], bias: bool = True):
        super().__init__()
        act = {"tanh": nn.Tanh(), "sigmoid": nn.Sigmoid(), None: nn.Identity()}[activation]
        self.lora = nn.Sequential(nn.Linear(in_dim, rank, bias=False), act, nn.Linear(rank, out_dim, bias=bias))
        # FLA's init: the down projection at zero, the up projection orthogonal (gain 0.1).
        nn.init.zeros_(self.lora[0].weight)
        gain = math.sqrt(rank / out_dim) if rank > out_dim else 1.0
        nn.init.orthogonal_(self.lora[2].weight, gain=0.1 * gain)
        if bias:
            nn.init.zeros_(self.lora[2].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lora(x)


def rwkv7_sizes(config) -> dict:
    """heads, head_dim, value width and the four LoRA ranks (FLA's defaults where None)."""
    m = _model_config(config)
    c, hidden = m.rwkv7, m.hidden_size
    factor = c.head_dim / 64  # FLA: wider heads get wider decay / a LoRAs
    default = lambda mult, f: max(32, int(round(mult * hidden ** 0.5 * f / 32) * 32))  # noqa: E731
    return dict(heads=hidden // c.head_dim, head_dim=c.head_dim, value_dim=c.value_dim or hidden,
                decay_rank=c.decay_low_rank_dim or default(2.5, factor),
                a_rank=c.a_low_rank_dim or default(2.5, factor),
                gate_rank=c.gate_low_rank_dim or default(5, 1.0),
                v_rank=c.v_low_rank_dim or default(1.7, factor))


def fla_layer_index(config, index: int) -> tuple[int, int]:
    """(FLA's `layer_idx`, `num_hidden_layers`) of sublayer `index`, for the depth-dependent init. FLA's
    layer is a block of (time mixing, channel mixing); here a block is a sequence mixer ("mixer" kind)
    with the channel layers after it, so "(kc)x24" gives both sublayers of block i FLA's layer i. A
    layout of channel layers only counts each as a block; (0, 1) when the config has no layout (a layer
    built on its own)."""
    from megahybrid.pattern import resolve_layers

    try:
        specs = resolve_layers(config)
    except ConfigError:
        return 0, 1
    mixers = [s.kind == "mixer" for s in specs]
    if not any(mixers):
        return min(index, len(specs) - 1), max(1, len(specs))
    return max(0, sum(mixers[:index + 1]) - 1), sum(mixers)


class RWKV7(Mixer):
    """RWKV-7 time mixing; see the module docstring."""

    side_inputs: tuple[str, ...] = ()
    """(V_FIRST_STREAM,) for a `k` layer after the first with the value residual (Block reads it)."""
    side_output: Optional[str] = None
    """V_FIRST_STREAM for the model's first `k` layer with the value residual."""

    def __init__(self, config, index: int = 0, shared: Optional[dict] = None):
        super().__init__()
        config = _model_config(config)
        self.check(config)
        c, hidden = config.rwkv7, config.hidden_size
        s = rwkv7_sizes(config)
        self.num_heads, self.head_dim, self.value_dim = s["heads"], s["head_dim"], s["value_dim"]
        self.chunk_size = c.chunk_size
        self.hidden = hidden
        # The value residual's role (module docstring): the first `k` layer of the model writes v_first,
        # later ones read it through v_lora.
        use = 0
        if c.value_residual and shared is not None:
            use = shared.get(USES_KEY, 0)
            shared[USES_KEY] = use + 1
            if use == 0:
                self.side_output = V_FIRST_STREAM
            else:
                self.side_inputs = (V_FIRST_STREAM,)
        self.reads_v_first = use > 0
        for name in "rwkvag":
            setattr(self, f"x_{name}", nn.Parameter(torch.zeros(1, 1, hidden)))
        self.k_k = nn.Parameter(torch.zeros(hidden))
        self.k_a = nn.Parameter(torch.zeros(hidden))
        self.r_k = nn.Parameter(torch.zeros(self.num_heads, self.head_dim))
        self.r_proj = nn.Linear(hidden, hidden, bias=False)
        self.k_proj = nn.Linear(hidden, hidden, bias=False)
        self.v_proj = nn.Linear(hidden, self.value_dim, bias=False)
        self.o_proj = nn.Linear(self.value_dim, hidden, bias=False)
        self.w_lora = LoRA(hidden, hidden, s["decay_rank"], "tanh")
        self.v_lora = LoRA(hidden, self.value_dim, s["v_rank"], None) if self.reads_v_first else None
        self.a_lora = LoRA(hidden, hidden, s["a_rank"], None)
        self.g_lora = LoRA(hidden, self.value_dim, s["gate_rank"], "sigmoid", bias=False)
        self.g_norm = nn.GroupNorm(self.num_heads, self.value_dim, eps=self.head_dim * c.norm_eps, affine=True)
        self._init_like_fla(*fla_layer_index(config, index))

    @torch.no_grad()
    def _init_like_fla(self, layer: int, num_layers: int) -> None:
        """FLA `RWKV7Attention._initialize_weights` (from the official RWKV-7 init)."""
        hidden, D = self.x_r.shape[-1], self.head_dim
        ratio_0_to_1 = layer / (num_layers - 1) if num_layers > 1 else 0.0
        ratio_1_to_almost0 = 1.0 - layer / num_layers
        n = torch.arange(hidden, dtype=torch.float64)
        ddd = n / hidden
        linear = n / max(hidden - 1, 1) - 0.5
        zigzag = ((n % D) - (D - 1) / 2) / max((D - 1) / 2, 1e-9)
        zigzag = zigzag * zigzag.abs()
        www = -6 + 6 * (n / max(hidden - 1, 1)) ** (1 + ratio_0_to_1 ** 0.3)
        for name, power in [("r", 0.2), ("w", 0.9), ("k", 0.7), ("v", 0.7), ("a", 0.9), ("g", 0.2)]:
            getattr(self, f"x_{name}").copy_(1.0 - ddd ** (power * ratio_1_to_almost0))
        self.k_a.fill_(1.02)
        self.r_k.fill_(-0.04)
        self.k_k.copy_(0.71 - linear * 0.1)
        self.w_lora.lora[2].bias.copy_(www + 0.5 + zigzag * 2.5)
        self.a_lora.lora[2].bias.copy_(-0.19 + zigzag * 0.3 + linear * 0.4)
        if self.v_lora is not None:  # "v0": sigmoid(0.73 +- 0.2) ~ 0.63-0.72 of v_first at init
            V = self.value_dim  # FLA spans `linear` over hidden_size (its init fails for value_dim != hidden)
            linear_v = torch.arange(V, dtype=torch.float64) / max(V - 1, 1) - 0.5
            self.v_lora.lora[2].bias.copy_(0.73 - linear_v * 0.4)
        self.g_norm.weight.fill_(((layer + 1) / num_layers) ** 0.7)
        nn.init.orthogonal_(self.r_proj.weight)
        nn.init.orthogonal_(self.k_proj.weight, gain=0.1)
        nn.init.orthogonal_(self.v_proj.weight)
        nn.init.zeros_(self.o_proj.weight)

    def forward_segment(self, x: torch.Tensor, state: State = None):
        """x `[B, T, hidden]`, or `[B, T, hidden + value_dim]` (x, v_first) for a layer that reads v_first;
        y `[B, T, hidden]`, or (y, v) concatenated for the layer that writes it."""
        v_first = None
        if self.reads_v_first:
            x, v_first = x[..., :self.hidden], x[..., self.hidden:]
        B, T, hidden = x.shape
        H, D = self.num_heads, self.head_dim
        prev = x.new_zeros(B, 1, hidden) if state is None else state["shift"][:, None].to(x.dtype)
        delta = torch.cat([prev, x[:, :-1]], dim=1) - x  # x_{t-1} - x_t
        xr, xw, xk, xv, xa, xg = (torch.addcmul(x, delta, getattr(self, f"x_{n}")) for n in "rwkvag")
        r, k, v = self.r_proj(xr), self.k_proj(xk), self.v_proj(xv)
        if v_first is not None:
            v = torch.lerp(v, v_first.to(v.dtype), self.v_lora(xv).sigmoid())
        v_first_out = v if self.side_output else None  # FLA layer 0: v_first = v
        w = DECAY_LOWER_BOUND * self.w_lora(xw).sigmoid()
        a = self.a_lora(xa).sigmoid()
        g = self.g_lora(xg)
        kk = F.normalize((k * self.k_k).unflatten(-1, (H, D)), dim=-1, p=2.0)
        k = k.addcmul(k * (a - 1), self.k_a)  # k * (1 + (a - 1) k_a), FLA's form
        r, w, k, a = (t.unflatten(-1, (H, D)) for t in (r, w, k, a))
        v = v.unflatten(-1, (H, -1))
        work = _work_dtype(v)
        h0 = None if state is None else state["recurrent"]
        with torch.autocast(x.device.type, enabled=False):
            o, recurrent = chunked_rwkv7(r.to(work), w.to(work), k.to(work), v.to(work), -kk.to(work),
                                         (kk * a).to(work), self.chunk_size, h0)
        o = self.g_norm(o.reshape(B * T, self.value_dim).to(x.dtype)).view(B, T, self.value_dim)
        bonus = ((r * k * self.r_k).sum(-1, keepdim=True) * v).flatten(-2)  # the current token's own v
        y = self.o_proj((o + bonus) * g)
        if self.side_output:
            y = torch.cat([y, v_first_out.to(y.dtype)], dim=-1)
        return y, {"shift": x[:, -1], "recurrent": recurrent}

    @classmethod
    def check(cls, config) -> None:
        m = _model_config(config)
        c, p = m.rwkv7, "model.rwkv7"
        if c.head_dim < 1 or m.hidden_size % c.head_dim:
            fail(f"{p}.head_dim", c.head_dim, f"must be >= 1 and divide model.hidden_size={m.hidden_size}")
        heads = m.hidden_size // c.head_dim
        if c.value_dim is not None and (c.value_dim < 1 or c.value_dim % heads):
            fail(f"{p}.value_dim", c.value_dim,
                 f"must be a positive multiple of the number of heads ({heads}), or null for hidden_size")
        for name in ("decay_low_rank_dim", "a_low_rank_dim", "gate_low_rank_dim", "v_low_rank_dim"):
            if getattr(c, name) is not None and getattr(c, name) < 1:
                fail(f"{p}.{name}", getattr(c, name), "must be >= 1 (or null for FLA's default)")
        if c.chunk_size < 1:
            fail(f"{p}.chunk_size", c.chunk_size, "must be >= 1 (16 is the default)")
        if not c.norm_eps > 0:
            fail(f"{p}.norm_eps", c.norm_eps, "must be > 0 (FLA uses 1e-5)")

    @classmethod
    def flops_per_token(cls, config, seq_len: int, causal: bool = True) -> float:
        """2 * MACs per token: r, k (hidden^2 each), v and o (hidden * V each), the LoRAs (hidden * rank +
        rank * out; v_lora with the value residual), the core 4 H K V (decayed state, rank-1 read a^T S and
        write b u^T, k v^T write, r^T S read; as DeltaNet's count). Linear in sequence length. The model's
        first `k` layer has no v_lora; its 2 * v_rank * (hidden + V) is counted anyway (a layer's count
        does not know its position)."""
        m = _model_config(config)
        s, hidden = rwkv7_sizes(m), m.hidden_size
        V = s["value_dim"]
        proj = 2 * hidden * hidden + 2 * hidden * V
        lora = (s["decay_rank"] * 2 * hidden + s["a_rank"] * 2 * hidden + s["gate_rank"] * (hidden + V)
                + (s["v_rank"] * (hidden + V) if m.rwkv7.value_residual else 0))
        core = 4 * s["heads"] * s["head_dim"] * (V // s["heads"])
        return 2.0 * (proj + lora + core)
