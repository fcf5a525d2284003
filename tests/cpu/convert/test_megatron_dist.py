"""megahybrid <-> Megatron-Core torch_dist checkpoints on CPU (gloo, one process per emulated rank):
lossless round trips at TP=1, and written at TP=2 / PP=2 x EP=2 then read at TP=1; the stored chunks
are checked against Megatron's per-rank layouts as its module sources state them (not our code)."""

from __future__ import annotations

import pytest
import torch

from megahybrid import load_config
from megahybrid.convert import ConversionError, megatron_dist
from megahybrid.reference.model import ReferenceLM

pytest.importorskip("megatron.core")

SIZES = [
    "model.hidden_size=64", "model.vocab_size=96", "model.max_seq_len=64",
    "model.attention.num_heads=4", "model.attention.num_kv_heads=2",
    "model.mamba2.state_size=16", "model.mamba2.head_dim=16", "model.mamba2.num_groups=2",
    "model.gdn.num_qk_heads=2", "model.gdn.num_v_heads=4", "model.gdn.qk_head_dim=16", "model.gdn.v_head_dim=16",
    "model.mlp.ffn_hidden_size=128", "model.moe.num_experts=4", "model.moe.top_k=2", "model.moe.ffn_hidden_size=32",
]
TIED = ["model.tie_embeddings=true", "model.moe.num_shared_experts=1", "model.attention.qk_norm=true",
        "model.attention.output_gate=true"]


def model_and_state(extra=()):
    config = load_config({"model": {"pattern": "MG*-E"}}, SIZES + list(extra))
    torch.manual_seed(0)
    # random everywhere (norms included), so a misplaced row or an unset tensor cannot hide
    state = {k: torch.randn_like(v) for k, v in ReferenceLM(config).state_dict().items()}
    return config, state


def assert_bitwise(state, back):
    assert set(back) == set(state), sorted(set(back) ^ set(state))
    bad = [k for k in state if back[k].dtype != state[k].dtype or not torch.equal(back[k], state[k])]
    assert not bad, f"tensors changed by the round trip: {bad}"


def stored_chunks(path, key):
    """(offsets, sizes) of every chunk stored for `key`, from the DCP metadata: one per writing rank."""
    from torch.distributed.checkpoint import FileSystemReader

    meta = FileSystemReader(str(path)).read_metadata().state_dict_metadata[key]
    return sorted((tuple(c.offsets), tuple(c.sizes)) for c in meta.chunks)


@pytest.mark.parametrize("extra", [[], TIED], ids=["untied", "tied_shared_qknorm_gate"])
def test_round_trip_tp1_is_bitwise(tmp_path, extra):
    config, state = model_and_state(extra)
    megatron_dist.write(tmp_path / "ckpt", config, state, source={"hf_model_type": "x"})
    config2, back, source = megatron_dist.read(tmp_path / "ckpt")
    assert config2.model == config.model and source == {"hf_model_type": "x"}
    assert_bitwise(state, back)


