"""megahybrid <-> Megatron-Core `torch_dist` distributed checkpoints, written at any TP/PP/EP and read
back at TP = 1 (so a checkpoint saved at one layout loads at another: that is what dist checkpointing
stores - every tensor under a global key with its global shape, each rank writing its own chunk).

Layout of a directory `write` produces (the dist checkpoint itself, what `dist_checkpointing.load(
model.sharded_state_dict(), DIR)` takes; Megatron-LM's trainer wants it as `ROOT/iter_0000000/` next to
`ROOT/latest_checkpointed_iteration.txt`, which we do not write):

    .metadata, __{rank}_0.distcp   PyTorch DCP files with Megatron's planner metadata (torch_dist, v1)
    metadata.json                  {"sharded_backend": "torch_dist", ...}: Megatron's format marker
    megahybrid.yaml, megahybrid.json   the resolved config, the source and the layout written at

Keys, global shapes and per-rank chunks are those of `MegatronLM.sharded_state_dict()`
(megahybrid/megatron/model.py, which follows stock HybridStack): layers under their global index;
Mamba in_proj stored as `.z .x .B .C .dt`, its conv as `.x .B .C`; GDN in_proj as `.query .key .value
.z .beta .alpha`, its conv as `.query .key .value`; SwiGLU fc1 as one tensor whose rank-r chunk holds
[gate_r; up_r] at offsets r and tp + r; experts on a prepended global expert axis; TE modules'
`_extra_state` as ShardedObjects. Each rank's shard is built here from the full (TP = 1) tensors with
Megatron's own checkpoint helpers, mirroring each module's `sharded_state_dict` (file:line in each
function); one gloo process per rank, so no GPU is needed.

Megatron's save strategy is CUDA-bound (`torch.cuda.synchronize` and a CUDA broadcast in its async
writer, psutil for memory logs), so `_save` runs the same steps minus that writer: Megatron's
`save_preprocess`, key translation and `MCoreSavePlanner` under PyTorch's synchronous DCP writer.
Reading uses `dist_checkpointing.load` itself. The emulated model is always one pipeline stage per
contiguous slice of the pattern; which stage holds a layer does not change its key.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import yaml

from megahybrid.convert.base import ConversionError

CONFIG_FILE = "megahybrid.yaml"
INFO_FILE = "megahybrid.json"


@dataclass(frozen=True)
class Layout:
    """A Megatron parallel layout; world = tp * pp * ep ranks (data parallel = ep, expert TP = tp)."""

    tp: int = 1
    pp: int = 1
    ep: int = 1

    @property
    def world(self) -> int:
        return self.tp * self.pp * self.ep


# ------------------------------------------------------------------------------ public entry points


def write(dst, config, state: dict, tp: int = 1, pp: int = 1, ep: int = 1, source: Optional[dict] = None) -> Path:
    """megahybrid Config + ReferenceLM state -> a Megatron dist checkpoint directory at TP/PP/EP."""
    from safetensors.torch import save_file

    from megahybrid.megatron import mapping
    from megahybrid.train.checkpoint import config_yaml

    layout = Layout(tp, pp, ep)
    check_layout(config, layout)
    m = config.model
    state = {k: v for k, v in state.items() if not (m.tie_embeddings and k == "lm_head.weight")}
    try:
        full = mapping.to_megatron(state, config)
    except KeyError as e:
        raise ConversionError(f"megahybrid -> Megatron: {e.args[0]}") from e
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    if any(dst.iterdir()):
        raise ConversionError(f"{dst}: not empty; a dist checkpoint needs an empty directory")
    with tempfile.TemporaryDirectory() as tmp:
        tensors = Path(tmp) / "full.safetensors"
        save_file({k: v.detach().cpu().contiguous() for k, v in full.items()}, str(tensors))
        _spawn(_write_rank, layout.world, (layout, str(tensors), config_yaml(config), str(dst)), tmp)
    (dst / CONFIG_FILE).write_text(config_yaml(config))
    (dst / INFO_FILE).write_text(json.dumps({"source": source or {}, "written_at": vars(layout)}, indent=2) + "\n")
    return dst


def read(path):
    """(Config, ReferenceLM state dict, source) from a Megatron dist checkpoint of any layout."""
    import megahybrid
    from safetensors.torch import load_file

    from megahybrid.megatron import mapping

    path = Path(path)
    if not (path / CONFIG_FILE).is_file():
        raise ConversionError(f"{path}: no {CONFIG_FILE}; a Megatron checkpoint not written by megahybrid "
                              f"needs its model config - write it there (`megahybrid config --dump` format)")
    config = megahybrid.load_config(yaml.safe_load((path / CONFIG_FILE).read_text()))
    info = json.loads((path / INFO_FILE).read_text()) if (path / INFO_FILE).is_file() else {}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "full.safetensors"
        _spawn(_read_rank, 1, ((path / CONFIG_FILE).read_text(), str(path), str(out)), tmp)
        full = load_file(str(out))
    return config, mapping.to_reference(full, config), info.get("source", {})


def check_layout(config, layout: Layout) -> None:
    """One-line errors for a layout the model's sizes cannot be split into."""
    from megahybrid.megatron.transformer_config import check_megatron
    from megahybrid.mixers.gated_deltanet import gdn_sizes
    from megahybrid.mixers.mamba2 import ssd_sizes
    from megahybrid.mixers.moe import expert_width, shared_expert_width
    from megahybrid.mixers.mlp import mlp_width

    specs = check_megatron(config)
    m, symbols, tp = config.model, {s.symbol for s in specs}, layout.tp
    a = m.attention
    sizes = {"model.vocab_size": m.vocab_size}
    if "*" in symbols:
        sizes.update({"model.attention.num_heads": a.num_heads, "model.attention.num_kv_heads": a.num_kv_heads or a.num_heads})
    if "M" in symbols:
        _, nh, G, _, _ = ssd_sizes(m)
        sizes.update({"model.mamba2 heads": nh, "model.mamba2.num_groups": G})
    if "G" in symbols:
        Hk, Hv, _, _ = gdn_sizes(m)
        sizes.update({"model.gdn.num_qk_heads": Hk, "model.gdn.num_v_heads": Hv})
    if "-" in symbols:
        sizes["model.mlp.ffn_hidden_size"] = mlp_width(m)
    if "E" in symbols:
        sizes["model.moe.ffn_hidden_size"] = expert_width(m)
        if shared_expert_width(m):
            sizes["model.moe shared expert width"] = shared_expert_width(m)
    for name, value in sizes.items():
        if value % tp:
            raise ConversionError(f"{name}={value}: not divisible by tp={tp}; choose a tp that divides it")
    if layout.ep > 1 and ("E" not in symbols or m.moe.num_experts % layout.ep):
        raise ConversionError(f"ep={layout.ep}: needs MoE layers with model.moe.num_experts divisible by it "
                              f"(pattern {m.pattern!r}, {m.moe.num_experts} experts)")
    if layout.pp > len(specs):
        raise ConversionError(f"pp={layout.pp}: more stages than the {len(specs)} layers of the pattern")


