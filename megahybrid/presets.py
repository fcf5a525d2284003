"""Named architectures, as code: each family gives a full size (the published layout) and a tiny
size (same layout, small widths, for tests and CPU runs). `name` is the full size, `name:tiny` the
tiny one. `configs/models/<name>.yaml` mirrors each full preset (tests check they agree).

Sizes cite their source; where a published model uses a feature the reference backend does not
have yet, the docstring says what was approximated.
"""

from __future__ import annotations

import copy
from typing import Callable

from megahybrid.config import ConfigError

PRESETS: dict[str, Callable[[], dict]] = {}
TINY: dict[str, dict] = {}


def preset(name: str, tiny: dict):
    """Register `fn` (returning the full config dict) under `name`, with `tiny` model overrides."""

    def wrap(fn):
        PRESETS[name] = fn
        TINY[name] = tiny
        return fn

    return wrap


_TINY_COMMON = {"hidden_size": 64, "vocab_size": 256, "max_seq_len": 256,
                "attention": {"num_heads": 4, "num_kv_heads": 2},
                "mamba2": {"state_size": 16, "head_dim": 16, "num_groups": 1, "chunk_size": 16},
                "mamba1": {"state_size": 8, "dt_rank": 8},
                "deltanet": {"num_heads": 4, "chunk_size": 16},
                "gdn": {"num_qk_heads": 2, "num_v_heads": 4, "qk_head_dim": 16, "v_head_dim": 16, "chunk_size": 16},
                "rglru": {"num_heads": 4},
                "mlp": {"ffn_hidden_size": 128},
                "moe": {"num_experts": 4, "top_k": 2, "ffn_hidden_size": 64}}


def _tiny(pattern: str | None = None, **extra) -> dict:
    out = copy.deepcopy(_TINY_COMMON)
    if pattern is not None:
        out["pattern"] = pattern
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = {**out[key], **value}
        else:
            out[key] = value
    return out


def _model(**fields) -> dict:
    return {"model": fields}


# ----------------------------------------------------------------------------- the default

