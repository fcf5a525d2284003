"""The Megatron backend's LM: the same layers as `ReferenceLM`, built from Megatron-Core `ModuleSpec`s.

    embedding (VocabParallelEmbedding) -> one Megatron layer per pattern symbol -> final norm -> output layer

Layer specs are Megatron's own hybrid specs (megatron/core/models/hybrid/hybrid_layer_specs.py):
TE linears with the pre-norm fused into `TELayerNormColumnParallelLinear`, `TEDotProductAttention`,
`MambaMixer`, `GatedDeltaNet`, `MoELayer` with grouped-GEMM experts. The assembly is ours (it follows
hybrid_block.py `HybridStack` and hybrid_model.py `HybridModel`, which stay the benchmark baseline):
per-layer TransformerConfigs (a GDN layer keeps silu when the MLP uses relu2), bf16-pinned pattern
positions under FP8, embedding scale / logit soft-cap / tied head, and packed rows (`seq_idx`).

Mamba without the `causal_conv1d` CUDA extension: Megatron's fused training path
(`mamba_split_conv1d_scan_combined`) needs it, and its fallback (`use_mamba_mem_eff_path=False`) runs
the conv as an `nn.Conv1d` over a transposed copy and refuses packed sequences. `TritonMambaMixer`
keeps Megatron's MambaMixer (parameters, init, TP layout) and replaces only its training path:
flash-linear-attention's Triton `causal_conv1d` (varlen via cu_seqlens; on unpacked rows it
measured as fast as cuDNN's depthwise conv, NOTES.md) -> mamba-ssm's `mamba_chunk_scan_combined`
(document boundaries via seq_idx) -> Megatron's gated RMSNorm.
When `causal_conv1d` imports, Megatron's fused path is used unchanged.
"""

from __future__ import annotations

import copy
import functools
import os
from contextlib import nullcontext
from typing import Optional

import torch
import torch.nn.functional as F

from megatron.core import parallel_state, tensor_parallel
from megatron.core.enums import ModelType
from megatron.core.extensions.transformer_engine import TENorm
from megatron.core.fp8_utils import get_fp8_context
from megatron.core.models.common.embeddings.language_model_embedding import LanguageModelEmbedding
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.models.common.language_module.language_module import LanguageModule
from megatron.core.models.hybrid.hybrid_layer_specs import hybrid_stack_spec
from megatron.core.models.hybrid.hybrid_model import HybridModel
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.ssm.mamba_mixer import MambaMixer
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker
from megatron.core.transformer.spec_utils import build_module
from megatron.core.transformer.transformer_layer import TransformerLayer

from megahybrid.config import Config, ConfigError
from megahybrid.megatron.gdn_guard import ensure_gdn_backward
from megahybrid.pattern import layout_string, parse, resolve_layers, stage_of
from megahybrid.megatron.transformer_config import (
    Precision,
    _activation,
    build_transformer_config,
    check_megatron,
    have_causal_conv1d,
    layer_config,
)


# ------------------------------------------------------------------------- process groups


def ensure_model_parallel(parallel=None, seed: int = 1234) -> None:
    """Initialise torch.distributed (one process unless launched by torchrun) and Megatron's
    parallel state once; Megatron's layers read their process groups from it."""
    if not torch.distributed.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
        rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        torch.distributed.init_process_group("nccl", rank=rank, world_size=world)
    if not parallel_state.model_parallel_is_initialized():
        p = parallel
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=p.tp if p else 1,
            pipeline_model_parallel_size=p.pp if p else 1,
            virtual_pipeline_model_parallel_size=p.vpp if p else None,
            expert_model_parallel_size=p.ep if p else 1,
            expert_tensor_parallel_size=(p.etp or p.tp) if p else 1,
            context_parallel_size=p.cp if p else 1,
        )
        tensor_parallel.model_parallel_cuda_manual_seed(seed)


# ----------------------------------------------------------------------------- Mamba mixer


