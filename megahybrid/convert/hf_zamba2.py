"""transformers `Zamba2ForCausalLM` (model_type `zamba2`), Glorioso et al. 2024 (arXiv 2411.15242).

`layers_block_type` lists `mamba` (also spelled `linear_attention`) and `hybrid` layers. A mamba layer
is megahybrid's `M`; a hybrid layer is `sM`: the shared transformer block on concat(hidden, embeddings),
its per-use `linear`, added to the input of the layer's own Mamba2 only (mixers/shared_attention.py
has the dataflow; the `s` options are all on: concat_embeddings, mlp, output_projection,
output_to=next_input). Attention heads are 2*hidden/num_heads wide, scaled by (head_dim/2)^-0.5
(`attention.softmax_scale`); the Mamba2 gated norm's eps is fixed at 1e-5 in HF.

On disk (`model.` prefix): mamba layer `layers.{i}.{input_layernorm, mamba.*}`; hybrid layer
`layers.{i}.{linear, mamba_decoder.{input_layernorm, mamba.*}, shared_transformer.*}` with
`shared_transformer.{input_layernorm [2H], self_attn.{q,k,v,o}_proj, self_attn.linear_{q,k,v}_adapter_list.{j}.{0,1},
pre_ff_layernorm, feed_forward.{gate_up_proj [gate|up], down_proj, gate_up_proj_adapter_list.{j}.{0,1}}}`.
Block b (of num_mem_blocks) holds the adapters of every hybrid use j with j % num_mem_blocks == b.

Sharing, as transformers 5.24 does it: with tie_word_embeddings=true the blocks are tied and
save_pretrained writes each block once, under its first hybrid layer; with tie_word_embeddings=false
nothing is tied, every hybrid layer runs its own copy of its block (and only its own adapter slot),
so megahybrid gets num_shared_blocks = the number of hybrid layers and exports a full copy per layer.
Nothing is folded. Unsupported: rms_norm_eps other than 1e-5, hidden_act other than gelu/silu, scaled
RoPE, and (megahybrid -> HF) GQA together with attention adapters: HF's k/v adapters are 2*hidden wide
and do not fit its narrower k/v projections.
"""

from __future__ import annotations

import math

import torch

from megahybrid.convert.base import ConversionError, HFArchitecture, Tensors, check_shape, register, unsupported
from megahybrid.convert.hf_common import check_hf_mamba2, mamba2_keys, rope_from_hf
from megahybrid.mixers.mlp import mlp_width
from megahybrid.pattern import resolve_layers

MAMBA_GATED_NORM_EPS = 1e-5
"""Zamba2MambaMixer's gated RMSNorm eps is hard-coded; megahybrid uses model.norm_eps for every norm."""
ACTIVATIONS = {"gelu": "geglu", "silu": "swiglu", "swish": "swiglu"}
"""HF hidden_act of the (always gated) shared MLP -> megahybrid mlp.activation."""
SHARED_OPTIONS = {"concat_embeddings": True, "mlp": True, "output_projection": True, "output_to": "next_input"}
"""The `s` options that make megahybrid's shared block Zamba2's."""
BLOCK_KEYS = {  # HF shared_transformer.* -> megahybrid mixer.* (gate_up_proj is split, see below)
    "input_layernorm.weight": "input_norm.weight", "pre_ff_layernorm.weight": "mlp_norm.weight",
    **{f"self_attn.{p}_proj.weight": f"block.{p}_proj.weight" for p in "qkvo"},
    "feed_forward.down_proj.weight": "mlp.down_proj.weight",
}


# ----------------------------------------------------------------------------------- config


def _is_hybrid(kind: str) -> bool:
    if kind not in ("hybrid", "mamba", "linear_attention"):
        raise ConversionError(f"HF config: layers_block_type entry {kind!r}; expected 'mamba' or 'hybrid'")
    return kind == "hybrid"


