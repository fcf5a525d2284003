"""The reference <-> Megatron parameter table (megahybrid/megatron/mapping.py) on CPU: round trips are
exact, and each packed layout is read back through Megatron's own code (its QKV split, its GDN
in_proj split sizes, its SwiGLU, its router and load-balancing loss)."""

from __future__ import annotations

import types

import pytest
import torch

from megahybrid import load_config
from megahybrid.megatron import mapping
from megahybrid.reference.model import ReferenceLM
from tests.helpers import assert_close

pytest.importorskip("megatron.core")

CASES = {
    "all_megatron_symbols": ["model.pattern='MG*-E'"],
    "gqa_gate_qknorm_shared_tied": ["model.pattern='M*-ME-M*'", "model.attention.output_gate=true",
                                    "model.attention.qk_norm=true", "model.moe.num_shared_experts=1",
                                    "model.tie_embeddings=true"],
    "relu2_layernorm_zero_centred": ["model.pattern='*-E'", "model.mlp.activation=relu2",
                                     "model.moe.activation=relu2", "model.norm=layernorm"],
    "gdn_grouped_v_zero_centred": ["model.pattern='GG-'", "model.zero_centered_norm=true"],
}


def tiny(overrides):
    return load_config("default:tiny", overrides)


@pytest.mark.parametrize("case", sorted(CASES))
def test_round_trip_is_identity(case):
    config = tiny(CASES[case])
    torch.manual_seed(0)
    ref_sd = ReferenceLM(config).state_dict()
    meg_sd = mapping.to_megatron(ref_sd, config)
    back = mapping.to_reference(meg_sd, config)
    assert sorted(back) == sorted(ref_sd)
    for name, tensor in ref_sd.items():
        assert torch.equal(back[name], tensor), name
    # and the other way round, from random Megatron tensors (exact up to the zero-centred +1 -1)
    meg_rand = {k: torch.randn_like(v) for k, v in meg_sd.items()}
    again = mapping.to_megatron(mapping.to_reference(meg_rand, config), config)
    assert sorted(again) == sorted(meg_rand)
    for name, tensor in meg_rand.items():
        torch.testing.assert_close(again[name], tensor, rtol=0, atol=1e-6, msg=name)


def test_unknown_reference_tensor_is_an_error():
    config = tiny(["model.pattern='*-'"])
    sd = ReferenceLM(config).state_dict()
    sd["layers.0.mixer.extra"] = torch.zeros(1)
    with pytest.raises(KeyError, match="layers.0.mixer.extra"):
        mapping.to_megatron(sd, config)


@pytest.mark.parametrize("gate", [False, True])
def test_qkv_layout_matches_megatron_split(gate):
    """Megatron's SelfAttention.get_query_key_value_tensors reads our packed linear_qkv back into the
    reference's q, (gate,) k, v heads."""
    from megatron.core.transformer.attention import SelfAttention

    config = tiny(["model.pattern='*'", "model.attention.num_heads=6", "model.attention.num_kv_heads=2", "model.attention.head_dim=8",
                   f"model.attention.output_gate={str(gate).lower()}"])
    m = config.model
    torch.manual_seed(0)
    attn = ReferenceLM(config).layers[0].mixer
    w = mapping.pack_qkv(attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight, m)
    linear = torch.nn.Linear(m.hidden_size, w.shape[0], bias=False)
    linear.weight.data.copy_(w)

    class LinearQKV(torch.nn.Module):
        def forward(self, x):
            return linear(x), None

    fake = types.SimpleNamespace(
        linear_qkv=LinearQKV(), num_attention_heads_per_partition=6, num_query_groups_per_partition=2,
        world_size=1, hidden_size_per_attention_head=attn.head_dim, q_layernorm=None, k_layernorm=None,
        config=types.SimpleNamespace(num_query_groups=2, test_mode=False))
    x = torch.randn(5, 3, m.hidden_size)  # Megatron's [s, b, h]
    out = SelfAttention.get_query_key_value_tensors(fake, x, None, output_gate=gate)
    with torch.no_grad():
        q_ref, g_ref, k_ref, v_ref = attn.project(x.transpose(0, 1))
    assert_close("query", q_ref.transpose(0, 1), out[0], 1e-6)
    assert_close("key", k_ref.transpose(0, 1), out[1], 1e-6)  # Megatron returns q, k, v(, gate)
    assert_close("value", v_ref.transpose(0, 1), out[2], 1e-6)
    if gate:
        assert_close("gate", g_ref.transpose(0, 1), out[3], 1e-6)