@functools.cache
def _triton_mamba_mixer():
    """`TritonMambaMixer`, defined lazily (Megatron's MambaMixer imports mamba_ssm)."""
    from einops import rearrange
    from fla.modules.convolution import causal_conv1d
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

    class TritonMambaMixer(MambaMixer):
        """Megatron's MambaMixer whose training path runs on Triton kernels (module docstring)."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.use_mem_eff_path = True  # MambaMixer.forward -> our _ssm_training
            self.norm.eps = self.config.layernorm_epsilon  # Megatron fixes 1e-5; model.norm_eps rules

        def _ssm_training(self, zxBCdt, packed_seq_params=None):
            # Same math as MambaMixer._ssm_prefill's static path, with a varlen-aware conv.
            assert self.cp.cp_size == 1, "TritonMambaMixer: context parallelism is not wired"
            G, N, P = self.ngroups_local_tp, self.d_state, self.headdim
            d_inner = self.d_inner_local_tp
            zxBCdt = rearrange(zxBCdt, "l b d -> b l d").contiguous()
            z, xBC, dt = torch.split(zxBCdt, [d_inner, d_inner + 2 * G * N, self.nheads_local_tp], dim=-1)
            cu_seqlens = seq_idx = None
            if packed_seq_params is not None:
                cu_seqlens, seq_idx = packed_seq_params.cu_seqlens_q, packed_seq_params.seq_idx
            xBC, _ = causal_conv1d(x=xBC.contiguous(), weight=rearrange(self.conv1d_weight, "d 1 w -> d w"),
                                   bias=self.conv1d_bias, activation="silu", cu_seqlens=cu_seqlens)
            x, B, C = torch.split(xBC, [d_inner, G * N, G * N], dim=-1)
            y = mamba_chunk_scan_combined(
                rearrange(x, "b l (h p) -> b l h p", p=P).contiguous(), dt.contiguous(),
                -torch.exp(self.A_log.float()),
                rearrange(B, "b l (g n) -> b l g n", n=N).contiguous(),
                rearrange(C, "b l (g n) -> b l g n", n=N).contiguous(),
                self.chunk_size, D=self.D, z=None, dt_bias=self.dt_bias.float(), dt_softplus=True,
                seq_idx=seq_idx)
            y = rearrange(y, "b l h p -> l b (h p)").contiguous()
            z = rearrange(z, "b l d -> l b d").contiguous()
            return self.norm(y, z)

    return TritonMambaMixer


# ------------------------------------------------------------------------------- layer specs


def layer_specs(m) -> dict:
    """Pattern symbol -> Megatron ModuleSpec: Megatron's hybrid specs, with QK-norm added to
    attention and the Mamba mixer swapped for `TritonMambaMixer` when causal_conv1d is absent."""
    base = hybrid_stack_spec.submodules
    attention = copy.deepcopy(base.attention_layer)
    if m.attention.qk_norm:
        attention.submodules.self_attention.submodules.q_layernorm = TENorm
        attention.submodules.self_attention.submodules.k_layernorm = TENorm
    mamba = copy.deepcopy(base.mamba_layer)
    c = m.mamba2
    mamba.submodules.mixer.module = MambaMixer if have_causal_conv1d() else _triton_mamba_mixer()
    mamba.submodules.mixer.params = {"d_conv": c.conv_kernel, "dt_min": c.dt_min, "dt_max": c.dt_max,
                                     "dt_init_floor": c.dt_init_floor}
    return {"M": mamba, "G": base.gdn_layer, "*": attention, "-": base.mlp_layer, "E": base.moe_layer}


def layer_transformer_configs(tc, m, symbols) -> dict:
    """Per-symbol TransformerConfig: Megatron has one activation_func, but GDN uses it for its conv
    and output gate (silu), and MoE experts may use another activation than the dense MLP."""
    out = {s: tc for s in symbols}
    if "G" in symbols:
        out["G"] = layer_config(tc, activation_func=F.silu, gated_linear_unit=False, bias_activation_fusion=False)
    if "E" in symbols:
        act, glu = _activation(m.moe.activation)
        out["E"] = layer_config(tc, activation_func=act, gated_linear_unit=glu,
                                bias_activation_fusion=glu and act is F.silu)
    return out


# ------------------------------------------------------------------------------------ model


def _run_layer(layer, hidden, rotary_pos_emb=None, packed_seq_params=None):
    """One Megatron layer: TransformerLayer returns (hidden, context), MambaLayer the hidden states."""
    if isinstance(layer, TransformerLayer):
        return layer(hidden_states=hidden, attention_mask=None, rotary_pos_emb=rotary_pos_emb,
                     packed_seq_params=packed_seq_params)[0]
    return layer(hidden_states=hidden, attention_mask=None, packed_seq_params=packed_seq_params)


class Decoder(MegatronModule):
    """Our HybridStack: one layer per pattern symbol of this pipeline stage (`layers`), then the final
    norm on the last stage; FP8 contexts per layer. On a stage after the first, the input comes from
    the previous stage through `set_input_tensor` (Megatron's schedules call it)."""

    def __init__(self, tc, m, precision: Precision, pg, layers, post_process: bool = True,
                 recompute: str = "none", recompute_symbols: Optional[str] = None):
        super().__init__(config=tc)
        self.tp_group = pg.tp
        self.layer_specs = list(layers)
        self.post_process = post_process
        self.input_tensor = None
        symbols = {s.symbol for s in self.layer_specs}
        specs, configs = layer_specs(m), layer_transformer_configs(tc, m, symbols)
        self.bf16_positions = precision.bf16_positions(tc.num_layers)  # global pattern positions
        self.layers = torch.nn.ModuleList()
        for spec in self.layer_specs:  # global layer numbers: a layer's name does not depend on its stage
            extra = {"pp_layer_offset": 0} if spec.symbol == "M" else {"add_layer_offset": False}
            self.layers.append(build_module(specs[spec.symbol], config=configs[spec.symbol],
                                            layer_number=spec.index + 1, pg_collection=pg, **extra))
        if post_process:
            self.final_norm = TENorm(config=tc, hidden_size=tc.hidden_size, eps=tc.layernorm_epsilon)
        self.recompute_symbols = set()  # parallel.recompute=full: these layers rerun their forward in backward
        if recompute == "full":
            self.recompute_symbols = set(recompute_symbols or symbols)

    def set_input_tensor(self, input_tensor):
        self.input_tensor = input_tensor

    def forward(self, hidden, rotary_pos_emb=None, packed_seq_params=None):
        tc = self.config
        if hidden is None:  # a later pipeline stage: the previous stage's output
            hidden = self.input_tensor
        delayed = tc.fp8 is not None and tc.fp8_recipe == "delayed"
        with get_fp8_context(tc) if delayed else nullcontext():  # delayed scaling: one outer region
            for spec, layer in zip(self.layer_specs, self.layers):
                with self._quant_context(spec.index, delayed):
                    run = functools.partial(_run_layer, layer, rotary_pos_emb=rotary_pos_emb,
                                            packed_seq_params=packed_seq_params)
                    if self.training and spec.symbol in self.recompute_symbols:
                        # keep only the layer's input; rerun it in backward (RNG state restored by Megatron)
                        hidden = tensor_parallel.checkpoint(run, tc.distribute_saved_activations, hidden)
                    else:
                        hidden = run(hidden)
        return self.final_norm(hidden) if self.post_process else hidden

    def _quant_context(self, i: int, delayed: bool):
        """FP8 per layer (hybrid_block.py's inner context) except at bf16-pinned positions."""
        tc = self.config
        if tc.fp8 is None:
            return nullcontext()
        if i in self.bf16_positions:
            if not delayed:
                return nullcontext()
            import transformer_engine.pytorch as te

            return te.fp8_autocast(enabled=False)
        return nullcontext() if delayed else get_fp8_context(tc, i)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: Optional[dict] = None):
        """Distributed-checkpoint view, as stock `HybridStack.sharded_state_dict` builds it
        (hybrid_block.py): each layer's own sharded_state_dict (TP axes, Mamba/GDN in_proj split per
        component, experts on a global expert axis) under its *global* index `layers.{layer_number - 1}`.
        MegatronModule's default would treat the ModuleList's tensors as replicated, wrong for TP > 1."""
        from megatron.core.dist_checkpointing.utils import replace_prefix_for_sharding
        from megatron.core.transformer.utils import sharded_state_dict_default

        out = {}
        for local, layer in enumerate(self.layers):
            layer_sd = layer.sharded_state_dict(f"{prefix}layers.{local}.", [], metadata)
            replace_prefix_for_sharding(layer_sd, f"{prefix}layers.{local}.", f"{prefix}layers.{layer.layer_number - 1}.")
            out.update(layer_sd)
        if self.post_process:
            out.update(sharded_state_dict_default(self.final_norm, f"{prefix}final_norm.", sharded_offsets,
                                                  metadata, tp_group=self.tp_group))
        return out