def config_from_hf(hf: dict) -> dict:
    hidden, heads = hf["hidden_size"], hf["num_attention_heads"]
    kinds = [_is_hybrid(k) for k in hf["layers_block_type"]]
    eps = hf.get("rms_norm_eps", 1e-5)
    if eps != MAMBA_GATED_NORM_EPS:
        raise ConversionError(f"HF config: rms_norm_eps={eps}; Zamba2's Mamba2 norm uses a fixed 1e-5 and "
                              "megahybrid one model.norm_eps, so only 1e-5 converts exactly")
    act = hf.get("hidden_act", "gelu")
    if act not in ACTIVATIONS:
        raise ConversionError(f"HF config: hidden_act={act!r}; supported: {', '.join(ACTIVATIONS)}")
    expand, mamba_heads = hf.get("mamba_expand", 2), hf.get("n_mamba_heads", 8)
    if (expand * hidden) % mamba_heads or int(expand) != expand:
        raise ConversionError(f"HF config: mamba_expand*hidden_size={expand * hidden} must be an integer "
                              f"multiple of n_mamba_heads={mamba_heads}")
    head_dim = 2 * hidden // heads
    rope_theta, _ = rope_from_hf(hf)
    tied = hf.get("tie_word_embeddings", True)
    bias = hf.get("add_bias_linear", False)
    rank = hf.get("adapter_rank", 128)
    time_step_min = hf.get("time_step_min", 0.001)
    return {
        "pattern": "".join("sM" if hybrid else "M" for hybrid in kinds),
        "hidden_size": hidden, "vocab_size": hf["vocab_size"], "norm_eps": eps, "tie_embeddings": tied,
        "max_seq_len": hf.get("max_position_embeddings", 4096),
        "attention": {
            "num_heads": heads, "num_kv_heads": hf.get("num_key_value_heads") or heads, "head_dim": head_dim,
            "rope_theta": rope_theta if hf.get("use_mem_rope", False) else 0.0,
            "softmax_scale": (head_dim / 2) ** -0.5,
        },
        "mamba2": {
            "state_size": hf.get("mamba_d_state", 64), "head_dim": int(expand * hidden) // mamba_heads,
            "num_groups": hf.get("mamba_ngroups", 1), "expand": int(expand), "conv_kernel": hf.get("mamba_d_conv", 4),
            "chunk_size": hf.get("chunk_size", 256), "dt_limit": [float(time_step_min), math.inf],
            "use_conv_bias": hf.get("use_conv_bias", True), "use_bias": bias,
            "dt_min": time_step_min, "dt_max": hf.get("time_step_max", 0.1),
            "dt_init_floor": hf.get("time_step_floor", 1e-4),
        },
        "mlp": {"ffn_hidden_size": hf.get("intermediate_size") or 4 * hidden, "activation": ACTIVATIONS[act],
                "bias": bias},
        "shared_attention": {
            "adapter_rank": rank if hf.get("use_shared_attention_adapter", False) else 0,
            # Untied, transformers 5.24 ties nothing: every hybrid layer runs its own copy (module docstring).
            "num_shared_blocks": hf.get("num_mem_blocks", 1) if tied else max(1, sum(kinds)),
            "mlp_adapter_rank": rank, **SHARED_OPTIONS,
        },
    }


def hybrid_flags(m) -> list[bool]:
    """One entry per HF layer, True for hybrid: the pattern must be M and sM units."""
    symbols = "".join(s.symbol for s in resolve_layers(m))
    flags, i = [], 0
    while i < len(symbols):
        if symbols.startswith("sM", i):
            flags.append(True)
            i += 2
        elif symbols[i] == "M":
            flags.append(False)
            i += 1
        else:
            raise unsupported("pattern", m.pattern, f"Zamba2 layers are 'M' (mamba) and 'sM' (hybrid); "
                              f"{symbols[i]!r} at layer {i} has no Zamba2 counterpart")
    return flags