# ------------------------------------------------------------------------------------ rank processes


def _spawn(fn, world: int, args: tuple, tmp: str) -> None:
    """Run fn(rank, world, store, *args) in `world` fresh gloo processes (isolates Megatron's globals)."""
    import torch.multiprocessing as mp

    try:
        mp.spawn(fn, args=(world, os.path.join(tmp, "store"), *args), nprocs=world, join=True)
    except mp.ProcessRaisedException as e:  # keep the rank's own error message
        raise ConversionError(f"Megatron checkpoint rank process failed:\n{e}") from None


def _init(rank: int, world: int, store: str, layout: Layout):
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.process_groups_config import ProcessGroupCollection

    dist.init_process_group("gloo", store=dist.FileStore(store, world), rank=rank, world_size=world)
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=layout.tp,
                                             pipeline_model_parallel_size=layout.pp,
                                             expert_model_parallel_size=layout.ep,
                                             expert_tensor_parallel_size=layout.tp,
                                             create_gloo_process_groups=False)  # the default group is gloo already
    pg = ProcessGroupCollection.use_mpu_process_groups()
    return pg, parallel_state.get_data_parallel_group(with_context_parallel=True)


def _write_rank(rank, world, store, layout, tensors, config_text, dst):
    import megahybrid
    from safetensors.torch import load_file

    config = megahybrid.load_config(yaml.safe_load(config_text))
    pg, dp_cp = _init(rank, world, store, layout)
    sd = sharded_state_dict(config, load_file(tensors), Shards(pg, dp_cp, layout))
    _save(sd, dst)
    torch.distributed.destroy_process_group()