class MegatronLM(LanguageModule):
    """`model(input_ids [B, T], seq_idx=None)` -> logits `[B, T, V]`; with `labels` -> per-token loss
    `[B, T]` through Megatron's `compute_language_model_loss`, as stock HybridModel computes it.

    One pipeline stage (`vp_stage` = its virtual chunk under VPP) of the model: the embedding on the
    first stage, the final norm and output layer on the last; a middle stage returns its hidden states
    `[T, B, hidden]` (Megatron's schedules move them). Under TP the output layer keeps the vocabulary
    sharded (the loss is vocab-parallel); returned logits are gathered."""

    def __init__(self, config: Config, precision: Precision, vp_stage: Optional[int] = None):
        m = config.model
        tc = build_transformer_config(config, precision)
        pg = ProcessGroupCollection.use_mpu_process_groups()
        super().__init__(config=tc, pg_collection=pg)
        self.model_config = m
        self.precision = precision
        self.vp_stage = vp_stage
        self.model_type = ModelType.encoder_or_decoder  # read by Megatron's schedules
        vpp = config.parallel.vpp or 1
        pp_rank, pp = pg.pp.rank(), pg.pp.size()
        self.pre_process = pp_rank == 0 and (vp_stage or 0) == 0
        self.post_process = pp_rank == pp - 1 and (vp_stage or 0) == vpp - 1
        self.share_embeddings_and_output_weights = m.tie_embeddings
        if self.pre_process:
            self.embedding = LanguageModelEmbedding(config=tc, vocab_size=m.vocab_size,
                                                    max_sequence_length=m.max_seq_len,
                                                    position_embedding_type="none", tp_group=pg.tp)
        a = m.attention
        layers = stage_layers(config, pp_rank, pp, vp_stage)
        self.rotary_pos_emb = None
        if any(s.symbol == "*" for s in layers) and a.rope_theta > 0:
            self.rotary_pos_emb = RotaryEmbedding(kv_channels=tc.kv_channels, rotary_percent=a.rotary_fraction,
                                                  rotary_base=a.rope_theta, cp_group=pg.cp)
        p = config.parallel
        self.decoder = Decoder(tc, m, precision, pg, layers, self.post_process, p.recompute, p.recompute_symbols)
        if self.post_process:
            self.output_layer = tensor_parallel.ColumnParallelLinear(
                tc.hidden_size, m.vocab_size, config=tc, init_method=tc.init_method, bias=False,
                gather_output=False, skip_weight_param_allocation=self.pre_process and m.tie_embeddings,
                tp_group=pg.tp)
        if self.pre_process or self.post_process:  # tied head on the last stage: a copy kept in sync
            self.setup_embeddings_and_output_layer()

    def set_input_tensor(self, input_tensor) -> None:
        """The previous pipeline stage's output (Megatron's schedules pass a one-element list)."""
        if isinstance(input_tensor, (list, tuple)):
            input_tensor = input_tensor[0] if input_tensor else None
        self.decoder.set_input_tensor(input_tensor)

    def forward(self, input_ids: torch.Tensor, seq_idx: Optional[torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None):
        m = self.model_config
        B, T = input_ids.shape
        get_moe_metrics_tracker().clear()  # aux_loss() reports this forward (this stage's layers) only
        packed = None
        if seq_idx is not None:  # rows and documents -> one THD row with cu_seqlens
            packed = packed_seq_params(seq_idx)
            input_ids = input_ids.reshape(1, B * T)
            labels = None if labels is None else labels.reshape(1, B * T)
        hidden = None
        if self.pre_process:
            hidden = self.embedding(input_ids=input_ids, position_ids=None)  # [s, b, h] (s / tp under SP)
            if m.embedding_scale != 1.0:
                hidden = hidden * m.embedding_scale
        rope = None
        if self.rotary_pos_emb is not None:  # the full length, also when SP shards the hidden states
            rope = self.rotary_pos_emb(input_ids.shape[1], packed_seq=packed is not None)
        hidden = self.decoder(hidden, rope, packed)
        if not self.post_process:
            return hidden
        weight = self.shared_embedding_or_output_weight() if m.tie_embeddings else None
        logits, _ = self.output_layer(hidden, weight=weight)  # [s, b, V / tp]
        if m.logit_scale != 1.0:
            logits = logits * m.logit_scale
        if m.logit_softcap:
            logits = m.logit_softcap * torch.tanh(logits / m.logit_softcap)
        if labels is not None:
            return self.compute_language_model_loss(labels, logits).reshape(B, T)
        logits = tensor_parallel.gather_from_tensor_model_parallel_region(logits, group=self.pg_collection.tp)
        return logits.transpose(0, 1).reshape(B, T, -1)

    def aux_loss(self) -> torch.Tensor:
        """Weighted MoE load-balancing + z-loss of the last forward (of this pipeline stage's layers),
        *detached*: Megatron already adds their gradients in backward (MoEAuxLossAutoScaler), so adding
        this value to the loss changes only the reported number - and the sum equals the reference
        backend's loss."""
        moe = self.model_config.moe
        total = torch.zeros((), device=torch.cuda.current_device())
        metrics = get_moe_metrics_tracker().metrics
        for name, coeff in (("load_balancing_loss", moe.aux_loss_coeff), ("z_loss", moe.z_loss_coeff)):
            if name in metrics and coeff:
                total = total + coeff * metrics[name].values.float().sum()
        return total.detach()


def packed_seq_params(seq_idx: torch.Tensor) -> PackedSeqParams:
    """`seq_idx [B, T]` (megahybrid's packing) -> THD params over the flattened `[1, B*T]` row: a new
    document starts at every change of seq_idx and at every row start. cu_seqlens reach TE attention
    and FLA's kernels (conv, GDN); seq_idx reaches mamba-ssm's scan."""
    B, T = seq_idx.shape
    starts = torch.ones_like(seq_idx, dtype=torch.bool)
    starts[:, 1:] = seq_idx[:, 1:] != seq_idx[:, :-1]
    starts = starts.flatten()
    begin = torch.nonzero(starts).flatten()
    cu = torch.cat([begin, begin.new_tensor([B * T])]).to(torch.int32)
    max_len = int((cu[1:] - cu[:-1]).max())
    doc = (torch.cumsum(starts.int(), 0) - 1).to(torch.int32)[None]
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=max_len,
                           max_seqlen_kv=max_len, seq_idx=doc)