def _check_expressible(m) -> None:
    """Everything Zamba2ForCausalLM hard-codes; raise naming the megahybrid field that differs."""
    plain = {"norm": "rmsnorm", "zero_centered_norm": False, "embedding_scale": 1.0, "logit_softcap": None,
             "logit_scale": 1.0, "residual_scale": 1.0, "norm_eps": MAMBA_GATED_NORM_EPS}
    for field, value in plain.items():
        if getattr(m, field) != value:
            raise unsupported(field, getattr(m, field), f"Zamba2ForCausalLM has {field}={value!r}")
    if getattr(m, "post_norm_layers", None):
        raise unsupported("post_norm_layers", m.post_norm_layers, "Zamba2 is pre-norm only")
    check_hf_mamba2(m, "Zamba2")
    mm = m.mamba2
    if getattr(mm, "d_inner", None) not in (None, mm.expand * m.hidden_size):
        raise unsupported("mamba2.d_inner", mm.d_inner, "Zamba2's d_inner is mamba_expand * hidden_size")
    if tuple(mm.dt_limit) != (mm.dt_min, math.inf):
        raise unsupported("mamba2.dt_limit", list(mm.dt_limit), f"Zamba2 clamps dt to [time_step_min, inf) = "
                          f"[{mm.dt_min}, inf); set dt_limit to that")
    a, sa = m.attention, m.shared_attention
    head_dim = a.head_dim or m.hidden_size // a.num_heads
    if head_dim * a.num_heads != 2 * m.hidden_size:
        raise unsupported("attention.head_dim", a.head_dim, f"Zamba2's heads are 2*hidden_size/num_heads = "
                          f"{2 * m.hidden_size / a.num_heads} wide")
    if not math.isclose(a.softmax_scale or head_dim ** -0.5, (head_dim / 2) ** -0.5, rel_tol=1e-9):
        raise unsupported("attention.softmax_scale", a.softmax_scale, f"Zamba2 scales scores by "
                          f"(head_dim/2)^-0.5 = {(head_dim / 2) ** -0.5}")
    for field, value in {"qk_norm": False, "output_gate": False, "bias": False, "rotary_fraction": 1.0}.items():
        if getattr(a, field) != value:
            raise unsupported(f"attention.{field}", getattr(a, field), f"Zamba2's attention has {field}={value!r}")
    if getattr(a, "out_bias", None):
        raise unsupported("attention.out_bias", a.out_bias, "Zamba2's attention has no bias")
    if sa.adapter_rank and (a.num_kv_heads or a.num_heads) != a.num_heads:
        raise unsupported("attention.num_kv_heads", a.num_kv_heads, "Zamba2's k/v adapters are 2*hidden wide, "
                          "so GQA needs shared_attention.adapter_rank=0")
    for field, value in SHARED_OPTIONS.items():
        if getattr(sa, field) != value:
            raise unsupported(f"shared_attention.{field}", getattr(sa, field), f"Zamba2's shared block has "
                              f"{field}={value!r}")
    if sa.mlp_adapter_rank < 1 or (sa.adapter_rank and sa.adapter_rank != sa.mlp_adapter_rank):
        raise unsupported("shared_attention.mlp_adapter_rank", sa.mlp_adapter_rank, "Zamba2 always has MLP "
                          "adapters, of the same rank as the attention adapters (adapter_rank 0 or equal)")
    if m.mlp.activation not in ("geglu", "swiglu"):
        raise unsupported("mlp.activation", m.mlp.activation, "Zamba2's MLP is gated: geglu or swiglu")
    if m.mlp.bias != mm.use_bias:
        raise unsupported("mlp.bias", m.mlp.bias, f"Zamba2's add_bias_linear sets both mlp.bias and "
                          f"mamba2.use_bias (={mm.use_bias})")


def config_to_hf(m) -> dict:
    flags = hybrid_flags(m)
    _check_expressible(m)
    a, sa, mm = m.attention, m.shared_attention, m.mamba2
    d_inner = mm.expand * m.hidden_size
    return {
        "model_type": "zamba2", "architectures": ["Zamba2ForCausalLM"],
        "hidden_size": m.hidden_size, "vocab_size": m.vocab_size, "num_hidden_layers": len(flags),
        "layers_block_type": ["hybrid" if h else "mamba" for h in flags],
        "rms_norm_eps": m.norm_eps, "tie_word_embeddings": m.tie_embeddings,
        "max_position_embeddings": m.max_seq_len,
        "num_attention_heads": a.num_heads, "num_key_value_heads": a.num_kv_heads or a.num_heads,
        "use_mem_rope": a.rope_theta > 0,
        "rope_parameters": {"rope_type": "default", "rope_theta": a.rope_theta if a.rope_theta > 0 else 10000.0},
        "intermediate_size": mlp_width(m), "hidden_act": "gelu" if m.mlp.activation == "geglu" else "silu",
        "add_bias_linear": mm.use_bias,
        "num_mem_blocks": sa.num_shared_blocks, "use_shared_attention_adapter": sa.adapter_rank > 0,
        "adapter_rank": sa.mlp_adapter_rank,
        "mamba_d_state": mm.state_size, "mamba_d_conv": mm.conv_kernel, "mamba_expand": mm.expand,
        "mamba_ngroups": mm.num_groups, "n_mamba_heads": d_inner // mm.head_dim, "chunk_size": mm.chunk_size,
        "use_conv_bias": mm.use_conv_bias, "time_step_min": mm.dt_min, "time_step_max": mm.dt_max,
        "time_step_floor": mm.dt_init_floor, "use_mem_eff_path": False, "use_long_context": False,
    }


