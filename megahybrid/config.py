"""Typed configuration: one small dataclass per component, YAML files and dotted overrides.

Every field has a docstring-style comment; unknown keys and bad values raise `ConfigError`
with one line naming the field, the value and the fix (style.md rule 8).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml


class ConfigError(ValueError):
    """A bad configuration: the message names the field, the value and the fix."""


def fail(path: str, value: Any, rule: str) -> typing.NoReturn:
    """Raise the one-line error every config check uses."""
    raise ConfigError(f"{path}={value!r}: {rule}")


# --------------------------------------------------------------------------- model parts


@dataclass
class AttentionSparsityConfig:
    """Block-sparse attention for layers built from `Attention` (`*`, its branch in `p`, the block of `s`):
    kind "local_global" is the BigBird / Longformer pattern (arXiv 2007.14062, 2004.05150) on causal
    blocks. The sequence is cut into blocks of `block_size` tokens; a query in block b sees, causally,
    the keys of blocks b - local_blocks .. b and of the first `global_blocks` blocks. Only those blocks
    are computed (mixers/attention.py `block_sparse_attention`), so the cost per query is at most
    (local_blocks + 1 + global_blocks) * block_size keys instead of the whole prefix. `w` (sliding
    window), `h` and `f` keep their own masks and ignore it; `D` (DSA) refuses it."""

    kind: Literal["none", "local_global"] = "none"
    """none = dense causal attention; local_global = the block pattern above."""
    block_size: int = 64
    """Tokens per block (keys and queries); the KV cache keeps every token (global blocks stay visible)."""
    local_blocks: int = 1
    """Blocks before a query's own block that it also sees (its own block is always seen)."""
    global_blocks: int = 1
    """The first global_blocks blocks of the sequence (document), seen by every later query (attention sinks)."""


@dataclass
class AttentionConfig:
    """Softmax attention (`*`), sliding-window attention (`w`) and the attention half of
    shared (`s`) and parallel (`h`) blocks."""

    num_heads: int = 8
    """Query heads."""
    num_kv_heads: Optional[int] = None
    """Key/value heads (GQA groups); None = num_heads (MHA). Must divide num_heads."""
    head_dim: Optional[int] = None
    """Per-head width; None = hidden_size // num_heads."""
    rope_theta: float = 10000.0
    """RoPE base. 0 disables rotary embeddings."""
    rotary_fraction: float = 1.0
    """Fraction of head_dim that is rotated (partial rotary, e.g. 0.5 in Bamba)."""
    qk_norm: bool = False
    """RMSNorm on each query and key head before RoPE (Qwen3, OLMo2)."""
    qk_norm_scope: Literal["head", "all_heads"] = "head"
    """With qk_norm: "head" normalises each head over head_dim (Qwen3, Qwen3-Next; weights [D]);
    "all_heads" normalises the whole q (k) projection at once (OLMo2, OlmoHybrid; weights [H*D])."""
    window: int = 4096
    """Sliding-window size in tokens for `w` layers (a token sees itself and window-1 before)."""
    output_gate: bool = False
    """Multiply the attention output by sigmoid(W_g x) per head (Qwen3-Next gated attention)."""
    bias: bool = False
    """Bias on the q/k/v/o projections."""
    out_bias: Optional[bool] = None
    """Bias on o_proj alone; None = same as `bias` (RecurrentGemma: q/k/v without, o_proj with)."""
    softmax_scale: Optional[float] = None
    """Score scale; None = head_dim ** -0.5."""
    sparsity: AttentionSparsityConfig = field(default_factory=AttentionSparsityConfig)
    """Block-sparse local + global pattern of `*` layers (off by default)."""


@dataclass
class Mamba2Config:
    """Mamba2 / SSD mixer (`M`), Dao & Gu 2024 (arXiv 2405.21060)."""

    state_size: int = 128
    """SSM state width N per head (d_state)."""
    head_dim: int = 64
    """Channels per SSM head (P)."""
    num_groups: int = 1
    """B/C groups (like GQA for SSMs); must divide the number of heads."""
    expand: int = 2
    """d_inner = expand * hidden_size."""
    conv_kernel: int = 4
    """Depthwise causal conv width over [x, B, C]."""
    chunk_size: int = 64
    """SSD chunk length of the chunked (matmul) form."""
    dt_min: float = 0.001
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    dt_limit: tuple[float, float] = (0.0, float("inf"))
    """Clamp of softplus(dt + dt_bias) (mamba-ssm `dt_limit`)."""
    norm_before_gate: bool = False
    """Gated RMSNorm order: False = norm(y * silu(z)) (Mamba2, NemotronH); True = norm(y) * silu(z)."""
    use_conv_bias: bool = True
    use_bias: bool = False
    d_inner: Optional[int] = None
    """SSM inner width (z, x and the heads' channels); None = expand * hidden_size. Falcon-H1's
    `mamba_d_ssm` sets it apart from the hidden size (e.g. 1536 at hidden 1024)."""
    gated_norm: bool = True
    """False: the output is y * silu(z) with no RMSNorm and no `norm.weight` (Falcon-H1's
    `mamba_rms_norm=false`); True: the gated RMSNorm (`norm_before_gate` sets its order)."""


