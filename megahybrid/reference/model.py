"""The reference LM: embedding, one pre-norm residual sublayer per pattern symbol, final norm, head.

It knows nothing of parallelism (style.md rule 5): it is the numerical oracle for the Megatron
backend and every parallel layout, the CPU training path and the basis of HF export.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from megahybrid.config import ConfigError
from megahybrid.mixers import REGISTRY
from megahybrid.mixers.common import linear, make_norm
from megahybrid.pattern import LayerSpec, resolve_layers


class Block(nn.Module):
    """x + mixer(norm(x)): one symbol of the pattern (Megatron's sublayer convention); with
    `post_norm` x + norm(mixer(x)) (`model.post_norm_layers`, OLMo2-style).

    Two variations a mixer declares (Zamba2's hybrid layer, mixers/shared_attention.py):
    `reads_embeddings`: it gets concat(x, embeddings) without this block's norm (it has none) and
    normalises the pair itself; `feeds_next_input`: x passes unchanged and the output is returned as
    `carry`, which the next block adds to its input before its norm but not to its residual.

    Side streams (GoldFinch's compressed KV cache, mixers/goldfinch.py; RWKV-7's v_first, mixers/rwkv7.py):
    per-forward tensors that later layers read. `side_inputs` (stream names): concat(norm(x), *streams) is the mixer's input;
    `side_output` (a stream name): the mixer returns concat(y, s), y goes to the residual and s is
    stored as that stream. "embeddings" (the embedding output) is always a stream; so is "token_ids" (the
    input ids), which a mixer with `reads_token_ids` (Engram) gets as a `token_ids=` argument instead.
    Concatenating keeps the streams inside the mixer contract: packed documents and state pieces split
    them with x. In a post-norm block the streams join the un-normed x and the norm follows the mixer."""

    def __init__(self, config, spec: LayerSpec, shared: dict, post_norm: bool = False, routed: bool = False):
        super().__init__()
        self.spec = spec
        self.residual_scale = config.residual_scale
        self.post_norm = post_norm
        self.norm = make_norm(config)
        self.mixer = REGISTRY[spec.symbol].cls()(config, index=spec.index, shared=shared)
        self.reads_embeddings = getattr(self.mixer, "reads_embeddings", False)
        self.feeds_next_input = getattr(self.mixer, "feeds_next_input", False)
        self.side_inputs = tuple(getattr(self.mixer, "side_inputs", ()))
        self.side_output = getattr(self.mixer, "side_output", None)
        self.reads_token_ids = getattr(self.mixer, "reads_token_ids", False)  # Engram (mixers/engram.py)
        if self.reads_embeddings:
            self.norm = None
        self.mod = None  # Mixture-of-Depths router when `routed` (model.mod.layers; blocks/mixture_of_depths.py)
        if routed:
            from megahybrid.blocks.mixture_of_depths import MixtureOfDepths
            r = config.mod
            self.mod = MixtureOfDepths(config.hidden_size, r.capacity, r.routing, r.threshold, r.aux_loss_coeff,
                                       config.init_std)

    def forward(self, x, state=None, seq_idx=None, need_state=True, embeddings=None, carry=None, streams=None):
        """-> (x, state, carry); carry is None unless the mixer `feeds_next_input`. `streams`: the
        side-stream dict of this forward (read and written in place)."""
        h = x if carry is None else x + carry
        if self.reads_embeddings:
            y, state = self.mixer(torch.cat([h, embeddings], dim=-1), state, seq_idx, need_state)
        elif self.reads_token_ids:  # the mixer takes this forward's token ids (streams["token_ids"])
            y, state = self.mixer(self.norm(h), state, seq_idx, need_state, token_ids=streams["token_ids"])
        elif self.side_inputs or self.side_output:
            streams = {"embeddings": embeddings} if streams is None else streams
            u = torch.cat([h if self.post_norm else self.norm(h), *(streams[k] for k in self.side_inputs)], dim=-1)
            y, state = self.mixer(u, state, seq_idx, need_state)
            if self.side_output:
                streams[self.side_output] = y[..., x.shape[-1]:]
                y = y[..., :x.shape[-1]]
            if self.post_norm:
                y = self.norm(y)
        elif self.post_norm:
            y, state = self.mixer(h, state, seq_idx, need_state)
            y = self.norm(y)
        else:
            y, state = self.branch(h, state, seq_idx, need_state)
        y = y if self.residual_scale == 1.0 else self.residual_scale * y
        return (x, state, y) if self.feeds_next_input else (x + y, state, None)

    def branch(self, h, state=None, seq_idx=None, need_state=True):
        """The plain pre-norm residual branch -> (mixer(norm(h)), state), through the Mixture-of-Depths
        router when this block has one (channel blocks only: no state, no document boundaries)."""
        if self.mod is not None:
            return self.mod(h, lambda u: self.mixer(self.norm(u), None, None, False)[0]), None
        return self.mixer(self.norm(h), state, seq_idx, need_state)


class ReferenceLM(nn.Module):
    """`model(input_ids)` -> logits `[batch, seq, vocab]`.

    `seq_idx` (`[batch, seq]`) marks packed documents; `state` is a list with one entry per layer
    (returned when `return_state=True`) so generation can continue a sequence."""

    def __init__(self, config):
        super().__init__()
        m = getattr(config, "model", config)
        self.config = m
        self.specs = resolve_layers(config)
        mtp = [s for s in self.specs if s.mtp_depth]
        if mtp:
            raise ConfigError(f"model.pattern: multi-token prediction ('/' part, {len(mtp)} layers) is not "
                              "built by the reference backend yet; remove the '/...' part")
        self.embedding = nn.Embedding(m.vocab_size, m.hidden_size)
        nn.init.normal_(self.embedding.weight, std=m.init_std)
        shared: dict = {}
        post_norm = set(m.post_norm_layers or ())
        routed = set(m.mod.layers)
        self.layers = nn.ModuleList(Block(m, spec, shared, i in post_norm, i in routed)
                                    for i, spec in enumerate(self.specs))
        self.hyper = None  # mHC stream read/write/mix per block (model.hyper_connections; blocks/hyper_connections.py)
        if m.hyper_connections.streams > 1:
            from megahybrid.blocks.hyper_connections import HyperConnection, check_blocks, check_hyper_connections
            hc = m.hyper_connections
            check_hyper_connections(m)
            check_blocks(self.layers, hc.streams)
            self.hyper = nn.ModuleList(HyperConnection(m.hidden_size, hc.streams, hc.dynamic, hc.sinkhorn_iters,
                                                       m.norm_eps) for _ in self.layers)
        if self.layers[-1].feeds_next_input:
            raise ConfigError(f"model.pattern: the last layer {self.specs[-1].symbol!r} feeds the next layer's input "
                              "(shared_attention.output_to=next_input) but none follows; end on another layer")
        self.final_norm = make_norm(m)
        self.lm_head = None if m.tie_embeddings else linear(m.hidden_size, m.vocab_size, m.init_std)

    def forward(self, input_ids: torch.Tensor, seq_idx: Optional[torch.Tensor] = None,
                state: Optional[list] = None, return_state: bool = False):
        x = self.embed(input_ids)
        new_state = []
        embeddings, carry = x, None  # the embedding output (for `reads_embeddings`) and a `feeds_next_input` output
        streams = {"embeddings": embeddings, "token_ids": input_ids}  # side streams (Block docstring)
        if self.hyper is not None:
            from megahybrid.blocks.hyper_connections import collapse_streams, expand_streams
            x = expand_streams(x, self.config.hyper_connections.streams)  # [batch, seq, n, hidden]
        for i, layer in enumerate(self.layers):
            if self.hyper is not None:  # mHC: the layer's branch between a stream read and a stream write
                x, s = self.hyper[i](x, lambda h, layer=layer, i=i: layer.branch(
                    h, None if state is None else state[i], seq_idx, return_state))
                new_state.append(s)
                continue
            x, s, carry = layer(x, None if state is None else state[i], seq_idx, return_state, embeddings, carry,
                                streams)
            new_state.append(s)
        if self.hyper is not None:
            x = collapse_streams(x)
        logits = self.head(x)
        return (logits, new_state) if return_state else logits

    # Both ends act per token; context parallelism (megahybrid/parallel/model.py) reuses them.
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token ids -> the first layer's input (embedding, times `embedding_scale`)."""
        x = self.embedding(input_ids)
        return x * self.config.embedding_scale if self.config.embedding_scale != 1.0 else x

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """The last layer's output -> logits: final norm, lm_head (or tied embedding), logit scale, softcap."""
        m = self.config
        x = self.final_norm(x)
        weight = self.embedding.weight if self.lm_head is None else self.lm_head.weight
        logits = x @ weight.t()
        if m.logit_scale != 1.0:
            logits = logits * m.logit_scale
        if m.logit_softcap:
            logits = m.logit_softcap * torch.tanh(logits / m.logit_softcap)
        return logits

    def aux_loss(self) -> torch.Tensor:
        """Sum of the weighted auxiliary losses (MoE load balancing) of the last forward."""
        losses = [layer.mixer.aux_loss for layer in self.layers
                  if isinstance(getattr(layer.mixer, "aux_loss", None), torch.Tensor)]
        losses += [layer.mod.aux_loss for layer in self.layers  # Mixture-of-Depths router BCE (topk routing)
                   if layer.mod is not None and isinstance(layer.mod.aux_loss, torch.Tensor)]
        return torch.stack(losses).sum() if losses else self.embedding.weight.new_zeros(())