def stage_layers(config, pp_rank: int = 0, pp: int = 1, vp_stage: Optional[int] = None) -> list:
    """The LayerSpecs pipeline rank `pp_rank` (virtual stage `vp_stage`) builds: '|' segments as written
    or placed by parallel.pp_balance=flops, else equal layer counts (pattern.stage_of: Megatron's
    `select_pipeline_segment`)."""
    specs = resolve_layers(config)
    n_segments = max(s.segment for s in specs) + 1
    return [s for s in specs if stage_of(s, n_segments, len(specs), pp) == (pp_rank, vp_stage or 0)]


def build_megatron_model(config, precision: Optional[Precision] = None) -> MegatronLM:
    """`Config` -> `MegatronLM` on the current CUDA device (initialises parallel state if needed):
    this rank's pipeline stage, the whole model without PP. Under parallel.vpp a rank holds several
    chunks: `build_megatron_chunks`.

    precision None: bf16 parameters (float32 when `config.train.dtype` is float32), no FP8."""
    vpp = getattr(getattr(config, "parallel", None), "vpp", None)
    if vpp:  # before building anything
        raise ConfigError(f"parallel.vpp={vpp}: a rank holds several model chunks; build them with "
                          "build_megatron_chunks (megahybrid/megatron/step.py trains them)")
    return build_megatron_chunks(config, precision)[0]


