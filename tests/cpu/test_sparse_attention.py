"""Sparse attention in A-blocks (issue 13): DeepSeek Sparse Attention `D` (mixers/sparse_attention.py) and
the block-sparse local + global option of `*` (`attention.sparsity`, mixers/attention.py).

References written here, in float64, from the weights: the lightning indexer as loops over (query, key)
with a hand LayerNorm and complex-number RoPE; the top-k choice as a Python sort per query; the layer as
torch SDPA on hand-projected heads under a mask built from that choice (or, for block sparsity, from
loops over (query, key) blocks); the indexer KL loss as a loop over query rows. Then: top_k >= T equals
`*` attention, causality, pieces == whole with the state, packing, gradients, FLOPs, config errors, the
Megatron / CP / HF refusals and a 16-step CPU training run of "MD-MD-".
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from megahybrid.cli import main
from megahybrid.config import (AttentionConfig, AttentionSparsityConfig, ConfigError, DSAConfig, ModelConfig,
                               load_config)
from megahybrid.mixers.attention import Attention, block_sparse_attention, block_sparse_keys
from megahybrid.mixers.sparse_attention import DeepSeekSparseAttention, select_topk
from tests.helpers import assert_close
from tests.mixer_checks import check_causal, check_grads, check_packing, check_pieces

F64 = torch.float64
HIDDEN = 24


def make_config(dsa: dict | None = None, sparsity: dict | None = None, **attn) -> ModelConfig:
    attn = {"num_heads": 4, "num_kv_heads": 2, **attn}
    if sparsity is not None:
        attn["sparsity"] = AttentionSparsityConfig(kind="local_global", **sparsity)
    dsa = {"index_heads": 3, "index_head_dim": 8, "top_k": 5, **(dsa or {})}
    return ModelConfig(hidden_size=HIDDEN, init_std=0.2, norm_eps=1e-6, attention=AttentionConfig(**attn),
                       dsa=DSAConfig(**dsa))


def build(cls, config, seed: int = 0):
    """The layer in float64 with every parameter random (biases and norm weights included)."""
    torch.manual_seed(seed)
    m = cls(config).double().eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.copy_(torch.randn_like(p) * 0.3 + (1.0 if "norm.weight" in name else 0.0))
    return m


# ------------------------------------------------------------------ hand-written references


def hand_rms(x, norm):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight


def hand_rope(x, positions, theta, rot):
    """RoPE on the first `rot` channels as complex multiplication (pair (x_i, x_{i+rot/2}))."""
    if theta == 0 or rot == 0:
        return x
    half = rot // 2
    freqs = theta ** (-torch.arange(half, dtype=F64) * 2 / rot)
    phase = torch.polar(torch.ones(len(positions), half, dtype=F64), positions.to(F64)[:, None] * freqs)
    z = torch.complex(x[..., :half], x[..., half:rot]) * phase[None, :, None, :]
    return torch.cat([z.real, z.imag, x[..., rot:]], dim=-1)


def hand_heads(m, x):
    """q, gate, k, v of the main heads after QK-norm and RoPE, from the weights."""
    B, T, _ = x.shape
    H, Hkv, D = m.num_heads, m.num_kv_heads, m.head_dim
    q = F.linear(x, m.q_proj.weight, m.q_proj.bias).view(B, T, H, -1)
    gate, q = (q[..., D:] if m.output_gate else None), q[..., :D]
    k = F.linear(x, m.k_proj.weight, m.k_proj.bias).view(B, T, Hkv, D)
    v = F.linear(x, m.v_proj.weight, m.v_proj.bias).view(B, T, Hkv, D)
    if m.q_norm is not None:
        q, k = hand_rms(q, m.q_norm), hand_rms(k, m.k_norm)
    rot = int(D * m.rotary_fraction) // 2 * 2
    pos = torch.arange(T)
    return hand_rope(q, pos, m.rope_theta, rot), gate, hand_rope(k, pos, m.rope_theta, rot), v


def hand_layer(m, x, mask):
    """The layer under a boolean mask `[T, T]` or `[B, T, T]` (True = visible); core = torch SDPA."""
    B, T, _ = x.shape
    q, gate, k, v = hand_heads(m, x)
    groups = m.num_heads // m.num_kv_heads
    k, v = k.repeat_interleave(groups, dim=2), v.repeat_interleave(groups, dim=2)
    mask = mask if mask.dim() == 2 else mask[:, None]
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                       attn_mask=mask, scale=m.scale).transpose(1, 2)
    if gate is not None:
        o = o * torch.sigmoid(gate)
    return F.linear(o.reshape(B, T, -1), m.o_proj.weight, m.o_proj.bias)


def naive_index_scores(m, x):
    """I[b, t, s] = sum_h w[b,t,h] relu(q[b,t,h] . k[b,s]) by loops (NaN above the diagonal)."""
    ix = m.indexer
    B, T, _ = x.shape
    H, D, r = ix.heads, ix.head_dim, ix.rope_dim
    q = (x @ ix.linear_wq_b.weight.T).view(B, T, H, D)
    k = x @ ix.linear_wk.weight.T
    k = (k - k.mean(-1, keepdim=True)) / torch.sqrt(k.var(-1, unbiased=False, keepdim=True) + ix.k_norm.eps)
    k = k * ix.k_norm.weight + ix.k_norm.bias
    pos = torch.arange(T)
    q, k = hand_rope(q, pos, ix.rope_theta, r), hand_rope(k[:, :, None], pos, ix.rope_theta, r)[:, :, 0]
    w = (x @ ix.linear_weights_proj.weight.T) / math.sqrt(H * D)
    scores = torch.full((B, T, T), float("nan"), dtype=F64)
    for b in range(B):
        for t in range(T):
            for s in range(t + 1):
                dots = q[b, t] @ k[b, s]  # [H]
                scores[b, t, s] = (w[b, t] * (dots.clamp(min=0) if m.scoring_relu else dots)).sum()
    return scores


def naive_selection(scores, top_k):
    """Per query a Python sort of its causal keys by (score descending, position): mask `[B, T, T]`."""
    B, T, _ = scores.shape
    mask = torch.zeros(B, T, T, dtype=torch.bool)
    for b in range(B):
        for t in range(T):
            row = scores[b, t].tolist()
            for s in sorted(range(t + 1), key=lambda s: (-row[s], s))[:top_k]:
                mask[b, t, s] = True
    return mask


def naive_kl(m, x, scores, allowed):
    """loss_coeff * mean over queries of KL(p || softmax(I)) over `allowed` keys, p = normalised sum over
    heads of the main heads' softmax (loop over rows)."""
    q, _, k, _ = hand_heads(m, x)
    k = k.repeat_interleave(m.num_heads // m.num_kv_heads, dim=2)
    B, T = x.shape[:2]
    total = 0.0
    for b in range(B):
        for t in range(T):
            keys = torch.nonzero(allowed[b, t]).flatten()
            p = torch.stack([torch.softmax(m.scale * k[b, keys, h] @ q[b, t, h], 0) for h in range(m.num_heads)])
            p = p.sum(0) / p.sum()
            pred = torch.softmax(scores[b, t, keys], 0)
            total = total + (p * (p.log() - pred.log())).sum()
    return m.loss_coeff * total / (B * T)


DSA_CONFIGS = {
    "gqa": dict(),
    "gate_qknorm_bias_partial": dict(output_gate=True, qk_norm=True, bias=True, rotary_fraction=0.5),
    "mha_no_relu_no_index_rope": dict(num_kv_heads=None, dsa=dict(scoring_relu=False, index_rope_dim=0, top_k=3)),
    "index_rope_6_of_10": dict(dsa=dict(index_head_dim=10, index_rope_dim=6, index_heads=2, top_k=8)),
}


def dsa_layer(name, seed=0):
    kw = dict(DSA_CONFIGS[name])
    return build(DeepSeekSparseAttention, make_config(dsa=kw.pop("dsa", None), **kw), seed)


# --------------------------------------------------------------------------- DSA vs references


@pytest.mark.parametrize("name", list(DSA_CONFIGS))
def test_dsa_matches_masked_dense_attention_of_the_naive_selection(name):
    """(b) index scores == loops and the top-k set == a Python sort per query; (c) the layer (output and
    the gradient of x and every main-head weight) == SDPA under the mask of that naive selection."""
    m = dsa_layer(name)
    T = 13
    x = torch.randn(2, T, HIDDEN, dtype=F64, requires_grad=True)
    naive = naive_index_scores(m, x.detach())
    out, _ = m(x)
    # the module's scores and choice, at the same inputs (index_scores/select_topk as forward runs them)
    from megahybrid.mixers.sparse_attention import index_scores
    q_i, k_i, w_i = m.indexer(x.detach(), torch.arange(T))
    scores = index_scores(q_i, k_i, w_i, m.scoring_relu)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    assert_close("index scores", naive[:, causal], scores[:, causal], 1e-12)
    index, valid = select_topk(scores.masked_fill(~causal, float("-inf")), m.top_k)
    chosen = torch.zeros(2, T, T, dtype=torch.bool).scatter_(-1, index, valid)
    expected = naive_selection(naive, m.top_k)
    assert torch.equal(chosen, expected), torch.nonzero(chosen != expected)
    assert (expected.sum(-1) == torch.arange(1, T + 1).clamp(max=m.top_k)).all()  # t + 1 <= k: all taken
    ref = hand_layer(m, x, expected)
    assert_close("y", ref, out, 1e-12)
    main = {k: v for k, v in m.named_parameters() if not k.startswith("indexer.")}
    check_grads(ref, out, {"x": x, **main}, 1e-11)


@pytest.mark.parametrize("name", ["gqa", "gate_qknorm_bias_partial"])
def test_top_k_at_least_T_is_dense_attention(name):
    """(a) top_k >= T: every causal key is chosen, so D == `*` with the same weights (indexer aside)."""
    kw = dict(DSA_CONFIGS[name])
    cfg = make_config(dsa=dict(top_k=13), **kw)
    d = build(DeepSeekSparseAttention, cfg)
    a = Attention(cfg).double()
    a.load_state_dict({k: v for k, v in d.state_dict().items() if not k.startswith("indexer.")})
    x = torch.randn(2, 13, HIDDEN, dtype=F64)
    assert_close("D(top_k=T) == *", a(x)[0], d(x)[0], 1e-12)


def test_select_topk_ties_go_to_the_earlier_key():
    """Equal scores (ReLU zeros) pick the earlier keys, however many keys the row holds (pieces == whole)."""
    neg = float("-inf")
    scores = torch.tensor([[[0.0, 2.0, 0.0, 0.0, 1.0, 0.0, neg, neg]]], dtype=F64)
    index, valid = select_topk(scores, 4)
    assert index.tolist() == [[[1, 4, 0, 2]]] and valid.all()
    index, valid = select_topk(scores[..., :6], 4)
    assert index.tolist() == [[[1, 4, 0, 2]]]
    index, valid = select_topk(scores, 7)  # only 6 visible keys: the 7th pick is not valid
    assert valid.tolist() == [[[True] * 6 + [False]]]


# -------------------------------------------------------------------- the indexer's KL loss


@pytest.mark.parametrize("sparse_loss", [False, True])
def test_indexer_kl_loss_matches_a_loop_and_reaches_only_the_indexer(sparse_loss):
    """aux_loss == a per-query loop of KL(p || softmax(I)) over the causal (or the selected) keys; its
    gradient reaches only the indexer, the output's gradient never does (the indexer reads x.detach())."""
    cfg = make_config(dsa=dict(loss_coeff=0.3, sparse_loss=sparse_loss), qk_norm=True)
    m = build(DeepSeekSparseAttention, cfg).train()
    x = torch.randn(2, 11, HIDDEN, dtype=F64)
    y, _ = m(x)
    naive = naive_index_scores(m, x)
    allowed = naive_selection(naive, m.top_k) if sparse_loss else torch.ones(2, 11, 11, dtype=torch.bool).tril()
    assert_close("aux_loss", naive_kl(m, x, naive, allowed), m.aux_loss, 1e-10)
    indexer = [p for n, p in m.named_parameters() if n.startswith("indexer.")]
    main = [p for n, p in m.named_parameters() if not n.startswith("indexer.")]
    assert all(g is None for g in torch.autograd.grad(y.sum(), indexer, retain_graph=True, allow_unused=True))
    assert all(g is None for g in torch.autograd.grad(m.aux_loss, main, retain_graph=True, allow_unused=True))
    assert all(g.abs().max() > 0 for g in torch.autograd.grad(m.aux_loss, indexer))
    m.eval()
    m(x)
    assert m.aux_loss is None  # eval / no-grad forwards compute no KL


# ------------------------------------------------------------- contract: causality, state, packing


def test_dsa_causal():
    m = dsa_layer("gate_qknorm_bias_partial")
    check_causal(m, torch.randn(2, 16, HIDDEN, dtype=F64), 9)


@pytest.mark.parametrize("pieces", [[7, 1, 9], [1, 1, 15], [4, 13]])
def test_dsa_pieces_with_state_equal_whole(pieces):
    """KV cache + indexer key cache: pieces (shorter and longer than top_k) == the whole sequence."""
    m = dsa_layer("gate_qknorm_bias_partial")
    x = torch.randn(2, sum(pieces), HIDDEN, dtype=F64)
    state = check_pieces(m, x, [sum(pieces[:i]) for i in range(1, len(pieces))], rtol=1e-10)
    assert sorted(state) == ["index_k", "k", "v"] and state["index_k"].shape == (2, sum(pieces), 8)


def test_dsa_packing_and_the_training_path():
    """Packed documents == each alone (state path); the training path (no state, one pass under a document
    mask) gives the same outputs and the same indexer loss, and no query selects another document's keys."""
    m = dsa_layer("gqa")
    rows = [[5, 17, 9], [13, 9, 9]]  # different boundaries; last documents of one length (one KV-cache shape)
    x = torch.randn(2, 31, HIDDEN, dtype=F64)
    check_packing(m, x, rows, rtol=1e-12)
    seq_idx = torch.stack([torch.repeat_interleave(torch.arange(3), torch.tensor(r)) for r in rows])
    m.train()
    y_state, _ = m(x, None, seq_idx, need_state=True)  # document by document
    aux_state = m.aux_loss
    y_train, none = m(x, None, seq_idx, need_state=False)
    assert none is None
    assert_close("training path", y_state, y_train, 1e-12)
    assert_close("aux_loss, training path", aux_state, m.aux_loss, 1e-12)
    # a document's outputs do not move when another document changes
    x2 = x.clone()
    x2[0, :5] += 1.0
    assert torch.equal(m(x2, None, seq_idx, need_state=False)[0][0, 5:], y_train[0, 5:])


# ----------------------------------------------------------------------------- block sparsity


def local_global_mask(T: int, block: int, local: int, glob: int) -> torch.Tensor:
    """Loops: query i sees key j <= i iff j's block is within `local` blocks before i's, or < `glob`."""
    mask = torch.zeros(T, T, dtype=torch.bool)
    for i in range(T):
        for j in range(i + 1):
            mask[i, j] = i // block - local <= j // block or j // block < glob
    return mask


SPARSITY = [dict(block_size=4, local_blocks=1, global_blocks=1), dict(block_size=3, local_blocks=0, global_blocks=2),
            dict(block_size=5, local_blocks=2, global_blocks=0), dict(block_size=2, local_blocks=1, global_blocks=3),
            dict(block_size=1, local_blocks=3, global_blocks=1)]


@pytest.mark.parametrize("sp", SPARSITY, ids=lambda sp: "bs{block_size}_l{local_blocks}_g{global_blocks}".format(**sp))
def test_block_sparse_matches_a_loop_built_mask(sp):
    """(e) `*` with local_global sparsity (only visible blocks computed) == SDPA under the loop mask:
    output and every gradient; T = 19 is not a multiple of any block size."""
    m = build(Attention, make_config(sparsity=sp, qk_norm=True, output_gate=True, bias=True))
    x = torch.randn(2, 19, HIDDEN, dtype=F64, requires_grad=True)
    ref = hand_layer(m, x, local_global_mask(19, sp["block_size"], sp["local_blocks"], sp["global_blocks"]))
    out, _ = m(x)
    assert_close("y", ref, out, 1e-12)
    check_grads(ref, out, {"x": x, **dict(m.named_parameters())}, 1e-11)


@pytest.mark.parametrize("offset", [0, 5, 8, 11])
def test_block_gathered_core_equals_masked_core_at_offsets(offset):
    """`block_sparse_attention` with a KV cache (queries start mid-block) == SDPA with the loop mask's
    rows for those queries, GQA and a different value width."""
    torch.manual_seed(3)
    Tk, Tq = 17, 17 - offset
    q, k = torch.randn(2, Tq, 6, 5, dtype=F64), torch.randn(2, Tk, 2, 5, dtype=F64)
    v = torch.randn(2, Tk, 2, 3, dtype=F64)
    out = block_sparse_attention(q, k, v, block_size=4, local_blocks=1, global_blocks=2, scale=0.4)
    mask = local_global_mask(Tk, 4, 1, 2)[offset:]
    kr, vr = (t.repeat_interleave(3, dim=2).transpose(1, 2) for t in (k, v))
    ref = F.scaled_dot_product_attention(q.transpose(1, 2), kr, vr, attn_mask=mask, scale=0.4).transpose(1, 2)
    assert_close("o", ref, out, 1e-12)


def test_blocks_covering_everything_are_plain_causal_attention():
    cfg = make_config(sparsity=dict(block_size=4, local_blocks=5, global_blocks=0), qk_norm=True)
    sparse = build(Attention, cfg)
    dense = Attention(make_config(qk_norm=True)).double()
    dense.load_state_dict(sparse.state_dict())
    x = torch.randn(2, 23, HIDDEN, dtype=F64)
    assert_close("local_blocks >= all == causal", dense(x)[0], sparse(x)[0], 1e-12)


def test_block_sparse_state_packing_causality():
    m = build(Attention, make_config(sparsity=dict(block_size=4, local_blocks=1, global_blocks=1)))
    x = torch.randn(2, 31, HIDDEN, dtype=F64)
    check_pieces(m, x, [6, 7, 18], rtol=1e-10)  # cuts inside blocks
    check_packing(m, x, [[5, 17, 9], [13, 9, 9]], rtol=1e-12)
    check_causal(m, x, 13)


# ------------------------------------------------------------------------------------- FLOPs


def test_flops():
    """D: `*`'s projections + indexer projections + scoring over S/2 keys + the core over the keys a
    top_k window sees (top_k >= S: `*`'s core). `*` block-sparse: the mask's area (S/2 when it covers all)."""
    S = 256
    cfg = make_config(dsa=dict(top_k=S))
    d = DeepSeekSparseAttention(cfg)
    ix = d.indexer
    idx_proj = 2 * sum(p.numel() for n, p in ix.named_parameters() if n.endswith("weight") and "norm" not in n)
    scoring = 2 * 3 * (8 + 1) * S / 2
    assert DeepSeekSparseAttention.flops_per_token(cfg, S) == pytest.approx(
        Attention.flops_per_token(cfg, S) + idx_proj + scoring)
    cfg16 = make_config(dsa=dict(top_k=16))
    saved = DeepSeekSparseAttention.flops_per_token(cfg, S) - DeepSeekSparseAttention.flops_per_token(cfg16, S)
    assert saved == 4 * 4 * 6 * (S / 2 - (16 - 16 ** 2 / (2 * S)))  # keys of a 16-token window: band area / S
    counted = sum(min(16, t + 1) for t in range(S)) / S  # each query's selected keys, counted
    assert saved == pytest.approx(4 * 4 * 6 * ((S + 1) / 2 - counted), rel=0.01)
    for sp in SPARSITY:
        mask = local_global_mask(S, sp["block_size"], sp["local_blocks"], sp["global_blocks"])
        assert block_sparse_keys(S, **sp, causal=True) == pytest.approx(mask.sum().item() / S - 0.5)
    all_blocks = make_config(sparsity=dict(block_size=16, local_blocks=S, global_blocks=0))
    assert Attention.flops_per_token(all_blocks, S) == pytest.approx(Attention.flops_per_token(make_config(), S))


# ------------------------------------------------------------------ config errors, refusals


@pytest.mark.parametrize("overrides, field", [
    (dict(dsa=dict(index_heads=0)), "model.dsa.index_heads=0"),
    (dict(dsa=dict(top_k=0)), "model.dsa.top_k=0"),
    (dict(dsa=dict(index_rope_dim=5)), "model.dsa.index_rope_dim=5"),
    (dict(dsa=dict(index_rope_dim=10)), "model.dsa.index_rope_dim=10"),
    (dict(dsa=dict(loss_coeff=-1.0)), "model.dsa.loss_coeff=-1.0"),
    (dict(sparsity=dict(block_size=4)), "model.attention.sparsity.kind='local_global'"),
])
def test_dsa_check_errors_are_one_line(overrides, field):
    with pytest.raises(ConfigError) as err:
        DeepSeekSparseAttention.check(make_config(**overrides))
    msg = str(err.value)
    assert msg.startswith(field + ":") and "\n" not in msg, msg


@pytest.mark.parametrize("sp, field", [
    (dict(block_size=0), "model.attention.sparsity.block_size=0"),
    (dict(local_blocks=-1), "model.attention.sparsity.local_blocks=-1"),
    (dict(global_blocks=-2), "model.attention.sparsity.global_blocks=-2"),
])
def test_sparsity_check_errors_are_one_line(sp, field):
    with pytest.raises(ConfigError) as err:
        Attention.check(make_config(sparsity=sp))
    assert str(err.value).startswith(field + ":") and "\n" not in str(err.value)


def test_refusals_megatron_cp_parallel_branch_hf():
    """The Megatron backend builds neither D nor block sparsity, CP attention is dense, a `p` branch runs
    no per-layer forward, HF architectures have dense attention: each says so in one line."""
    from megahybrid.convert.api import to_hf
    from megahybrid.convert.base import ConversionError
    from megahybrid.megatron.transformer_config import check_megatron

    sparse = ["model.attention.sparsity.kind=local_global"]
    with pytest.raises(ConfigError, match=r"^model.pattern=.*'D'.*megatron backend does not build"):
        check_megatron(load_config("MD-"))
    with pytest.raises(ConfigError, match=r"^model.attention.sparsity.kind='local_global': the megatron backend"):
        check_megatron(load_config("M*-", sparse))
    with pytest.raises(ConfigError, match=r"^model.attention.sparsity.kind='local_global': .*context-parallel"):
        load_config("M*-", [*sparse, "parallel.cp=2"])
    with pytest.raises(ConfigError, match=r"^model.pattern: layer 1 'D' \(dsa\) has no context-parallel"):
        from megahybrid.parallel import check_context_parallel
        check_context_parallel(load_config("MD-", ["parallel.cp=2"]))
    with pytest.raises(ConfigError, match=r"^model.parallel_mixers.mixers=.*'dsa' \(D\) works in its own forward"):
        load_config("p", ["model.parallel_mixers.mixers=[dsa,mamba2]"])
    with pytest.raises(ConfigError, match="only one attention kind"):
        load_config("*D")
    with pytest.raises(ConversionError, match=r"^attention.sparsity.kind='local_global': nemotron_h has dense"):
        to_hf("unused", load_config("M*-", sparse), {}, "nemotron_h")


# ----------------------------------------------------------------------- training, describe


def test_tiny_hybrid_with_dsa_trains_and_describes(tmp_path, capsys):
    """(f) "MD-MD-" with top_k 8 < seq_len 32 trains on CPU: the loss falls by a corpus-independent margin
    and the indexer loss is logged; `describe` shows the D rows (A block, sparse branch) and their FLOPs."""
    from megahybrid.train.run import train_from_cli

    tiny = ["model.vocab_size=512", "model.hidden_size=64", "model.attention.num_heads=4",
            "model.mamba2.head_dim=16", "model.mamba2.state_size=16", "model.mamba2.chunk_size=16",
            "model.dsa.top_k=8", "model.dsa.index_heads=2", "model.dsa.index_head_dim=16"]
    args = [*tiny, "train.steps=16", "train.seq_len=32", "train.micro_batch_size=4", "train.global_batch_size=4",
            "train.warmup_steps=2", "train.log_every=1", "train.eval_every=0", "train.save_every=16",
            "train.threads=1", "data.corpus_bytes=100000"]
    assert train_from_cli("MD-MD-", str(tmp_path), args) == 0
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records]
    assert len(losses) == 16 and sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.1, losses  # corpus-independent
    assert all(r["aux_loss"] > 0 for r in records)
    capsys.readouterr()
    assert main(["describe", "--json", "MD-MD-", *tiny, "train.seq_len=32"]) == 0
    info = json.loads(capsys.readouterr().out)
    rows = [r for r in info["layers"] if r["symbol"] == "D"]
    config = load_config("MD-MD-", tiny)
    assert len(rows) == 2 and rows[0]["block"] == "A" and rows[0]["block_branch"].startswith("sparse: top-k")
    assert rows[0]["flops_per_token"] == DeepSeekSparseAttention.flops_per_token(config.model, 32)
    sparse = ["model.attention.sparsity.kind=local_global", "model.attention.sparsity.block_size=16"]
    assert main(["describe", "--json", "M*-", *sparse, "train.seq_len=256"]) == 0
    row = json.loads(capsys.readouterr().out)["layers"][1]
    dense = Attention.flops_per_token(load_config("M*-").model, 256)
    assert row["block_branch"].startswith("sparse: local + global")
    assert row["flops_per_token"] == Attention.flops_per_token(load_config("M*-", sparse).model, 256) < dense