@dataclass
class Mamba1Config:
    """Mamba1 selective scan (`m`, Jamba's mixer), Gu & Dao 2023 (arXiv 2312.00752)."""

    state_size: int = 16
    expand: int = 2
    conv_kernel: int = 4
    dt_rank: Optional[int] = None
    """None = ceil(hidden_size / 16)."""
    inner_layernorms: bool = False
    """RMSNorm on dt, B and C (Jamba)."""
    chunk_size: int = 16
    """Chunk length of the reference chunked scan; its memory grows as chunk_size^2 * d_inner * N."""
    use_conv_bias: bool = True
    use_bias: bool = False


@dataclass
class DeltaNetConfig:
    """DeltaNet (`d`), Yang et al. 2024 (arXiv 2406.06484): S_t = S_{t-1}(I - b k k^T) + b v k^T."""

    num_heads: int = 8
    head_dim: Optional[int] = None
    """Key/query head width; None = hidden_size // num_heads."""
    expand_v: float = 1.0
    """Value head width = expand_v * head_dim."""
    conv_kernel: int = 4
    """Short causal conv on q, k, v (0 disables it)."""
    chunk_size: int = 64
    """Chunk length of the chunked WY form."""
    output_gate: bool = True
    """Output RMSNorm gated by silu(W_g x); False = plain RMSNorm."""
    allow_neg_eigval: bool = False
    """beta in (0, 2) instead of (0, 1) (Grazzi et al. 2024)."""
    use_beta: bool = True
    """False: beta = 1 (plain delta rule, no b_proj; FLA's `use_beta=False`)."""


@dataclass
class GatedDeltaNetConfig:
    """Gated DeltaNet (`G`), Yang et al. 2024 (arXiv 2412.06464), as in Qwen3-Next / Megatron."""

    num_qk_heads: int = 8
    num_v_heads: Optional[int] = None
    """None = num_qk_heads; must be a multiple of num_qk_heads (q/k heads are repeated)."""
    qk_head_dim: Optional[int] = None
    """None = hidden_size // num_qk_heads."""
    v_head_dim: Optional[int] = None
    """None = qk_head_dim."""
    conv_kernel: int = 4
    chunk_size: int = 64
    allow_neg_eigval: bool = False
    norm_eps: Optional[float] = None
    """eps of the gated output RMSNorm; None = model.norm_eps (OlmoHybrid hard-codes 1e-5, FLA's default)."""


@dataclass
class RGLRUConfig:
    """Griffin recurrent block with the RG-LRU (`r`), De et al. 2024 (arXiv 2402.19427)."""

    width: Optional[int] = None
    """Recurrence width (lru_width); None = hidden_size."""
    num_heads: int = 8
    """Block-diagonal gate heads; must divide width."""
    conv_kernel: int = 4
    c: float = 8.0
    """Fixed scalar c in a_t = a^(c r_t) (paper, section 2.4)."""
    bias: bool = True
    """Bias on linear_x, linear_y and linear_out (RecurrentGemma has them)."""


@dataclass
class MLPConfig:
    """Dense MLP (`-`)."""

    ffn_hidden_size: Optional[int] = None
    """None = 4 * hidden_size; for gated activations round(8/3 * hidden_size) rounded up to a multiple of 64."""
    activation: Literal["swiglu", "geglu", "geglu_tanh", "relu2", "gelu", "silu"] = "swiglu"
    """swiglu/geglu are gated (two up projections); geglu_tanh is geglu with the tanh-approximate
    GELU (RecurrentGemma's `gelu_pytorch_tanh`); relu2 is squared ReLU (Primer, Nemotron-H)."""
    bias: bool = False


@dataclass
class MoEConfig:
    """Mixture of experts (`E`)."""

    num_experts: int = 8
    top_k: int = 2
    ffn_hidden_size: Optional[int] = None
    """Per-expert width; None = the dense MLP's width."""
    activation: Literal["swiglu", "geglu", "geglu_tanh", "relu2", "gelu", "silu"] = "swiglu"
    router: Literal["softmax", "sigmoid"] = "softmax"
    """softmax: Switch/Mixtral; sigmoid: DeepSeek-V3 style scores."""
    norm_topk_prob: bool = True
    """Renormalise the top-k weights to sum to 1."""
    routed_scaling_factor: float = 1.0
    """The top-k weights are multiplied by this after any renormalisation (DeepSeek-V3, NemotronH
    `routed_scaling_factor`; Megatron `moe_router_topk_scaling_factor`)."""
    score_correction_bias: bool = False
    """A per-expert buffer `router.expert_bias [E]` added to the scores to *choose* the experts only;
    the weights come from the unbiased scores (DeepSeek-V3 aux-loss-free balancing, NemotronH
    `gate.e_score_correction_bias`). megahybrid keeps it fixed during training (no balancing update)."""
    num_groups: int = 1
    """Group-limited routing: the experts form num_groups equal groups, a group scores the sum of its
    two best (bias-corrected) scores, and only experts of the topk_groups best groups can be chosen
    (DeepSeek-V3 `n_group`, NemotronH). 1 = no grouping."""
    topk_groups: int = 1
    """Groups kept per token with num_groups > 1 (DeepSeek-V3 `topk_group`)."""
    num_shared_experts: int = 0
    shared_ffn_hidden_size: Optional[int] = None
    """Width of the (single fused) shared expert; None = num_shared_experts * ffn_hidden_size."""
    shared_expert_gate: bool = False
    """Scale the shared expert's output by sigmoid(w . x), one learned [1, hidden] gate per layer
    (Qwen2-MoE / Qwen3-Next `shared_expert_gate`, Megatron `moe_shared_expert_gate`)."""
    aux_loss_coeff: float = 0.01
    """Switch-Transformer load-balancing loss weight (Fedus et al. 2021, eq. 4)."""
    z_loss_coeff: float = 0.0
    """Router z-loss weight (ST-MoE, Zoph et al. 2022)."""
    capacity_factor: Optional[float] = None
    """None = dropless (every routed token is computed)."""