# ------------------------------------------------------------------------------------ state


def layer_map(m) -> list[tuple[int, int, int | None]]:
    """(HF layer, megahybrid index of its Mamba2 block, hybrid use j or None) for every HF layer; the
    use's `s` block sits just before its Mamba2 block."""
    out, k, j = [], 0, 0
    for i, hybrid in enumerate(hybrid_flags(m)):
        if hybrid:
            out.append((i, k + 1, j))
            k, j = k + 2, j + 1
        else:
            out.append((i, k, None))
            k += 1
    return out


def _block_keys(m) -> dict[str, str]:
    keys = dict(BLOCK_KEYS)
    if m.mlp.bias:
        keys["feed_forward.down_proj.bias"] = "mlp.down_proj.bias"
    return keys


def _adapter_keys(m, j: int) -> dict[str, str]:
    """HF shared_transformer.* adapter slot j -> megahybrid mixer.* adapter."""
    pairs = {f"feed_forward.gate_up_proj_adapter_list.{j}.{n}.weight": f"mlp_adapter.{n}.weight" for n in (0, 1)}
    if m.shared_attention.adapter_rank:
        pairs.update({f"self_attn.linear_{p}_adapter_list.{j}.{n}.weight": f"{p}_adapter.{n}.weight"
                      for p in "qkv" for n in (0, 1)})
    return pairs


def _gate_up_names(m) -> list[str]:
    return ["weight", "bias"] if m.mlp.bias else ["weight"]


def _mamba_prefixes(i: int, hybrid: bool) -> tuple[str, str]:
    """(HF prefix of the Mamba2 mixer, HF key of its pre-norm) of HF layer i."""
    base = f"model.layers.{i}." + ("mamba_decoder." if hybrid else "")
    return base + "mamba.", base + "input_layernorm.weight"


def state_from_hf(hf: Tensors, m) -> dict:
    out = {"embedding.weight": hf.pop("model.embed_tokens.weight"),
           "final_norm.weight": hf.pop("model.final_layernorm.weight")}
    if m.tie_embeddings:
        hf.get("lm_head.weight")  # a tied copy, if the writer kept one
    else:
        out["lm_head.weight"] = hf.pop("lm_head.weight")
    layers = layer_map(m)
    hybrid_layers = [i for i, _, j in layers if j is not None]
    # Every shared_transformer tensor, popped up front: several uses read one block's copy.
    shared = {key: hf.pop(key) for key in list(hf.tensors) if ".shared_transformer." in key}
    used: set = set()
    for i, k, j in layers:
        mamba, norm = _mamba_prefixes(i, j is not None)
        out[f"layers.{k}.norm.weight"] = hf.pop(norm)
        for key in mamba2_keys(m.mamba2):
            out[f"layers.{k}.mixer.{key}"] = hf.pop(mamba + key)
        if j is not None:
            s = f"layers.{k - 1}.mixer."
            out[s + "output_proj.weight"] = hf.pop(f"model.layers.{i}.linear.weight")
            out.update(_use_from_hf(shared, used, m, s, i, j, hybrid_layers))
    # Untied, each layer's copy also holds the adapter slots of its block's other uses, which HF never runs.
    unused = sorted(k for k in set(shared) - used if "_adapter_list." not in k)
    if unused:
        raise ConversionError(f"{hf.where}: {len(unused)} shared_transformer tensor(s) not used by the "
                              f"conversion: {', '.join(unused[:8])}")
    hf.done()
    return out


def _use_from_hf(shared: dict, used: set, m, s: str, i: int, j: int, hybrid_layers: list[int]) -> dict:
    """Hybrid use j (HF layer i): the block it runs and its adapter slot. HF reads layer i's copy; a tied
    checkpoint stores a block only under its owner (first) layer, so fall back to that."""
    owner = hybrid_layers[j % m.shared_attention.num_shared_blocks]

    def read(name: str) -> torch.Tensor:
        for layer in (i, owner):
            key = f"model.layers.{layer}.shared_transformer.{name}"
            if key in shared:
                if layer != owner and f"model.layers.{owner}.shared_transformer.{name}" in shared:
                    _check_same_copy(shared, key, f"model.layers.{owner}.shared_transformer.{name}")
                used.add(key)
                return shared[key]
        raise ConversionError(f"HF tensors: 'model.layers.{i}.shared_transformer.{name}' is missing (also under "
                              f"its block's first layer {owner})")

    out = {s + ours: read(theirs) for theirs, ours in {**_block_keys(m), **_adapter_keys(m, j)}.items()}
    width = out[s + "mlp.down_proj.weight"].shape[1]
    for name in _gate_up_names(m):
        gate_up = read(f"feed_forward.gate_up_proj.{name}")
        check_shape(f"feed_forward.gate_up_proj.{name}", gate_up, (2 * width, *gate_up.shape[1:]))
        out[s + f"mlp.gate_proj.{name}"], out[s + f"mlp.up_proj.{name}"] = gate_up.chunk(2, dim=0)
    return out