def _read_rank(rank, world, store, config_text, src, out):
    import megahybrid
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedObject
    from safetensors.torch import save_file

    from megahybrid.megatron import mapping

    config = megahybrid.load_config(yaml.safe_load(config_text))
    pg, dp_cp = _init(rank, world, store, Layout())
    with torch.device("meta"):
        shapes = mapping.to_megatron(_meta_reference(config), config)
    empty = {k: torch.empty(v.shape, dtype=_stored_dtype(src, config)) for k, v in shapes.items()}
    sd = {k: v for k, v in sharded_state_dict(config, empty, Shards(pg, dp_cp, Layout())).items()
          if not isinstance(v, ShardedObject)}  # TE's FP8 metadata: nothing of ours
    _check_keys(sd, src)
    loaded = dist_checkpointing.load(sd, src)
    save_file({k: v.contiguous() for k, v in loaded.items()}, out)
    torch.distributed.destroy_process_group()


def _meta_reference(config) -> dict:
    from megahybrid.reference.model import ReferenceLM

    with torch.device("meta"):
        return ReferenceLM(config).state_dict()


def _stored_dtype(src: str, config) -> torch.dtype:
    """The dtype the checkpoint holds (the embedding's), so reading is bitwise."""
    from megatron.core.dist_checkpointing import load_tensors_metadata

    meta = load_tensors_metadata(src)
    return meta["embedding.word_embeddings.weight"].dtype


def _check_keys(sd: dict, src: str) -> None:
    """Name the tensor and both shapes when the checkpoint does not hold what the config implies."""
    from megatron.core.dist_checkpointing import load_tensors_metadata
    from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory

    stored = load_tensors_metadata(src)
    wanted = {}
    for v in sd.values():
        for t in (v.build() if isinstance(v, ShardedTensorFactory) else [v]):
            wanted[t.key] = tuple(t.global_shape)
    for key, shape in sorted(wanted.items()):
        if key not in stored:
            near = sorted(k for k in stored if k.startswith(key.rsplit(".", 2)[0]))[:6]
            raise ConversionError(f"{src}: tensor {key!r} is missing (present nearby: {', '.join(near)})")
        if tuple(stored[key].global_shape) != shape:
            raise ConversionError(f"tensor {key!r}: shape {tuple(stored[key].global_shape)} in the checkpoint, "
                                  f"{shape} expected from {CONFIG_FILE}")


def _save(sharded_sd: dict, dst: str) -> None:
    """`dist_checkpointing.save` (serialization.py:349-466) with PyTorch's synchronous DCP writer in
    place of Megatron's CUDA-bound async one; same translation, planner and metadata.json."""
    from megatron.core.dist_checkpointing.core import CheckpointingConfig, save_config
    from megatron.core.dist_checkpointing.mapping import ShardedObject
    from megatron.core.dist_checkpointing.state_dict_utils import save_preprocess
    from megatron.core.dist_checkpointing.strategies.torch import (
        MCoreSavePlanner,
        _replace_state_dict_keys_with_sharded_keys,
        mcore_to_pyt_state_dict,
    )
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint import save as dcp_save

    rank = torch.distributed.get_rank()
    sharded_sd, common = save_preprocess(sharded_sd, True)
    sharded_sd["common_state"] = ShardedObject("common_state", common, (1,), (0,), replica_id=rank)
    sharded_sd, _, _ = _replace_state_dict_keys_with_sharded_keys(sharded_sd, True)
    dcp_save(mcore_to_pyt_state_dict(sharded_sd, False), storage_writer=FileSystemWriter(dst),
             planner=MCoreSavePlanner(dedup_replicated_tensors=False, flatten_state_dict=False,
                                      flatten_sharded_tensors=False))
    if rank == 0:
        save_config(CheckpointingConfig("torch_dist", 1), dst)
    torch.distributed.barrier()