@dataclass
class SharedAttentionConfig:
    """Zamba-style shared attention (`s`), Glorioso et al. 2024 (arXiv 2411.15242)."""

    adapter_rank: int = 8
    """Rank of the per-use LoRA adapters on q, k and v (0 = no adapters)."""
    num_shared_blocks: int = 1
    """Distinct shared blocks, used round-robin over the `s` positions (Zamba2 uses 2)."""
    concat_embeddings: bool = False
    """The block reads concat(residual stream, token embeddings) (2 * hidden wide) through its own
    shared RMSNorm instead of the layer's pre-norm; q/k/v and their adapters are 2 * hidden wide (Zamba2)."""
    mlp: bool = False
    """After attention: a shared norm, then a shared MLP of `model.mlp`'s width and activation, with no
    residual in between (Zamba2's shared transformer block)."""
    mlp_adapter_rank: int = 0
    """Rank of the per-use LoRA adapter on the MLP's fused [gate | up] projection (0 = none; needs mlp)."""
    output_projection: bool = False
    """A per-use Linear(hidden, hidden) on the block's output (Zamba2's `linear`)."""
    output_to: Literal["residual", "next_input"] = "residual"
    """residual: x + y like every layer; next_input: x passes unchanged and y is added to the next
    layer's input before its norm, not to its residual: x + next(norm(x + y)) (Zamba2's hybrid layer)."""


@dataclass
class HymbaConfig:
    """Hymba parallel attention + SSM heads (`h`), Dong et al. 2024 (arXiv 2411.13676).
    Attention sizes come from `attention`, SSM sizes from `mamba2`."""

    attention_window: Optional[int] = None
    """Sliding window for the attention heads; None = global attention."""


@dataclass
class ParallelMixersConfig:
    """Several mixers side by side in one block (`p`): each reads the same normed input and their
    outputs are summed, y = sum_i mixer_i(norm(x)) (Falcon-H1: attention and Mamba2 in every layer).
    Each mixer takes its sizes from its own section (`attention`, `mamba2`, ...)."""

    mixers: list[str] = field(default_factory=lambda: ["attention", "mamba2"])
    """Long names (or symbols) of the mixers run in parallel; each at most once, no channel layers."""


@dataclass
class GRUConfig:
    """minGRU (`u`), Feng et al. 2024 (arXiv 2410.01201): h_t = (1 - z_t) h_{t-1} + z_t h~_t with z_t and
    h~_t computed from x_t alone, so a parallel scan trains it (mixers/gru.py says why not a classic GRU)."""

    expand: float = 1.0
    """Recurrence width = expand * hidden_size (lucidrains' minGRU `expansion_factor`)."""
    candidate_activation: Literal["g", "identity"] = "g"
    """h~_t = g(W_h x_t) with the paper's g (x + 0.5 for x >= 0, sigmoid(x) below; keeps h > 0, its
    log-space form, appendix B.3), or W_h x_t itself (the paper's plain form)."""
    conv_kernel: int = 0
    """Depthwise causal conv (with bias, no activation) on the layer input before the projections;
    0 = none (the paper has none; lucidrains' minGRU LM uses 3)."""
    bias: bool = False
    """Bias on to_hidden_and_gate and to_out."""


@dataclass
class RWKV7Config:
    """RWKV-7 "Goose" time mixing (`k`) and channel mixing (`c`), Peng et al. 2025 (arXiv 2503.14456), as
    flash-linear-attention's `RWKV7Attention` and `RWKV7FeedForward`. Key width = hidden_size; low-rank
    widths None = FLA's formulas."""

    head_dim: int = 64
    """Key (and receptance) channels per head; num_heads = hidden_size / head_dim."""
    value_dim: Optional[int] = None
    """Total value width; None = hidden_size. Must divide by the number of heads."""
    decay_low_rank_dim: Optional[int] = None
    """Rank of w_lora; None = max(32, round(2.5 sqrt(hidden) * head_dim/64 / 32) * 32) (FLA)."""
    a_low_rank_dim: Optional[int] = None
    """Rank of a_lora (in-context learning rate); None = same formula as decay (FLA)."""
    gate_low_rank_dim: Optional[int] = None
    """Rank of g_lora (output gate); None = max(32, round(5 sqrt(hidden) / 32) * 32) (FLA)."""
    norm_eps: float = 1e-5
    """The per-head GroupNorm on the output uses eps = head_dim * norm_eps (FLA, official RWKV-7)."""
    chunk_size: int = 16
    """Chunk length of the chunked reference form; its memory grows as chunk_size * head_dim per token."""
    value_residual: bool = True
    """RWKV-7's value residual: every `k` layer after the model's first mixes its v towards the first `k`
    layer's v, v = lerp(v, v_first, sigmoid(v_lora(x^v))) (FLA's v_first). false: every `k` layer is FLA's
    layer-0 form (no v_lora), as megahybrid built it before (checkpoints saved then load with false)."""
    v_low_rank_dim: Optional[int] = None
    """Rank of v_lora (value residual); None = max(32, round(1.7 sqrt(hidden) * head_dim/64 / 32) * 32) (FLA)."""
    ffn_hidden_size: Optional[int] = None
    """Width of RWKV-7's channel mixing (`c`, mixers/rwkv7_ffn.py); None = 4 * hidden_size rounded up to a
    multiple of 32 (FLA's RWKV7FeedForward with hidden_ratio 4)."""