@preset("default", tiny=_tiny("MG*E"))
def default() -> dict:
    """The embedded default `megahybrid train` runs on CPU: Mamba2 + GDN + attention + MoE, small
    enough to show the loss falling within a minute on 2 cores."""
    return {
        "model": {
            "pattern": "MG*E MG*-", "hidden_size": 128, "vocab_size": 4096, "max_seq_len": 512,
            "attention": {"num_heads": 4, "num_kv_heads": 2},
            "mamba2": {"state_size": 16, "head_dim": 32, "chunk_size": 32},
            "gdn": {"num_qk_heads": 2, "num_v_heads": 4, "qk_head_dim": 32, "v_head_dim": 32, "chunk_size": 32},
            "mlp": {"ffn_hidden_size": 384},
            "moe": {"num_experts": 4, "top_k": 2, "ffn_hidden_size": 192},
        },
        "train": {"steps": 300, "seq_len": 128, "micro_batch_size": 8, "global_batch_size": 8,
                  "lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 20},
    }


# ------------------------------------------------------------------------ baselines and pure

@preset("transformer", tiny=_tiny("(*-)x2"))
def transformer() -> dict:
    """Llama-style baseline (Touvron et al. 2023, arXiv 2302.13971), ~1B: 16 x (attention, SwiGLU)."""
    return _model(pattern="(*-)x16", hidden_size=2048, vocab_size=32000,
                  attention={"num_heads": 16, "num_kv_heads": 8, "rope_theta": 500000.0},
                  mlp={"ffn_hidden_size": 5632})


@preset("mamba2", tiny=_tiny("MMM"))
def mamba2() -> dict:
    """Pure Mamba2-1.3B (Dao & Gu 2024, arXiv 2405.21060): 48 Mamba2 layers, no MLP, d_state 128."""
    return _model(pattern="Mx48", hidden_size=2048, vocab_size=50288, tie_embeddings=True,
                  mamba2={"state_size": 128, "head_dim": 64, "expand": 2})


@preset("gdn", tiny=_tiny("(G-)x2"))
def gdn() -> dict:
    """Pure Gated DeltaNet 1.3B (Yang et al. 2024, arXiv 2412.06464): 24 x (GDN, SwiGLU)."""
    return _model(pattern="(G-)x24", hidden_size=2048, vocab_size=32000,
                  gdn={"num_qk_heads": 16, "num_v_heads": 16, "qk_head_dim": 128, "v_head_dim": 128},
                  mlp={"ffn_hidden_size": 5632})


@preset("rwkv7", tiny=_tiny("(kc)x2", norm="layernorm", rwkv7={"head_dim": 16}))
def rwkv7() -> dict:
    """RWKV-7 "Goose" 1.5B layout (Peng et al. 2025, arXiv 2503.14456): 24 x (time mixing `k` with the
    value residual, channel mixing `c`: token-shift squared-ReLU FFN of width 4 x hidden), width 2048, head
    size 64, LayerNorm, vocab 65536; FLA's RWKV7 layers (mixers/rwkv7.py, mixers/rwkv7_ffn.py). Approximated:
    no extra LayerNorm after the embedding (ln0); LoRA ranks are FLA's layer defaults."""
    return _model(pattern="(kc)x24", hidden_size=2048, vocab_size=65536, norm="layernorm",
                  rwkv7={"head_dim": 64})


@preset("mingru", tiny=_tiny("(u-)x2", gru={"expand": 1.5, "conv_kernel": 3}))
def mingru() -> dict:
    """minGRU language model (Feng et al. 2024, arXiv 2410.01201) in lucidrains' minLM block layout
    (minGRU with expansion 1.5 after a width-3 causal conv, then an MLP), at Hawk's size (24 blocks,
    width 2048). No published minGRU LM has this size: a baseline for comparisons, not a model replica."""
    return _model(pattern="(u-)x24", hidden_size=2048, vocab_size=32000,
                  gru={"expand": 1.5, "conv_kernel": 3}, mlp={"ffn_hidden_size": 5632})


# ----------------------------------------------------------------------------------- hybrids

@preset("jamba", tiny=_tiny("m-mE*-mE"))
def jamba() -> dict:
    """Jamba (Lieber et al. 2024, arXiv 2403.19887): blocks of 8 layers, attention 1 : 7 Mamba(1)
    (attn_layer_offset 4, period 8), MoE every other layer (offset 1, period 2), 16 experts top-2;
    4 blocks = 32 layers, hidden 4096 (Jamba-v0.1, 52B total / 12B active)."""
    block = "m-mEm-mE*-mEm-mE"
    return _model(pattern=f"({block})x4", hidden_size=4096, vocab_size=65536,
                  attention={"num_heads": 32, "num_kv_heads": 8, "rope_theta": 0.0},
                  mamba1={"state_size": 16, "expand": 2, "conv_kernel": 4, "dt_rank": 256, "inner_layernorms": True},
                  mlp={"ffn_hidden_size": 14336}, moe={"num_experts": 16, "top_k": 2, "ffn_hidden_size": 14336})


@preset("nemotron_h", tiny=_tiny("M-M*-M-", mlp={"activation": "relu2", "ffn_hidden_size": 128}))
def nemotron_h() -> dict:
    """Nemotron-H-8B (NVIDIA 2025, arXiv 2504.03624): the 52-layer layout of Megatron-LM's
    examples/post_training/modelopt/conf/nvidia/Nemotron-H-8B-Base-8K.sh, squared-ReLU MLPs."""
    return _model(pattern="M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M-",
                  hidden_size=4096, vocab_size=131072,
                  attention={"num_heads": 32, "num_kv_heads": 8, "rope_theta": 500000.0, "rotary_fraction": 0.5},
                  mamba2={"state_size": 128, "head_dim": 64, "num_groups": 8, "expand": 2},
                  mlp={"ffn_hidden_size": 21504, "activation": "relu2"})


@preset("zamba2", tiny=_tiny("MMsMMs", shared_attention={"adapter_rank": 4, "num_shared_blocks": 2}))
def zamba2() -> dict:
    """Zamba2-1.2B-like (Glorioso et al. 2024, arXiv 2411.15242): a Mamba2 backbone with a shared
    attention block every 6 layers, per-use LoRA adapters. Zamba2's shared block also holds an MLP and
    reads concat(hidden, embeddings); here the shared block is attention only (see shared_attention.py)."""
    return _model(pattern="(MMMMMs)x6 MM", hidden_size=2048, vocab_size=32000,
                  attention={"num_heads": 32, "num_kv_heads": 32},
                  mamba2={"state_size": 128, "head_dim": 64, "expand": 2},
                  shared_attention={"adapter_rank": 128, "num_shared_blocks": 2})


@preset("hymba", tiny=_tiny("(h-)x2", hymba={"attention_window": 8}))
def hymba() -> dict:
    """Hymba-1.5B (Dong et al. 2024, arXiv 2411.13676): 32 layers of parallel attention + SSM heads,
    each followed by an MLP; sliding-window attention heads (Hymba keeps 3 global layers: not modelled)."""
    return _model(pattern="(h-)x32", hidden_size=1600, vocab_size=32001,
                  attention={"num_heads": 25, "num_kv_heads": 5},
                  mamba2={"state_size": 16, "head_dim": 64, "expand": 2},
                  hymba={"attention_window": 1024}, mlp={"ffn_hidden_size": 5504})


@preset("samba", tiny=_tiny("m-w-", attention={"num_heads": 4, "num_kv_heads": 2, "window": 8}))
def samba() -> dict:
    """Samba-1.7B (Ren et al. 2024, arXiv 2406.07522): 12 x (Mamba, MLP, sliding-window attention, MLP),
    window 2048."""
    return _model(pattern="(m-w-)x12", hidden_size=2048, vocab_size=32000,
                  attention={"num_heads": 32, "num_kv_heads": 4, "window": 2048},
                  mamba1={"state_size": 16, "expand": 2}, mlp={"ffn_hidden_size": 8192})


@preset("griffin", tiny=_tiny("r-r-w-", attention={"num_heads": 4, "num_kv_heads": 1, "window": 8}))
def griffin() -> dict:
    """Griffin (De et al. 2024, arXiv 2402.19427): two recurrent (RG-LRU) blocks then one local
    attention block (window 1024), each with a gated MLP; ~1B."""
    return _model(pattern="(r-r-w-)x8", hidden_size=2048, vocab_size=32000,
                  attention={"num_heads": 16, "num_kv_heads": 1, "window": 1024},
                  rglru={"width": 2816, "num_heads": 16}, mlp={"ffn_hidden_size": 6144, "activation": "geglu"})


@preset("hawk", tiny=_tiny("(r-)x2"))
def hawk() -> dict:
    """Hawk (De et al. 2024, arXiv 2402.19427): recurrent blocks only, ~1B."""
    return _model(pattern="(r-)x24", hidden_size=2048, vocab_size=32000,
                  rglru={"width": 2816, "num_heads": 16}, mlp={"ffn_hidden_size": 6144, "activation": "geglu"})


@preset("recurrentgemma", tiny=_tiny("r-r-w-", zero_centered_norm=True, embedding_scale=8.0, logit_softcap=30.0,
                                     tie_embeddings=True, attention={"num_heads": 4, "num_kv_heads": 1, "window": 8},
                                     mlp={"activation": "geglu", "ffn_hidden_size": 128}))
def recurrentgemma() -> dict:
    """RecurrentGemma-2B (Botev et al. 2024, arXiv 2404.07839): 26 layers cycling (recurrent, recurrent,
    local attention 2048), width 2560, embeddings x sqrt(2560), logit soft-cap 30, (1 + w) RMSNorm."""
    return _model(pattern="(r-r-w-)x8 r-r-", hidden_size=2560, vocab_size=256000, tie_embeddings=True,
                  zero_centered_norm=True, embedding_scale=2560 ** 0.5, logit_softcap=30.0, norm_eps=1e-6,
                  attention={"num_heads": 10, "num_kv_heads": 1, "window": 2048, "rotary_fraction": 0.5},
                  rglru={"width": 2560, "num_heads": 10},
                  mlp={"ffn_hidden_size": 7680, "activation": "geglu"})


@preset("qwen3_next", tiny=_tiny("GEGE*E", zero_centered_norm=True,
                                 attention={"num_heads": 4, "num_kv_heads": 2, "output_gate": True, "qk_norm": True},
                                 moe={"num_experts": 4, "top_k": 2, "ffn_hidden_size": 32, "num_shared_experts": 1}))
def qwen3_next() -> dict:
    """Qwen3-Next-80B-A3B (Qwen team 2025): 48 layers, 3 GDN : 1 gated attention, MoE after every mixer
    (512 experts, top-10, one shared expert), zero-centred RMSNorm, partial rotary 0.25."""
    return _model(pattern="(GEGEGE*E)x12", hidden_size=2048, vocab_size=151936, zero_centered_norm=True,
                  norm_eps=1e-6,
                  attention={"num_heads": 16, "num_kv_heads": 2, "head_dim": 256, "output_gate": True,
                             "qk_norm": True, "rotary_fraction": 0.25, "rope_theta": 10000000.0},
                  gdn={"num_qk_heads": 16, "num_v_heads": 32, "qk_head_dim": 128, "v_head_dim": 128},
                  moe={"num_experts": 512, "top_k": 10, "ffn_hidden_size": 512, "num_shared_experts": 1})


# ------------------------------------------------------------- long convolutions, Taylor attention

_HYENA_TINY = {"filter_order": 16, "emb_dim": 5, "filter_len": 64}


@preset("hyena", tiny=_tiny("(y-)x2", hyena=_HYENA_TINY))
def hyena() -> dict:
    """Hyena-153M (Poli et al. 2023, arXiv 2302.10866), safari's configs/experiment/pile/hyena.yaml:
    18 x (order-2 Hyena, MLP 2x), width 864, l_max 2048, LayerNorm, tied embeddings, GPT-2 vocab padded
    to a multiple of 8. safari's MLP uses tanh-approximated GELU; here exact GELU."""
    return _model(pattern="(y-)x18", hidden_size=864, vocab_size=50264, max_seq_len=2048, norm="layernorm",
                  tie_embeddings=True, hyena={"order": 2, "filter_order": 64, "emb_dim": 33, "sin_freq": 14.0},
                  mlp={"ffn_hidden_size": 1728, "activation": "gelu"})


@preset("striped_hyena", tiny=_tiny("y-*-", hyena=_HYENA_TINY))
def striped_hyena() -> dict:
    """StripedHyena-7B (Together 2023, togethercomputer/stripedhyena configs/7b-sh-32k-v0.1.yml): 32 blocks
    alternating Hyena (even) and GQA attention (odd; 32 heads, 8 kv groups, RoPE 500000), each block with a
    SwiGLU MLP of 14336, 32k context. StripedHyena's Hyena layers use a modal (pole/residue) long filter
    with state size 2; here they use Hyena's implicit FFN filter (mixers/hyena.py says why)."""
    return _model(pattern="(y-*-)x16", hidden_size=4096, vocab_size=32000, max_seq_len=32768,
                  attention={"num_heads": 32, "num_kv_heads": 8, "rope_theta": 500000.0},
                  mlp={"ffn_hidden_size": 14336, "activation": "swiglu"})


@preset("based", tiny=_tiny("b-w-", attention={"num_heads": 4, "num_kv_heads": 4, "window": 8},
                            based={"num_heads": 4, "feature_dim": 8, "chunk_size": 16}))
def based() -> dict:
    """Based-360M (Arora et al. 2024, arXiv 2402.18668), HazyResearch/based
    configs/experiment/reference/based-360m.yaml: 27 mixers, width 1024, sliding-window attention (window
    256, 16 heads) at mixers 2, 7, 12, 17, 22, Taylor linear attention (16 heads, feature dim 16) at the
    others, each followed by a SwiGLU MLP of 2048; GPT-NeoX vocab. The paper's model puts gated short-conv
    (BaseConv) layers in 20 of those 22 slots; megahybrid has no BaseConv, so they are Based layers here."""
    return _model(pattern="(b-b-w-b-b-)x5 b-b-", hidden_size=1024, vocab_size=50280, max_seq_len=2048,
                  attention={"num_heads": 16, "num_kv_heads": 16, "window": 256},
                  based={"num_heads": 16, "feature_dim": 16},
                  mlp={"ffn_hidden_size": 2048, "activation": "swiglu"})


# ---------------------------------------------------------------------------- GoldFinch

@preset("goldfinch", tiny=_tiny("k-k-f-", norm="layernorm", rwkv7={"head_dim": 16, "value_residual": False},
                                goldfinch={"compressed_dim": 4},
                                mlp={"activation": "relu2", "ffn_hidden_size": 256}))
def goldfinch() -> dict:
    """GoldFinch (Goldstein et al. 2024, arXiv 2407.12077): recurrent layers for the first 2/3 of the
    depth, then full-attention GOLD layers (`f`) whose keys and values all come from one compressed cache
    (hidden/16 per token, plus the token embedding: TokenCat), each layer followed by an MLP; 24 layers,
    width 2048. Approximated: the recurrent layers are RWKV-7 (`k`, without RWKV-7's value residual, which
    Finch has not) rather than the paper's Finch-C2 (RWKV-6 based; megahybrid has no RWKV-6), channel
    mixing is a squared-ReLU MLP without the token shift, and the GOLD decompression is one linear map per
    layer (mixers/goldfinch.py)."""
    return _model(pattern="(k-)x16 (f-)x8", hidden_size=2048, vocab_size=65536, norm="layernorm",
                  attention={"num_heads": 32}, rwkv7={"head_dim": 64, "value_residual": False},
                  goldfinch={"token_cat": True},
                  mlp={"ffn_hidden_size": 8192, "activation": "relu2"})


# ------------------------------------------------------------ Edifice `Hybrid` defaults

def _edifice(backbone: str, **sections) -> dict:
    """Edifice's `Edifice.SSM.Hybrid` defaults (blasphemetheus/edifice, lib/edifice/ssm/hybrid.ex): 6 layers,
    every 3rd sliding-window attention (window 60, 4 heads x 64, QK-norm), pre-LayerNorm blocks, a 4x GELU
    FFN in the attention blocks only, hidden 256. Edifice's Hybrid reads continuous frames and adds
    sinusoidal positions; here it is an LM (vocab 32000) with RoPE in the attention, an RMSNorm with a
    weight for Edifice's parameter-free QK LayerNorm, and no dropout (Edifice: 0.1)."""
    return _model(backbone=backbone, num_layers=6, attention_every=3, attention_symbol="swa",
                  mlp_after_attention="mlp", hidden_size=256, vocab_size=32000, norm="layernorm",
                  attention={"num_heads": 4, "head_dim": 64, "window": 60, "qk_norm": True},
                  mlp={"ffn_hidden_size": 1024, "activation": "gelu"}, **sections)


_EDIFICE_TINY = {"hidden_size": 64, "vocab_size": 256, "max_seq_len": 256,
                 "attention": {"num_heads": 4, "head_dim": 16, "window": 8}, "mlp": {"ffn_hidden_size": 256}}


@preset("edifice_gru", tiny=_EDIFICE_TINY)
def edifice_gru() -> dict:
    """Edifice Hybrid over a GRU backbone (`backbone: :gru`); Edifice's is a classic GRU (Axon.gru), here minGRU."""
    return _edifice("gru")


@preset("edifice_rwkv", tiny={**_EDIFICE_TINY, "rwkv7": {"head_dim": 16}})
def edifice_rwkv() -> dict:
    """Edifice Hybrid over an RWKV backbone (`backbone: :rwkv`), here RWKV-7 time mixing with 4 heads of 64,
    without RWKV-7's value residual (Edifice's RWKV block has none)."""
    return _edifice("rwkv7", rwkv7={"head_dim": 64, "value_residual": False})


@preset("edifice_deltanet", tiny=_EDIFICE_TINY)
def edifice_deltanet() -> dict:
    """Edifice Hybrid over a DeltaNet backbone (`backbone: :delta_net`), 4 heads."""
    return _edifice("deltanet", deltanet={"num_heads": 4})


@preset("edifice_gdn", tiny={**_EDIFICE_TINY, "gdn": {"qk_head_dim": 16, "v_head_dim": 16}})
def edifice_gdn() -> dict:
    """Edifice Hybrid over a Gated DeltaNet backbone (`backbone: :gated_delta_net`), 4 heads of 64."""
    return _edifice("gdn", gdn={"num_qk_heads": 4, "num_v_heads": 4, "qk_head_dim": 64, "v_head_dim": 64})


@preset("edifice_griffin", tiny=_EDIFICE_TINY)
def edifice_griffin() -> dict:
    """Edifice Hybrid over Griffin's RG-LRU block (`backbone: :griffin_lru`), width 256, 4 gate heads."""
    return _edifice("rglru", rglru={"num_heads": 4})


@preset("edifice_mamba", tiny=_EDIFICE_TINY)
def edifice_mamba() -> dict:
    """Edifice Hybrid's default Mamba backbone (`backbone: :mamba`): state 16, expand 2, conv 4 (Mamba1 here)."""
    return _edifice("mamba1", mamba1={"state_size": 16, "expand": 2, "conv_kernel": 4})


# --------------------------------------------------------------- exp7 DeltaNet hybrid layouts

def _exp7(num_layers: int, attention_layers: list[int] | None = None, attention_every: int | None = None,
          hidden: int = 768, vocab: int = 49152) -> dict:
    """exp7 hybrid experiments: a DeltaNet backbone with attention at chosen mixer indices, SwiGLU
    MLP (4x hidden) after every mixer, 12 heads, untied embeddings, vocab 49152."""
    return _model(backbone="deltanet", num_layers=num_layers, attention_layers=attention_layers,
                  attention_every=attention_every, mlp_after_mixer="mlp", hidden_size=hidden, vocab_size=vocab,
                  attention={"num_heads": 12}, deltanet={"num_heads": 12, "output_gate": False},
                  mlp={"ffn_hidden_size": 4 * hidden})


_EXP7_TINY = dict(hidden_size=64, vocab_size=256, num_layers=8, attention={"num_heads": 4},
                  deltanet={"num_heads": 4, "chunk_size": 16, "output_gate": False}, mlp={"ffn_hidden_size": 256})


@preset("exp7_alternating", tiny={**_EXP7_TINY, "attention_every": 2})
def exp7_alternating() -> dict:
    """exp7: DeltaNet and attention alternating over 8 mixers (attention at 1, 3, 5, 7)."""
    return _exp7(8, attention_every=2)


@preset("exp7_sparse", tiny={**_EXP7_TINY, "attention_layers": [3, 7]})
def exp7_sparse() -> dict:
    """exp7: sparse attention, at mixers 3 and 7 of 8."""
    return _exp7(8, attention_layers=[3, 7])


@preset("exp7_attention_last", tiny={**_EXP7_TINY, "attention_layers": [6, 7]})
def exp7_attention_last() -> dict:
    """exp7: attention last, at mixers 6 and 7 of 8."""
    return _exp7(8, attention_layers=[6, 7])


@preset("exp7_deltanet_188m", tiny={**_EXP7_TINY, "num_layers": 12, "attention_layers": [3, 7, 11]})
def exp7_deltanet_188m() -> dict:
    """exp7: the 188.98M model: 12 x 768 DeltaNet with attention at 3, 7, 11, vocab 49152."""
    return _exp7(12, attention_layers=[3, 7, 11])


# ------------------------------------------------------------------- HybridBuilder presets

@preset("hb_nemotron_h", tiny={**_tiny(), "backbone": "mamba2", "num_layers": 10, "ratio": [9, 1],
                               "mlp_after_mixer": "mlp"})
def hb_nemotron_h() -> dict:
    """HybridBuilder `nemotron_h`: 90% Mamba2 : 10% attention, evenly spaced, MLP after each mixer."""
    return _model(backbone="mamba2", num_layers=30, ratio=[9, 1], mlp_after_mixer="mlp", hidden_size=2048,
                  vocab_size=32000, attention={"num_heads": 16, "num_kv_heads": 8},
                  mamba2={"state_size": 128, "head_dim": 64, "num_groups": 8},
                  mlp={"ffn_hidden_size": 8192, "activation": "relu2"})


@preset("hb_jamba", tiny={**_tiny(), "backbone": "mamba2", "num_layers": 4, "ratio": [3, 1], "mlp_after_mixer": "moe"})
def hb_jamba() -> dict:
    """HybridBuilder `jamba`: 3 Mamba2 : 1 attention, evenly spaced, MoE after each mixer."""
    return _model(backbone="mamba2", num_layers=32, ratio=[3, 1], mlp_after_mixer="moe", hidden_size=2048,
                  vocab_size=32000, attention={"num_heads": 16, "num_kv_heads": 8},
                  mamba2={"state_size": 128, "head_dim": 64, "num_groups": 8},
                  moe={"num_experts": 16, "top_k": 2, "ffn_hidden_size": 4096})


@preset("hb_parallel", tiny={**_tiny(), "backbone": "hymba", "num_layers": 2, "mlp_after_mixer": "mlp"})
def hb_parallel() -> dict:
    """HybridBuilder `parallel`: Hymba-style parallel attention + SSM heads in every layer."""
    return _model(backbone="hymba", num_layers=24, mlp_after_mixer="mlp", hidden_size=2048, vocab_size=32000,
                  attention={"num_heads": 16, "num_kv_heads": 8},
                  mamba2={"state_size": 64, "head_dim": 64}, mlp={"ffn_hidden_size": 5632})


@preset("hb_minimal_attn", tiny={**_tiny(), "backbone": "mamba2", "num_layers": 6, "attention_layers": [3],
                                 "mlp_after_mixer": "mlp"})
def hb_minimal_attn() -> dict:
    """HybridBuilder `minimal_attn`: a Mamba2 backbone with a single attention layer in the middle."""
    return _model(backbone="mamba2", num_layers=24, attention_layers=[12], mlp_after_mixer="mlp",
                  hidden_size=2048, vocab_size=32000, attention={"num_heads": 16, "num_kv_heads": 8},
                  mamba2={"state_size": 128, "head_dim": 64, "num_groups": 8}, mlp={"ffn_hidden_size": 5632})


# --------------------------------------------------------------------------------- lookup

_LAYOUT_KEYS = ("pattern", "layers", "backbone", "num_layers", "attention_every", "attention_layers",
                "ratio", "mlp_after_mixer")


def names() -> list[str]:
    return sorted(PRESETS)


def is_preset(source: str) -> bool:
    return source.split(":", 1)[0] in PRESETS


def get(source: str) -> dict:
    """`name` or `name:tiny` -> a fresh config dict."""
    name, _, size = source.partition(":")
    if name not in PRESETS:
        import difflib

        close = difflib.get_close_matches(name, PRESETS, n=3)
        hint = f"did you mean {', '.join(close)}?" if close else f"known presets: {', '.join(names())}"
        raise ConfigError(f"preset {name!r}: unknown; {hint}")
    data = copy.deepcopy(PRESETS[name]())
    if size == "tiny":
        tiny = copy.deepcopy(TINY[name])
        model = data.setdefault("model", {})
        if any(key in tiny for key in ("pattern", "layers", "backbone")):
            for key in _LAYOUT_KEYS:
                model.pop(key, None)
        for key, value in tiny.items():
            model[key] = {**model.get(key, {}), **value} if isinstance(value, dict) else value
        data.setdefault("train", {}).update({"seq_len": 32})
    elif size:
        raise ConfigError(f"preset {source!r}: unknown size {size!r}; use {name} or {name}:tiny")
    data["name"] = source
    return data