def test_gdn_in_proj_order_matches_megatron_sections():
    """Megatron's GatedDeltaNet names and sizes its in_proj sections [query, key, value, z, beta,
    alpha]; the table concatenates q, k, v, g, b, a projections with the same sizes, and the
    conv channels as [query, key, value]."""
    from megatron.core.ssm.gated_delta_net import GatedDeltaNet

    config = tiny(["model.pattern='G'"])
    gdn = ReferenceLM(config).layers[0].mixer  # only its sizes are used here
    Hk, Hv, dk, dv = gdn.num_qk_heads, gdn.num_v_heads, gdn.head_k_dim, gdn.head_v_dim
    fake = types.SimpleNamespace(num_value_heads=Hv, qk_dim_local_tp=Hk * dk, v_dim_local_tp=Hv * dv,
                                 tp_size=1, cp_size=1, num_v_heads_local_tp=Hv,
                                 config=types.SimpleNamespace(deterministic_mode=False))
    GatedDeltaNet._setup_variant_attrs(fake)
    assert fake.in_proj_split_names == ["query", "key", "value", "z", "beta", "alpha"]
    ours = [getattr(gdn, f"{n}_proj").weight.shape[0] for n in "qkvgba"]
    assert list(fake.in_proj_split_sections) == ours
    x = torch.randn(7, config.model.hidden_size)
    ref = ReferenceLM(config)
    sd = mapping.to_megatron(ref.state_dict(), config)
    parts = (x @ sd["decoder.layers.0.self_attention.in_proj.weight"].T).split(list(fake.in_proj_split_sections), -1)
    mix = ref.layers[0].mixer
    for name, part in zip("qkvgba", parts):
        assert_close(f"{name}_proj", getattr(mix, f"{name}_proj")(x), part, 1e-6)


def test_swiglu_fc1_order_matches_megatron():
    """Megatron's swiglu (fusions/fused_bias_swiglu.py) on our fc1 = [gate; up] equals the reference MLP."""
    from megatron.core.fusions.fused_bias_swiglu import swiglu

    config = tiny(["model.pattern='-'"])
    ref = ReferenceLM(config)
    sd = mapping.to_megatron(ref.state_dict(), config)
    mlp = ref.layers[0].mixer
    x = torch.randn(9, config.model.hidden_size)
    fc1 = x @ sd["decoder.layers.0.mlp.linear_fc1.weight"].T
    y = swiglu(fc1) @ sd["decoder.layers.0.mlp.linear_fc2.weight"].T
    assert_close("mlp", mlp(x[None])[0][0], y, 1e-5)


@pytest.mark.parametrize("router,norm_topk", [("softmax", True), ("softmax", False), ("sigmoid", True)])
def test_router_and_aux_loss_match_megatron(router, norm_topk):
    """Megatron's top-k routing and Switch load-balancing loss (moe_utils.py), configured as
    transformer_config.py configures them, equal the reference MoE's `route` and aux loss."""
    from megatron.core.transformer.moe.moe_utils import (compute_routing_scores_for_aux_loss,
                                                         switch_load_balancing_loss_func,
                                                         topk_routing_with_score_function)

    from megahybrid.mixers.moe import load_balancing_loss, route

    torch.manual_seed(0)
    N, E, k, coeff = 50, 8, 2, 0.01
    logits = torch.randn(N, E, dtype=torch.float64)
    weights, experts, probs = route(logits, k, router, norm_topk)
    dense = torch.zeros(N, E, dtype=logits.dtype).scatter(1, experts, weights)
    meg_probs, routing_map = topk_routing_with_score_function(
        logits, k, use_pre_softmax=router == "softmax" and not norm_topk, score_function=router)
    assert_close("routing probs", dense, meg_probs, 1e-6)  # Megatron takes the softmax in fp32
    assert torch.equal(routing_map, dense > 0)
    _, scores = compute_routing_scores_for_aux_loss(logits, k, router)
    meg_aux = switch_load_balancing_loss_func(scores, routing_map.sum(0), N, k, E, coeff)
    assert_close("aux loss", coeff * load_balancing_loss(probs, experts, E), meg_aux, 1e-6)