@dataclass
class HyenaConfig:
    """Hyena operator (`y`), Poli et al. 2023 (arXiv 2302.10866), as safari's HyenaOperator/HyenaFilter.
    Defaults: safari's Pile run (configs/experiment/pile/hyena.yaml: emb_dim 33, filter_order 64,
    short filter 3, w 14) and ExponentialModulation's defaults."""

    order: int = 2
    """Depth of the recurrence: order + 1 projections (x_0 .. x_{order-1}, v), order - 1 long convolutions."""
    filter_order: int = 64
    """Width of the implicit filter FFN (safari's `filter_order`)."""
    emb_dim: int = 33
    """Positional features fed to the filter FFN: t and (emb_dim - 1) / 2 cos/sin bands; odd, >= 3."""
    num_inner_mlps: int = 2
    """Hidden width x width layers of the filter FFN, each followed by the sine activation."""
    sin_freq: float = 14.0
    """Initial w of the FFN's activation sin(w x) (safari's `w`; trainable, one shared by all its layers)."""
    short_filter_order: int = 3
    """Taps of the depthwise causal conv on the projections (safari's `short_filter_order`)."""
    filter_len: Optional[int] = None
    """Taps of each long filter (safari's `l_max`); None = model.max_seq_len. Tokens further apart do not
    interact; generation keeps the last filter_len - 1 long-conv inputs as state."""
    fast_decay_pct: float = 0.3
    """Fastest channel's decay window reaches decay_target at this fraction of filter_len."""
    slow_decay_pct: float = 1.5
    """Slowest channel's decay window reaches decay_target at this fraction of filter_len."""
    decay_target: float = 0.01
    """Value of the exponential decay window at the fast/slow fractions above (safari's `target`)."""
    modulation_shift: float = 0.0
    """Added to the decay window: h = FFN(z) * (exp(-|delta| t) + shift) (safari's `shift`)."""
    bias: bool = True
    """Bias on in_proj and out_proj (safari's nn.Linear default)."""


@dataclass
class BasedConfig:
    """Based linear attention (`b`), Arora et al. 2024 (arXiv 2402.18668), as flash-linear-attention's
    `BasedLinearAttention` (2nd-order Taylor feature map, normalised, causal)."""

    feature_dim: int = 16
    """Query/key width per head before the feature map (phi has 1 + d + d(d+1)/2 features)."""
    num_heads: int = 16
    """Heads; each value head is hidden_size // num_heads wide (FLA's head_v_dim)."""
    eps: float = 1e-6
    """Added to the normaliser phi(q).sum(phi(k)) (FLA's parallel kernel and naive_parallel_based)."""
    chunk_size: int = 64
    """Tokens per chunk of the reference form (quadratic inside a chunk, running state across chunks)."""


@dataclass
class GoldFinchConfig:
    """GoldFinch GOLD attention (`f`), Goldstein et al. 2024 (arXiv 2407.12077): full attention whose
    keys and values are regenerated from one compressed cache shared by every `f` layer. Head sizes,
    RoPE and QK-norm come from `attention`."""

    compressed_dim: Optional[int] = None
    """Width of the compressed cache c = W_c x, made once at the first `f` layer's input; None =
    hidden_size // 16 (the paper's 16x key compression)."""
    token_cat: bool = True
    """TokenCat: keys and values read concat(c, token embedding) instead of c alone (the paper keeps
    the token ids in the cache and re-embeds them)."""


@dataclass
class DSAConfig:
    """DeepSeek Sparse Attention (`D`), DeepSeek-V3.2-Exp (github.com/deepseek-ai/DeepSeek-V3.2-Exp): a
    lightning indexer scores every past key per query and the main heads attend to only the top_k best
    (mixers/sparse_attention.py). The main heads are `*`'s (sizes, RoPE, QK-norm, gate from `attention`;
    DeepSeek uses MLA underneath). Names follow Megatron-Core 0.19.2's `dsa_indexer_*` fields."""

    index_heads: int = 4
    """Indexer heads H_I (Megatron `dsa_indexer_n_heads`; DeepSeek-V3.2: 64)."""
    index_head_dim: int = 32
    """Width D_I of each indexer query head and of the one shared indexer key (`dsa_indexer_head_dim`; 128)."""
    top_k: int = 256
    """Keys each query attends to (`dsa_indexer_topk`; DeepSeek-V3.2: 2048). A query with at most top_k keys
    before it (itself included) sees all of them; top_k >= seq_len is dense attention (the warm-up stage)."""
    index_rope_dim: Optional[int] = None
    """Leading channels of each indexer head rotated by RoPE (`attention.rope_theta`, half-split layout;
    Megatron's `qk_pos_emb_head_dim`, DeepSeek 64 of 128); None = index_head_dim // 2; 0 = no RoPE."""
    scoring_relu: bool = True
    """ReLU on the indexer's q.k before the per-head weights (`dsa_indexer_scoring_relu`; GLM-5 turns it off)."""
    loss_coeff: float = 0.01
    """Weight of the indexer's KL loss to the main heads' attention distribution (`dsa_indexer_loss_coeff`),
    reported as the layer's aux_loss. The indexer's input is detached, so this loss is its only training
    signal and the LM loss never reaches it; 0 leaves the indexer at its initialisation."""
    sparse_loss: bool = False
    """KL over the selected keys only (`dsa_indexer_use_sparse_loss`, DeepSeek's sparse stage) instead of
    over every causal key (its dense warm-up)."""