def _check_same_copy(shared: dict, key: str, owner_key: str) -> None:
    if not torch.equal(shared[key], shared[owner_key]):
        raise ConversionError(f"HF tensors: {key!r} differs from {owner_key!r}, its shared block's first copy; "
                              "megahybrid shares one block (tie_word_embeddings=false keeps every copy)")


def state_to_hf(ref: Tensors, m) -> dict:
    out = {"model.embed_tokens.weight": ref.pop("embedding.weight"),
           "model.final_layernorm.weight": ref.pop("final_norm.weight")}
    if not m.tie_embeddings:
        out["lm_head.weight"] = ref.pop("lm_head.weight")
    layers = layer_map(m)
    blocks = m.shared_attention.num_shared_blocks
    uses = {j: (i, k - 1) for i, k, j in layers if j is not None}
    per_use = {j: _use_to_hf(ref, m, f"layers.{s}.mixer.", j) for j, (_, s) in uses.items()}
    _check_uses_share_blocks(per_use, blocks)
    for i, k, j in layers:
        mamba, norm = _mamba_prefixes(i, j is not None)
        out[norm] = ref.pop(f"layers.{k}.norm.weight")
        for key in mamba2_keys(m.mamba2):
            out[mamba + key] = ref.pop(f"layers.{k}.mixer.{key}")
        if j is None:
            continue
        out[f"model.layers.{i}.linear.weight"] = per_use[j]["linear"]
        # What save_pretrained writes: tied, each block once under its first layer; untied, every copy.
        if m.tie_embeddings and j >= blocks:
            continue
        prefix = f"model.layers.{i}.shared_transformer."
        block = j % blocks
        out.update({prefix + key: t for key, t in per_use[block]["block"].items()})
        for slot in range(block, len(uses), blocks):  # the adapter slots HF builds in this block
            out.update({prefix + key: t for key, t in per_use[slot]["adapters"].items()})
    ref.done()
    return out


def _use_to_hf(ref: Tensors, m, s: str, j: int) -> dict:
    """Use j's tensors under HF's shared_transformer names: {"block", "adapters" (slot j), "linear"}."""
    block = {theirs: ref.pop(s + ours) for theirs, ours in _block_keys(m).items()}
    for name in _gate_up_names(m):
        block[f"feed_forward.gate_up_proj.{name}"] = torch.cat(
            [ref.pop(s + f"mlp.gate_proj.{name}"), ref.pop(s + f"mlp.up_proj.{name}")], dim=0)
    adapters = {theirs: ref.pop(s + ours) for theirs, ours in _adapter_keys(m, j).items()}
    return {"block": block, "adapters": adapters, "linear": ref.pop(s + "output_proj.weight")}


def _check_uses_share_blocks(per_use: dict, blocks: int) -> None:
    """Every use of a block must carry the same block weights (ReferenceLM lists them under each use)."""
    for j, use in per_use.items():
        first = per_use[j % blocks]["block"]
        for key, t in use["block"].items():
            if not torch.equal(t, first[key]):
                raise ConversionError(f"megahybrid state: shared block {j % blocks}'s {key!r} differs between its "
                                      f"uses {j % blocks} and {j}; the checkpoint is not a shared-block model")


register(HFArchitecture(
    "zamba2", "transformers:Zamba2ForCausalLM", config_from_hf, config_to_hf, state_from_hf, state_to_hf,
    note="hybrid layer = 'sM' (shared block on concat(hidden, embeddings) + MLP + per-use linear, fed into "
         "the Mamba2 input); untied embeddings: transformers 5.24 does not tie the shared blocks, so each "
         "hybrid layer gets its own block (num_shared_blocks = hybrid layers); rms_norm_eps must be 1e-5"))