# ------------------------------------------------------------- one rank's shard, module by module


TE_EXTRA_STATE = None
"""What a Transformer Engine module's `get_extra_state` holds without FP8 (its FP8 scaling metadata;
none here). Stored as the ShardedObject `<module>._extra_state`, which Megatron's loader requires."""


class Shards:
    """One rank's view: its process groups and how to cut a full tensor into its TP block."""

    def __init__(self, pg, dp_cp, layout: Layout):
        self.pg, self.dp_cp, self.layout = pg, dp_cp, layout
        self.pp_rank = pg.pp.rank()

    def block(self, t: torch.Tensor, dim: int = 0, sections=None, group=None) -> torch.Tensor:
        """This rank's block of `t` along `dim`; with `sections`, each section is cut separately and
        the blocks concatenated - Megatron's per-rank layout of a fused projection."""
        group = group or self.pg.tp
        n, r = group.size(), group.rank()
        parts = t.split(list(sections), dim) if sections else [t]
        out = []
        for p in parts:
            size = p.shape[dim] // n
            out.append(p.narrow(dim, r * size, size))
        return torch.cat(out, dim).contiguous()

    def tensors(self, state: dict, prefix: str, axes: dict, group=None, offsets=()) -> dict:
        """transformer/utils.py:make_sharded_tensors_for_checkpoint with this rank's groups."""
        from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

        return make_sharded_tensors_for_checkpoint(state, prefix, axes, offsets, tp_group=group or self.pg.tp,
                                                   dp_cp_group=self.dp_cp)


def stage_layers(n_layers: int, pp: int, stage: int) -> range:
    """Contiguous layers of pipeline stage `stage` (earlier stages get the remainder)."""
    base, extra = divmod(n_layers, pp)
    start = stage * base + min(stage, extra)
    return range(start, start + base + (stage < extra))


def sharded_state_dict(config, full: dict, r: Shards) -> dict:
    """This rank's `MegatronLM.sharded_state_dict()` from the full TP = 1 Megatron tensors `full`
    (mapping.to_megatron names); dict keys are Megatron's module state-dict names."""
    from megahybrid.pattern import resolve_layers

    specs = resolve_layers(config)
    layout, out = r.layout, {}
    first, last = r.pp_rank == 0, r.pp_rank == layout.pp - 1
    if first:  # tensor_parallel/layers.py:382 VocabParallelEmbedding: vocab axis, allow_shape_mismatch
        from megatron.core.utils import make_tp_sharded_tensor_for_checkpoint

        key = "embedding.word_embeddings.weight"
        out[key] = make_tp_sharded_tensor_for_checkpoint(r.block(full[key]), key, 0, allow_shape_mismatch=True,
                                                         tp_group=r.pg.tp, dp_cp_group=r.dp_cp)
    for i in stage_layers(len(specs), layout.pp, r.pp_rank):
        prefix = f"decoder.layers.{i}."
        layer = {k[len(prefix):]: v for k, v in full.items() if k.startswith(prefix)}
        out.update(LAYERS[specs[i].symbol](config.model, layer, prefix, r))
    if last:
        out.update(_te_norm(full["decoder.final_norm.weight"], "decoder.final_norm.", r, full.get("decoder.final_norm.bias")))
        out.update(_output_layer(config.model, full, r))
    return out