@dataclass
class EngramConfig:
    """Engram conditional memory (`n`), DeepSeek 2026 (arXiv 2601.07372): hashed N-gram embedding
    tables, a context-aware gate and a short causal conv, added to the residual (mixers/engram.py)."""

    max_ngram: int = 3
    """N-grams of orders 2..max_ngram ending at each position; also the conv's dilation (paper)."""
    heads_per_ngram: int = 4
    """Hash heads (tables) per N-gram order; collisions in one head are rarely collisions in all."""
    table_size: int = 65536
    """Rows per hash head, rounded up to distinct primes (one per head, as the official demo)."""
    head_dim: int = 32
    """Width of each head's rows; e is (max_ngram-1) * heads_per_ngram * head_dim wide."""
    conv_kernel: int = 4
    """Taps of the depthwise causal conv (paper: 4)."""
    gate_signed_sqrt: bool = True
    """Gate sigmoid(sign(s) sqrt|s|) as the official demo; false = sigmoid(s) (paper eq. 4)."""
    hash_seed: int = 0
    """Seed of the multiplicative-XOR hash multipliers (combined with the layer index)."""
    host_tables: bool = False
    """Keep the tables in host memory (pinned when CUDA is present); `.to()` does not move them and the
    gathered rows are moved to the device. No effect on a CPU-only run."""


@dataclass
class MoDrConfig:
    """MoDr (`o`, MegaCpp hybrid family): one core block shared by every `o` position, applied `repeats`
    times per position with a residual, each time with per-token routed LoRA branches on its input and
    output (megahybrid/mixers/modr.py)."""

    core: str = "gdn"
    """Layer type (long name or symbol) of the shared core, e.g. gdn, mamba2, rglru, attention, mlp;
    its sizes come from its own section."""
    repeats: int = 2
    """Applications of the core per `o` position (each with its own router, branches and state)."""
    num_branches: int = 4
    """LoRA branches per application a router picks from."""
    top_k: int = 1
    """Branches per token (1 = Switch-style, weight = router probability; > 1 renormalised)."""
    lora_rank: int = 8
    """Rank of every LoRA branch (down N(0, init_std), up zeros)."""
    aux_loss_coeff: float = 0.01
    """Weight of the Switch load-balancing loss over branches (mean over applications); 0 = none."""


@dataclass
class HyperConnectionsConfig:
    """mHC hyper-connections (arXiv 2512.24880): n residual streams mixed by a doubly-stochastic matrix
    (megahybrid/blocks/hyper_connections.py). streams = 1 is the plain residual (off)."""

    streams: int = 1
    """Residual streams n; > 1 turns mHC on (every block, pre-norm only)."""
    dynamic: bool = False
    """Input-dependent (per-token) read, write and mixing weights on top of the learned static ones."""
    sinkhorn_iters: int = 20
    """Sinkhorn-Knopp iterations that make the mixing matrix doubly stochastic (the paper uses 20)."""


@dataclass
class MixtureOfDepthsConfig:
    """Mixture-of-Depths (arXiv 2404.02258): a router picks the tokens that run chosen blocks, the others
    skip them (megahybrid/blocks/mixture_of_depths.py). Off while `layers` is empty."""

    layers: list[int] = field(default_factory=list)
    """0-based block indices (channel blocks '-' / 'E' only) whose tokens are routed."""
    capacity: float = 0.125
    """topk routing: fraction of each row's tokens that run the block in training."""
    routing: Literal["topk", "threshold", "soft"] = "topk"
    """topk: top capacity*T tokens per row in training, router logit > threshold at inference (causal);
    threshold: logit > threshold always; soft: every token runs, output scaled by sigmoid(logit)."""
    threshold: float = 0.0
    """Router-logit threshold of threshold routing and of topk routing at inference."""
    aux_loss_coeff: float = 0.01
    """topk: weight of the BCE loss teaching logit > threshold <=> in the top k (keeps inference causal)."""


@dataclass
class AdapterConfig:
    """Parameter-efficient adapters on chosen linears of any mixer (megahybrid/adapters.py): LoRA
    (arXiv 2106.09685), DoRA (2402.09353), VeRA (2310.11454), DyLoRA (2210.07558). Off while method='none'."""

    method: Literal["none", "lora", "dora", "vera", "dylora", "qlora"] = "none"
    """Adapter kind; 'qlora' (4-bit NF4 base) is refused until bitsandbytes on GPU is wired."""
    rank: int = 8
    """Rank r of the update (DyLoRA: the largest rank sampled)."""
    alpha: float = 16.0
    """The update is scaled by alpha / rank (LoRA, DoRA, DyLoRA; VeRA has no scale)."""
    dropout: float = 0.0
    """Dropout on the adapter's input (training only)."""
    targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "in_proj", "out_proj"])
    """Module-name patterns (fnmatch): one with a dot matches the full name (layers.3.mixer.q_proj), one
    without matches the last part (q_proj, *_proj). Each must match at least one nn.Linear."""
    dtype: Literal["auto", "float32", "bfloat16", "float64"] = "auto"
    """Adapter parameter dtype; auto = the base weight's dtype."""
    freeze_base: bool = True
    """Only the adapter parameters train; every other parameter gets requires_grad=False."""
    vera_seed: int = 0
    """VeRA: seed of the shared frozen random matrices (regenerated, not stored)."""
    dylora_eval_rank: Optional[int] = None
    """DyLoRA: rank used in eval and when merging; None = rank."""


