"""Megatron itself loads what megatron_dist writes, and megatron_dist reads what Megatron saves (GPU,
marker `gpu`; run with tests/gpu/run_megatron.sh tests).

Our checkpoint (written on CPU at TP=1 or TP=2) has exactly the keys and global shapes of
`MegatronLM.sharded_state_dict()`, `dist_checkpointing.load` fills a TP=1 MegatronLM from it whose
float32 logits match the ReferenceLM holding the same weights; and a checkpoint saved by
`dist_checkpointing.save(model.sharded_state_dict())` reads back bitwise equal to the model's weights.
"""

from __future__ import annotations

import shutil

import pytest
import torch

from tests.helpers import rel_error

pytestmark = pytest.mark.gpu

SIZES = [
    "model.hidden_size=64", "model.vocab_size=96", "model.max_seq_len=64",
    "model.attention.num_heads=4", "model.attention.num_kv_heads=2",
    "model.mamba2.state_size=16", "model.mamba2.head_dim=16", "model.mamba2.num_groups=2",
    "model.gdn.num_qk_heads=2", "model.gdn.num_v_heads=4", "model.gdn.qk_head_dim=16", "model.gdn.v_head_dim=16",
    "model.mlp.ffn_hidden_size=128", "model.moe.num_experts=4", "model.moe.top_k=2", "model.moe.ffn_hidden_size=32",
]
CASES = {"untied": [], "tied_shared_qknorm_gate": ["model.tie_embeddings=true", "model.moe.num_shared_experts=1",
                                                    "model.attention.qk_norm=true", "model.attention.output_gate=true"]}
LOGITS_TOL = 5e-3  # float32 max-relative, as tests/gpu/test_megatron_backend.py
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False


def global_shapes(sharded) -> dict:
    """{key: global shape} of every ShardedTensor / ShardedObject (factories applied)."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, ShardedTensorFactory

    out = {}

    def visit(x):
        if isinstance(x, ShardedTensorFactory):
            visit(x.build())
        elif isinstance(x, dict):
            [visit(v) for v in x.values()]
        elif isinstance(x, (list, tuple)):
            [visit(v) for v in x]
        elif isinstance(x, (ShardedTensor, ShardedObject)):
            out[x.key] = tuple(x.global_shape)

    visit(sharded)
    return out


@pytest.mark.parametrize("tp", [1, 2], ids=["written_tp1", "written_tp2"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_megatron_loads_ours_and_we_read_megatrons(tmp_path, case, tp):
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.serialization import load_sharded_metadata

    from megahybrid import load_config
    from megahybrid.convert import megatron_dist
    from megahybrid.megatron import mapping
    from megahybrid.megatron.model import build_megatron_model
    from megahybrid.megatron.transformer_config import Precision
    from megahybrid.reference.model import ReferenceLM

    config = load_config({"model": {"pattern": "MG*-E"}}, SIZES + CASES[case])
    torch.manual_seed(0)
    ref = ReferenceLM(config)
    with torch.no_grad():  # norms away from 1 so a misplaced norm weight shows
        for name, p in ref.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    ours = tmp_path / "ours"
    megatron_dist.write(ours, config, ref.state_dict(), tp=tp)

    model = build_megatron_model(config, Precision(torch.float32))
    expected = global_shapes(model.sharded_state_dict())
    stored = {v.key: tuple(v.global_shape) for v in load_sharded_metadata(str(ours)).values() if v.key != "common_state"}
    assert stored == expected, {"only ours": sorted(set(stored) - set(expected)),
                                "only Megatron's": sorted(set(expected) - set(stored)),
                                "shape differs": sorted(k for k in stored.keys() & expected.keys() if stored[k] != expected[k])}

    loaded = dist_checkpointing.load(model.sharded_state_dict(), str(ours))
    model.load_state_dict(loaded, strict=True)
    ref, ids = ref.cuda().eval(), torch.randint(config.model.vocab_size, (2, 48), device="cuda")
    model.eval()
    with torch.no_grad():
        err = rel_error(ref(ids), model(ids))
    print(f"megatron checkpoint {case} written at tp={tp}: logits max-rel {err:.1e}")
    assert err <= LOGITS_TOL, err

    theirs = tmp_path / "theirs"
    theirs.mkdir()
    dist_checkpointing.save(model.sharded_state_dict(), str(theirs))
    shutil.copy(ours / megatron_dist.CONFIG_FILE, theirs / megatron_dist.CONFIG_FILE)
    _, back, _ = megatron_dist.read(theirs)
    weights = {k: v.detach().cpu() for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    want = mapping.to_reference(weights, config)
    bad = [k for k in want if not torch.equal(want[k], back[k])]
    assert set(back) == set(want) and not bad, bad