def _te_norm(weight, prefix, r, bias=None) -> dict:
    """TENorm (a TE RMSNorm/LayerNorm, no sharded_state_dict of its own): replicated, plus _extra_state."""
    state = {"weight": weight} if bias is None else {"weight": weight, "bias": bias}
    return r.tensors({**state, "_extra_state": TE_EXTRA_STATE}, prefix, {})


def _te_linear(state: dict, prefix, r, axis: int) -> dict:
    """TELayerNormColumnParallelLinear / TERowParallelLinear (extensions/transformer_engine.py:1347,
    1737): weight on `axis`, fused norm weights replicated, _extra_state."""
    return r.tensors({**state, "_extra_state": TE_EXTRA_STATE}, prefix, {"weight": axis, "bias": axis} if axis == 0
                     else {"weight": axis})


def _split(sd: dict, name: str, sections: list, names: list) -> None:
    """ssm/utils.py:_split_tensor_factory: one stored tensor per component (`<key>.<name>`)."""
    from megatron.core.ssm.utils import _split_tensor_factory

    sd[name] = _split_tensor_factory(sd[name], sections, names, 0)


def _ln_weights(layer: dict, stem: str) -> dict:
    return {k[len(stem):]: v for k, v in layer.items() if k.startswith(stem) and "layer_norm" in k}