@dataclass
class ModelConfig:
    """Architecture. The layer list comes from exactly one of: pattern, layers, or a
    backbone with attention_every / attention_layers / ratio."""

    pattern: Optional[str] = None
    """Layer pattern, e.g. "(MMM*E)x4" (design.md, "Layer-pattern language")."""
    layers: Optional[list[str]] = None
    """Explicit list of long layer names, e.g. [mamba2, mlp, attention, moe]."""
    backbone: Optional[str] = None
    """Mixer (long name or symbol) filling every non-attention slot, with num_layers."""
    num_layers: Optional[int] = None
    """Mixer-layer count for backbone-based layouts."""
    attention_every: Optional[int] = None
    """Every N-th mixer (1-based: N, 2N, ...) is attention."""
    attention_layers: Optional[list[int]] = None
    """0-based mixer indices that are attention (exp7 placement)."""
    ratio: Optional[list[int]] = None
    """[backbone, attention] counts, attention evenly spaced (Megatron's allocator)."""
    mlp_after_mixer: Optional[str] = None
    """With backbone layouts: a channel symbol ('-' or 'E') after every mixer, or None."""
    mlp_after_attention: Optional[str] = None
    """With backbone layouts: a channel symbol after the attention mixers only, taking precedence over
    mlp_after_mixer there (Edifice's `Hybrid` puts its FFN in the attention blocks alone)."""
    attention_symbol: str = "attention"
    """The layer (long name or symbol) that attention_every / attention_layers / ratio place, e.g.
    "swa" for sliding-window attention (Edifice's `Hybrid`)."""
    plugins: list[str] = field(default_factory=list)
    """Python import paths of plug-in modules imported before the layers are resolved; each registers
    its own layer types with `megahybrid.mixers.register` (contract: megahybrid/plugins.py)."""

    hidden_size: int = 256
    vocab_size: int = 8192
    norm: Literal["rmsnorm", "layernorm"] = "rmsnorm"
    norm_eps: float = 1e-5
    zero_centered_norm: bool = False
    """RMSNorm computes x * (1 + w) with w initialised at 0 (Gemma, Qwen3-Next)."""
    tie_embeddings: bool = False
    embedding_scale: float = 1.0
    """Embeddings are multiplied by this (sqrt(hidden_size) in Gemma/RecurrentGemma)."""
    logit_softcap: Optional[float] = None
    """logits = c * tanh(logits / c) (Gemma 2, RecurrentGemma)."""
    logit_scale: float = 1.0
    """Logits are multiplied by this before any soft-cap (µP output multiplier: Granite's
    1/logits_scaling, Falcon-H1's lm_head_multiplier)."""
    residual_scale: float = 1.0
    """Each block adds residual_scale * sublayer(norm(x)) (µP residual multiplier, Granite)."""
    post_norm_layers: Optional[list[int]] = None
    """0-based block indices (resolved layer order, one block per pattern symbol) computed as
    x + norm(sublayer(x)) (post-norm, OLMo2; OlmoHybrid's attention layers) instead of the pre-norm
    x + sublayer(norm(x)); None = every block is pre-norm."""
    init_std: float = 0.02
    max_seq_len: int = 4096
    """Longest sequence the model is used at (RoPE tables, FLOPs defaults)."""

    attention: AttentionConfig = field(default_factory=AttentionConfig)
    mamba2: Mamba2Config = field(default_factory=Mamba2Config)
    mamba1: Mamba1Config = field(default_factory=Mamba1Config)
    deltanet: DeltaNetConfig = field(default_factory=DeltaNetConfig)
    gdn: GatedDeltaNetConfig = field(default_factory=GatedDeltaNetConfig)
    rglru: RGLRUConfig = field(default_factory=RGLRUConfig)
    mlp: MLPConfig = field(default_factory=MLPConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    shared_attention: SharedAttentionConfig = field(default_factory=SharedAttentionConfig)
    hymba: HymbaConfig = field(default_factory=HymbaConfig)
    parallel_mixers: ParallelMixersConfig = field(default_factory=ParallelMixersConfig)
    gru: GRUConfig = field(default_factory=GRUConfig)
    rwkv7: RWKV7Config = field(default_factory=RWKV7Config)
    hyena: HyenaConfig = field(default_factory=HyenaConfig)
    based: BasedConfig = field(default_factory=BasedConfig)
    goldfinch: GoldFinchConfig = field(default_factory=GoldFinchConfig)
    dsa: DSAConfig = field(default_factory=DSAConfig)
    engram: EngramConfig = field(default_factory=EngramConfig)
    modr: MoDrConfig = field(default_factory=MoDrConfig)
    hyper_connections: HyperConnectionsConfig = field(default_factory=HyperConnectionsConfig)
    mod: MixtureOfDepthsConfig = field(default_factory=MixtureOfDepthsConfig)
    adapters: AdapterConfig = field(default_factory=AdapterConfig)


# ------------------------------------------------------------------------- parallel, train


@dataclass
class ParallelConfig:
    """Megatron-Core parallel layout (used by the megatron backend and launchers)."""

    tp: int = 1
    """Tensor-parallel size."""
    pp: int = 1
    """Pipeline-parallel size; `|` in the pattern, if present, must give exactly pp stages."""
    vpp: Optional[int] = None
    """Virtual pipeline stages per rank."""
    pp_balance: Literal["layers", "flops"] = "layers"
    """Stage cuts when the pattern has no `|`: "layers" = equal layer counts (Megatron's rule: pp must
    divide the layers); "flops" = pp x vpp contiguous stages minimising the largest stage's forward
    FLOPs (LM head on the last), as if `|` were written there (`megahybrid describe` prints that pattern)."""
    ep: int = 1
    """Expert-parallel size."""
    etp: Optional[int] = None
    """Expert tensor-parallel size; None = tp."""
    cp: int = 1
    """Context-parallel size: each sequence is split over `cp` ranks; recurrent mixers pass state
    between them (`megahybrid/parallel/`). train.seq_len must divide into the CP slots."""
    cp_layout: Literal["contiguous", "zigzag"] = "contiguous"
    """Tokens per CP rank: one contiguous piece, or pieces r and 2cp-1-r (Transformer Engine's
    load-balanced order for causal attention; `megahybrid/parallel/__init__.py` weighs the two)."""
    sequence_parallel: bool = False
    distributed_optimizer: bool = False
    recompute: Literal["none", "selective", "full"] = "none"
    """Activation recompute (Megatron backend). selective: Megatron's per-module recompute inside layers
    (`recompute_modules`); full: a layer keeps only its input and reruns its forward in backward - every
    layer, or only those whose pattern symbol is in `recompute_symbols`."""
    recompute_modules: Optional[list[str]] = None
    """selective: Megatron's module names (core_attn, mlp, moe, moe_act, shared_experts, layernorm);
    None = ["core_attn"] (Megatron's default: the attention score part)."""
    recompute_symbols: Optional[str] = None
    """full: recompute only layers with these pattern symbols, e.g. "ME" (Mamba and MoE layers, whose
    activations are largest) - None = every layer."""


@dataclass
class DataConfig:
    """Training data."""

    paths: Optional[list[str]] = None
    """Megatron indexed-dataset prefixes (path without .bin/.idx); None = embedded corpus."""
    weights: Optional[list[float]] = None
    """Blending weights, one per path."""
    tokenizer: Optional[str] = None
    """A tokenizer.json; None = train a byte-level BPE on the corpus into the run dir."""
    valid_fraction: float = 0.01
    """Fraction of documents held out for validation."""
    pack: bool = True
    """Pass document boundaries to the model so nothing crosses a document."""
    corpus_bytes: Optional[int] = None
    """Use only the first N bytes of the embedded corpus (None = all)."""


@dataclass
class TrainConfig:
    """Optimisation and run control."""

    backend: Literal["reference", "megatron"] = "reference"
    steps: int = 300
    seq_len: int = 128
    micro_batch_size: int = 8
    global_batch_size: int = 8
    """Sequences per optimizer step; a multiple of micro_batch_size * data-parallel size."""
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 20
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    decay_fraction: float = 0.2
    """WSD: the last fraction of steps decays linearly to min_lr."""
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    grad_clip: float = 1.0
    seed: int = 1234
    device: str = "auto"
    """auto = cuda if available, else cpu."""
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """auto = bfloat16 autocast on GPU, float32 on CPU."""
    log_every: int = 10
    eval_every: int = 100
    eval_batches: int = 4
    save_every: int = 100
    keep_last: int = 3
    max_bad_steps: int = 5
    """Abort after this many consecutive NaN/Inf losses."""
    threads: Optional[int] = None
    """torch CPU threads; None = torch's default."""


@dataclass
class Config:
    """Everything one run needs; saved resolved with every checkpoint."""

    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    name: str = "megahybrid"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ------------------------------------------------------------------------ dict <-> dataclass


def _strip_optional(tp):
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _coerce(path: str, value: Any, tp: Any) -> Any:
    """Check `value` against annotation `tp`; return it converted (int -> float, list -> tuple)."""
    inner, optional = _strip_optional(tp)
    if value is None:
        if optional:
            return None
        fail(path, value, "must not be null")
    origin = typing.get_origin(inner)
    if dataclasses.is_dataclass(inner):
        if not isinstance(value, dict):
            fail(path, value, f"must be a mapping of {inner.__name__} fields")
        return from_dict(inner, value, path)
    if origin is Literal:
        choices = typing.get_args(inner)
        if value not in choices:
            fail(path, value, f"must be one of {list(choices)}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            fail(path, value, "must be a list")
        args = typing.get_args(inner)
        item_tp = args[0] if args else Any
        items = [_coerce(f"{path}[{i}]", v, item_tp) for i, v in enumerate(value)]
        if origin is tuple:
            if len(args) == 2 and args[1] is not Ellipsis and len(items) != 2:
                fail(path, value, "must be a pair [low, high]")
            return tuple(items)
        return items
    if inner is bool:
        if not isinstance(value, bool):
            fail(path, value, "must be true or false")
        return value
    if inner is int:
        if isinstance(value, bool) or not isinstance(value, int):
            fail(path, value, "must be an integer")
        return value
    if inner is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                fail(path, value, "must be a number")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            fail(path, value, "must be a number")
        return float(value)
    if inner is str:
        if not isinstance(value, str):
            fail(path, value, "must be a string")
        return value
    return value


def from_dict(cls, data: dict, path: str = ""):
    """Build dataclass `cls` from a nested dict; unknown keys name their closest valid names."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        full = f"{path}.{key}" if path else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=3, cutoff=0.5)
            hint = f"did you mean {', '.join(close)}?" if close else f"valid keys: {', '.join(names)}"
            raise ConfigError(f"{full}: unknown key; {hint}")
        kwargs[key] = _coerce(full, value, hints[key])
    return cls(**kwargs)


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _parse_value(raw: str) -> Any:
    """YAML scalar parsing, plus numbers YAML 1.1 leaves as strings (e.g. 1e-4)."""
    value = yaml.safe_load(raw) if raw.strip() else ""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    return value


def apply_overrides(data: dict, overrides: typing.Iterable[str]) -> dict:
    """Apply dotted `key=value` strings (value parsed as YAML) to a nested dict."""
    data = dict(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected dotted key=value, e.g. model.hidden_size=512")
        key, raw = item.split("=", 1)
        value = _parse_value(raw)
        parts = key.strip().split(".")
        if parts[0] not in {f.name for f in dataclasses.fields(Config)}:
            parts = ["model", *parts] if parts[0] in {f.name for f in dataclasses.fields(ModelConfig)} else parts
        nested: Any = value
        for part in reversed(parts):
            nested = {part: nested}
        data = _merge(data, nested)
    return data


def load_config(source: Any = None, overrides: typing.Iterable[str] = ()) -> Config:
    """`source`: a YAML path, a preset name (optionally `name:tiny`), a pattern string, a dict,
    or None (the embedded default). `overrides`: dotted `key=value` strings."""
    from megahybrid import presets

    if source is None:
        data = presets.get("default")
    elif isinstance(source, Config):
        data = source.to_dict()
    elif isinstance(source, dict):
        data = source
    elif isinstance(source, (str, Path)) and (str(source).endswith((".yaml", ".yml")) or Path(str(source)).is_file()):
        path = Path(source)
        if not path.is_file():
            raise ConfigError(f"config {str(source)!r}: file not found; give a YAML path, a preset name or a pattern")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config {str(source)!r}: the file must hold a mapping, not {type(loaded).__name__}")
        data = loaded
        if "preset" in data:
            data = _merge(presets.get(data.pop("preset")), data)
    elif isinstance(source, str) and presets.is_preset(source):
        data = presets.get(source)
    elif isinstance(source, str):
        data = {"model": {"pattern": source}}
    else:
        raise ConfigError(f"config source {source!r}: expected a YAML path, preset name, pattern or dict")
    if "preset" in data:
        data = dict(data)
        data = _merge(presets.get(data.pop("preset")), data)
    data = apply_overrides(data, overrides)
    config = from_dict(Config, data)
    validate(config)
    return config


def validate(config: Config) -> None:
    """Cross-field checks; the layer list itself is checked by `pattern.resolve_layers`."""
    from megahybrid import pattern

    m = config.model
    for name in ("hidden_size", "vocab_size"):
        if getattr(m, name) <= 0:
            fail(f"model.{name}", getattr(m, name), "must be positive")
    num_blocks = len(pattern.resolve_layers(config))  # raises ConfigError on any bad layout or size
    post = m.post_norm_layers or []
    if any(i < 0 or i >= num_blocks for i in post) or len(set(post)) != len(post):
        fail("model.post_norm_layers", m.post_norm_layers,
             f"must list distinct block indices in [0, {num_blocks}) (one block per pattern symbol)")
    from megahybrid.blocks.hyper_connections import check_hyper_connections
    from megahybrid.blocks.mixture_of_depths import check_mixture_of_depths
    check_hyper_connections(m)
    check_mixture_of_depths(m, pattern.resolve_layers(config))
    from megahybrid.adapters import check_config as check_adapters
    check_adapters(m.adapters)
    t = config.train
    if t.global_batch_size % t.micro_batch_size:
        fail("train.global_batch_size", t.global_batch_size,
             f"must be a multiple of train.micro_batch_size={t.micro_batch_size}")
    if t.seq_len <= 0 or t.steps < 0:
        fail("train.seq_len", t.seq_len, "must be positive (and train.steps >= 0)")
    d = config.data
    if d.weights is not None and (d.paths is None or len(d.weights) != len(d.paths)):
        fail("data.weights", d.weights, "needs one weight per entry of data.paths")
    p = config.parallel
    for name in ("tp", "pp", "ep", "cp"):
        if getattr(p, name) < 1:
            fail(f"parallel.{name}", getattr(p, name), "must be >= 1")
    slots = p.cp * (2 if p.cp_layout == "zigzag" else 1)
    if t.seq_len % slots:
        fail("train.seq_len", t.seq_len,
             f"must be divisible by {slots} (parallel.cp={p.cp}, cp_layout={p.cp_layout!r}: every CP slot "
             f"holds an equal piece of the sequence); use {-(-t.seq_len // slots) * slots} or change parallel.cp")
    if p.sequence_parallel and p.tp == 1:
        fail("parallel.sequence_parallel", True, "needs parallel.tp > 1; set it to false or raise tp")
    if p.cp > 1 and m.attention.sparsity.kind != "none" and any(
            s.symbol == pattern.ATTENTION for s in pattern.resolve_layers(config)):
        # megahybrid/parallel/attention.py all-gathers keys and applies the dense causal mask.
        fail("model.attention.sparsity.kind", m.attention.sparsity.kind, f"block-sparse attention has no "
             f"context-parallel form (parallel.cp={p.cp}); set it to 'none' or parallel.cp=1")