def test_written_at_tp2_read_at_tp1_with_megatron_rank_layout(tmp_path):
    config, state = model_and_state(TIED)
    ckpt = tmp_path / "ckpt"
    megatron_dist.write(ckpt, config, state, tp=2)
    assert_bitwise(state, megatron_dist.read(ckpt)[1])

    stored = plain_tensors(ckpt, tmp_path)
    # Mamba (layer 0): MambaMixer at TP=2 holds d_inner/2 channels, ngroups/2 groups, nheads/2 heads and
    # splits its local in_proj output as [z | x | B | C | dt] (mamba_mixer.py: d_inner_local_tp,
    # ngroups_local_tp, nheads_local_tp; forward's torch.split). Rank 1 owns the second half of each.
    w = state["layers.0.mixer.in_proj.weight"]  # reference rows [z 128 | x 128 | B 32 | C 32 | dt 8]
    rank1_expected = torch.cat([w[64:128], w[192:256], w[272:288], w[304:320], w[324:328]])
    p = "decoder.layers.0.mixer.in_proj.weight."
    rank1_stored = torch.cat([stored[p + "z"][64:], stored[p + "x"][64:], stored[p + "B"][16:],
                              stored[p + "C"][16:], stored[p + "dt"][4:]])
    assert torch.equal(rank1_stored, rank1_expected)
    assert stored_chunks(ckpt, p + "B") == [((0, 0), (16, 64)), ((16, 0), (16, 64))]  # written by 2 ranks
    # Mamba conv: [x | B | C] channels per rank; key renamed to conv1d.weight (mamba_mixer.py, conv key map)
    c = state["layers.0.mixer.conv1d.weight"]
    assert torch.equal(stored["decoder.layers.0.mixer.conv1d.weight.B"], c[128:160])
    # GDN (layer 1): in_proj stored per section [query, key, value, z, beta, alpha] (gdn.py
    # in_proj_split_names); the reference's b_proj / a_proj are beta / alpha.
    p = "decoder.layers.1.self_attention.in_proj.weight."
    assert torch.equal(stored[p + "beta"], state["layers.1.mixer.b_proj.weight"])
    assert torch.equal(stored[p + "alpha"], state["layers.1.mixer.a_proj.weight"])
    assert torch.equal(stored[p + "z"], state["layers.1.mixer.g_proj.weight"])
    # SwiGLU fc1 (layer 3): one [gate; up] tensor whose chunks are gate/up halves of each rank
    # (mlp.py apply_swiglu_sharded_factory: offsets r and tp + r on a 2*tp grid)
    fc1 = stored["decoder.layers.3.mlp.linear_fc1.weight"]
    assert torch.equal(fc1, torch.cat([state["layers.3.mixer.gate_proj.weight"], state["layers.3.mixer.up_proj.weight"]]))
    assert len(stored_chunks(ckpt, "decoder.layers.3.mlp.linear_fc1.weight")) == 4
    # Experts (layer 4): one tensor with a leading global expert axis, under `experts.experts.`
    # (experts.py TEGroupedMLP.sharded_state_dict; key confirmed against MegatronLM on the GPU)
    e_fc2 = stored["decoder.layers.4.mlp.experts.experts.linear_fc2.weight"]
    assert e_fc2.shape == (4, 64, 32) and torch.equal(e_fc2, state["layers.4.mixer.experts.down_proj"])


def test_written_at_pp2_ep2_read_at_tp1(tmp_path):
    config, state = model_and_state()
    ckpt = tmp_path / "ckpt"
    megatron_dist.write(ckpt, config, state, pp=2, ep=2)
    assert_bitwise(state, megatron_dist.read(ckpt)[1])
    # EP=2: experts 0-1 and 2-3 are written by two different ranks (files __<rank>_0.distcp)
    files = expert_files(ckpt, "decoder.layers.4.mlp.experts.experts.linear_fc2.weight")
    assert files[0] == files[1] != files[2] == files[3], files


def expert_files(path, key):
    """Expert index -> the file (hence the rank) its chunk was written to."""
    from torch.distributed.checkpoint import FileSystemReader

    storage = FileSystemReader(str(path)).read_metadata().storage_data
    return {idx.offset[0]: info.relative_path for idx, info in storage.items() if idx.fqn == key}


def test_layout_errors_name_the_field(tmp_path):
    config, state = model_and_state(["model.vocab_size=95"])
    with pytest.raises(ConversionError, match="model.vocab_size=95: not divisible by tp=2"):
        megatron_dist.write(tmp_path / "a", config, state, tp=2)
    config, state = model_and_state()
    with pytest.raises(ConversionError, match="ep=3: needs MoE layers"):
        megatron_dist.write(tmp_path / "b", config, state, ep=3)


def plain_tensors(ckpt, tmp_path) -> dict:
    """Every stored tensor at its global shape, read by Megatron's own `load_plain_tensors`."""
    import torch.distributed as dist
    from megatron.core.dist_checkpointing import load_plain_tensors

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        return load_plain_tensors(str(ckpt))
    finally:
        dist.destroy_process_group()