def _mamba(m, layer: dict, prefix: str, r: Shards) -> dict:
    """MambaLayer -> MambaMixer.sharded_state_dict (ssm/mamba_mixer.py:1339-1487)."""
    from megahybrid.mixers.mamba2 import ssd_sizes

    d_inner, nh, G, N, _ = ssd_sizes(m)
    tp, p = r.layout.tp, prefix + "mixer."
    zxbcdt, xbc = [d_inner, d_inner, G * N, G * N, nh], [d_inner, G * N, G * N]
    own = {"dt_bias": r.block(layer["mixer.dt_bias"]), "A_log": r.block(layer["mixer.A_log"]),
           "D": r.block(layer["mixer.D"]), "conv1d_weight": r.block(layer["mixer.conv1d_weight"], 0, xbc),
           "conv1d_bias": r.block(layer["mixer.conv1d_bias"], 0, xbc)}
    sd = r.tensors(own, p, {k: 0 for k in own})
    in_proj = {"weight": r.block(layer["mixer.in_proj.weight"], 0, zxbcdt), **_ln_weights(layer, "mixer.in_proj.")}
    sd.update(_te_linear(in_proj, p + "in_proj.", r, 0))
    sd.update(r.tensors({"weight": r.block(layer["mixer.norm.weight"])}, p + "norm.", {"weight": 0}))  # :116
    sd.update(_te_linear({"weight": r.block(layer["mixer.out_proj.weight"], 1)}, p + "out_proj.", r, 1))
    for name, stored in (("conv1d_weight", "conv1d.weight"), ("conv1d_bias", "conv1d.bias")):
        sd[p + name].key = p + stored  # mamba_mixer.py:1376: checkpoint keys kept from nn.Conv1d days
    _split(sd, p + "in_proj.weight", [s // tp for s in zxbcdt], ["z", "x", "B", "C", "dt"])
    for name in ("conv1d_weight", "conv1d_bias"):
        _split(sd, p + name, [s // tp for s in xbc], ["x", "B", "C"])
    return sd


def _gdn(m, layer: dict, prefix: str, r: Shards) -> dict:
    """TransformerLayer -> GatedDeltaNet.sharded_state_dict (ssm/gated_delta_net/common.py:474-549;
    in_proj sections from gdn.py:41)."""
    from megahybrid.mixers.gated_deltanet import gdn_sizes

    Hk, Hv, dk, dv = gdn_sizes(m)
    tp, p = r.layout.tp, prefix + "self_attention."
    sections, conv = [Hk * dk, Hk * dk, Hv * dv, Hv * dv, Hv, Hv], [Hk * dk, Hk * dk, Hv * dv]
    sd = r.tensors({"A_log": r.block(layer["self_attention.A_log"]), "dt_bias": r.block(layer["self_attention.dt_bias"])},
                   p, {"A_log": 0, "dt_bias": 0})
    in_proj = {"weight": r.block(layer["self_attention.in_proj.weight"], 0, sections),
               **_ln_weights(layer, "self_attention.in_proj.")}
    sd.update(_te_linear(in_proj, p + "in_proj.", r, 0))
    sd.update(r.tensors({"weight": r.block(layer["self_attention.conv1d.weight"], 0, conv)}, p + "conv1d.", {"weight": 0}))
    sd.update(_te_norm(layer["self_attention.out_norm.weight"], p + "out_norm.", r))
    sd.update(_te_linear({"weight": r.block(layer["self_attention.out_proj.weight"], 1)}, p + "out_proj.", r, 1))
    _split(sd, p + "in_proj.weight", [s // tp for s in sections], ["query", "key", "value", "z", "beta", "alpha"])
    _split(sd, p + "conv1d.weight", [s // tp for s in conv], ["query", "key", "value"])
    return sd


def _attention(m, layer: dict, prefix: str, r: Shards) -> dict:
    """TransformerLayer -> SelfAttention: linear_qkv rows are whole KV groups, so rank r's block is
    contiguous (attention.py get_query_key_value_tensors); TEDotProductAttention stores nothing
    without a learnable softmax offset (transformer_engine.py:2083)."""
    p = prefix + "self_attention."
    qkv = {"weight": r.block(layer["self_attention.linear_qkv.weight"]), **_ln_weights(layer, "self_attention.linear_qkv.")}
    sd = _te_linear(qkv, p + "linear_qkv.", r, 0)
    sd.update(_te_linear({"weight": r.block(layer["self_attention.linear_proj.weight"], 1)}, p + "linear_proj.", r, 1))
    for norm in ("q_layernorm", "k_layernorm"):
        if f"self_attention.{norm}.weight" in layer:
            sd.update(_te_norm(layer[f"self_attention.{norm}.weight"], f"{p}{norm}.", r))
    return sd


def _swiglu(sh_ten, offsets, r: Shards, group):
    """transformer/mlp.py:apply_swiglu_sharded_factory: [gate_r; up_r] stored at offsets r and tp + r."""
    from megatron.core.transformer.mlp import apply_swiglu_sharded_factory

    return apply_swiglu_sharded_factory(sh_ten, offsets, False, tp_group=group, dp_group=r.dp_cp)


def _mlp_module(layer: dict, stem: str, prefix: str, r: Shards, gated: bool) -> dict:
    """MLP.sharded_state_dict (transformer/mlp.py:360): fc1 column-parallel (SwiGLU-split when gated)."""
    half = layer[stem + "linear_fc1.weight"].shape[0] // 2
    fc1 = {"weight": r.block(layer[stem + "linear_fc1.weight"], 0, [half, half] if gated else None),
           **_ln_weights(layer, stem + "linear_fc1.")}
    sd = _te_linear(fc1, prefix + "linear_fc1.", r, 0)
    sd.update(_te_linear({"weight": r.block(layer[stem + "linear_fc2.weight"], 1)}, prefix + "linear_fc2.", r, 1))
    if gated:
        sd[prefix + "linear_fc1.weight"] = _swiglu(sd[prefix + "linear_fc1.weight"], (), r, r.pg.tp)
    return sd


def _mlp(m, layer: dict, prefix: str, r: Shards) -> dict:
    from megahybrid.megatron.transformer_config import _activation

    return _mlp_module(layer, "mlp.", prefix + "mlp.", r, _activation(m.mlp.activation)[1])


def _moe(m, layer: dict, prefix: str, r: Shards) -> dict:
    """MoETransformerLayer: pre_mlp_layernorm (TENorm), MoELayer = router (replicated) + TEGroupedMLP
    (moe/experts.py:912, grouped linears transformer_engine.py:2507) + shared experts (an MLP)."""
    from megahybrid.megatron.transformer_config import _activation

    gated = _activation(m.moe.activation)[1]
    sd = _te_norm(layer["pre_mlp_layernorm.weight"], prefix + "pre_mlp_layernorm.", r, layer.get("pre_mlp_layernorm.bias"))
    sd.update(r.tensors({"weight": layer["mlp.router.weight"]}, prefix + "mlp.router.", {}))
    sd.update(_experts(m, layer, prefix + "mlp.experts.", r, gated))
    if "mlp.shared_experts.linear_fc1.weight" in layer:
        sd.update(_mlp_module(layer, "mlp.shared_experts.", prefix + "mlp.shared_experts.", r, gated))
    return sd


def _experts(m, layer: dict, prefix: str, r: Shards, gated: bool) -> dict:
    """TEGroupedMLP over the local experts of this EP rank: each expert's fc1/fc2 on the expert-TP
    group, a prepended global expert axis, `_extra_state` per GEMM as a ShardedObject of shape (E,);
    replica ids take the expert-data-parallel rank."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    E, pg = m.moe.num_experts, r.pg
    local = E // pg.ep.size()
    out = {}
    for fc, axis in (("linear_fc1", 0), ("linear_fc2", 1)):
        for i in range(local):
            e = pg.ep.rank() * local + i
            w = layer[f"mlp.experts.{fc}.weight{e}"]
            sections = [w.shape[0] // 2] * 2 if fc == "linear_fc1" and gated else None
            offsets = ((0, e, E),)
            # stored under `experts.experts.` (experts.py:955 prefixes `experts.` to the MoE layer's
            # `experts.` to match SequentialMLP's keys); the state-dict name keeps one
            sub = r.tensors({"weight": r.block(w, axis, sections, pg.expt_tp), "_extra_state": TE_EXTRA_STATE},
                            f"{prefix}experts.{fc}.", {"weight": axis}, group=pg.expt_tp, offsets=offsets)
            for t in sub.values():
                dp_rank = (pg.expt_dp_gtp_remat if isinstance(t, ShardedObject) else pg.expt_dp).rank()
                t.replica_id = (*t.replica_id[:2], dp_rank)
            weight = sub[f"{prefix}experts.{fc}.weight"]
            if sections:
                weight = _swiglu(weight, offsets, r, pg.expt_tp)
            out[f"{prefix}{fc}.weight{i}"] = weight
            out[f"{prefix}{fc}._extra_state{'' if i == 0 else i}"] = sub[f"{prefix}experts.{fc}._extra_state"]
    return out


def _output_layer(m, full: dict, r: Shards) -> dict:
    """ColumnParallelLinear (tensor_parallel/layers.py:1217; its extra state is None) and
    LanguageModule.sharded_state_dict (language_module.py:408): the untied weight allows a padded vocab;
    a tied head on a later stage than the embedding stores a non-main replica of the embedding."""
    from megatron.core.utils import make_tp_sharded_tensor_for_checkpoint

    out = r.tensors({"_extra_state": None}, "output_layer.", {})
    if not m.tie_embeddings:
        out.update(r.tensors({"weight": r.block(full["output_layer.weight"])}, "output_layer.", {"weight": 0}))
        out["output_layer.weight"].allow_shape_mismatch = True
    elif r.pp_rank > 0:
        dp_rank = r.dp_cp.rank()
        out["output_layer.weight"] = make_tp_sharded_tensor_for_checkpoint(
            r.block(full["embedding.word_embeddings.weight"]), "embedding.word_embeddings.weight", 0,
            replica_id=(1, 0, dp_rank), allow_shape_mismatch=True, tp_group=r.pg.tp, dp_cp_group=r.dp_cp)
    return out


LAYERS = {"M": _mamba, "G": _gdn, "*": _attention, "-": _mlp, "E": _moe}
"""Pattern symbol -> this rank's shard of one layer (the symbols the Megatron backend builds)."""