def build_megatron_chunks(config, precision: Optional[Precision] = None) -> list[MegatronLM]:
    """This rank's model chunks, one per virtual pipeline stage (one without parallel.vpp)."""
    if not isinstance(config, Config):
        from megahybrid import load_config

        config = Config(model=config) if type(config).__name__ == "ModelConfig" else load_config(config)
    if precision is None:
        precision = Precision(torch.float32 if config.train.dtype == "float32" else torch.bfloat16)
    if not torch.cuda.is_available():
        raise ConfigError("train.backend='megatron': Megatron-Core's layers need a CUDA GPU and none is "
                          "visible; use backend='reference' on CPU")
    specs = check_megatron(config, precision)
    if any(s.symbol == "G" for s in specs):
        ensure_gdn_backward()
    ensure_model_parallel(config.parallel, config.train.seed)
    vpp = config.parallel.vpp
    device = torch.cuda.current_device()  # as Megatron-LM's get_model: a few buffers start on the CPU
    return [MegatronLM(config, precision, vp_stage=v).cuda(device) for v in (range(vpp) if vpp else [None])]


def build_stock_hybrid_model(config, precision: Optional[Precision] = None, fused_loss: bool = False):
    """The baseline: Megatron's own `HybridModel` from its own `hybrid_stack_spec`, same pattern and
    sizes, same TransformerConfig (so only the model assembly and the Mamba path differ) except the
    loss, which keeps Megatron's default (unfused, `cross_entropy_loss_fusion=False`) unless
    `fused_loss`, so the benchmark can show both."""
    precision = precision or Precision()
    ensure_model_parallel(config.parallel, config.train.seed)
    m = config.model
    tc = build_transformer_config(config, precision, cross_entropy_loss_fusion=fused_loss)
    pattern = parse(layout_string(m)[0]).main
    return HybridModel(config=tc, hybrid_stack_spec=hybrid_stack_spec, vocab_size=m.vocab_size,
                       max_sequence_length=m.max_seq_len, hybrid_layer_pattern=pattern,
                       share_embeddings_and_output_weights=m.tie_embeddings,
                       position_embedding_type="rope" if "*" in pattern else "none",
                       rotary_percent=m.attention.rotary_fraction, rotary_base=int(m.attention.rope_theta))
