"""mHC: manifold-constrained hyper-connections (Xie et al. 2025, arXiv 2512.24880).

The residual stream is widened to n streams X = [x_1 .. x_n] (each [.., C]). Around a sublayer F:

    h      = sum_j pre_j x_j                        (the sublayer reads a mix of the streams)
    x_i'   = sum_j H_ij x_j + post_i F(h)           (streams mixed by H, output written with weights)

H is doubly stochastic: Sinkhorn-Knopp on exp(logits), so mixing never grows or shrinks the residual
in total (the paper's point). Static: logits, pre and post are learned per layer; dynamic: each also
gets alpha * (RMSNorm(flatten X) @ W) per token, with alpha initialised at 0 (the paper's small gate).

Init (and the reason pre uses a softmax where the paper has a sigmoid): pre = softmax(0) = 1/n,
post = 2 sigmoid(0) = 1, H = Sinkhorn(all ones) = 1/n everywhere. The model copies the embedding
into every stream and reads out the streams' mean, so at init every stream equals the plain
residual x + F(norm x) and the model equals the plain one exactly; n = 1 is the plain residual.
Everything here acts per token, so it keeps the sublayers' causality and packed-document handling.
"""

from __future__ import annotations

import torch
from torch import nn


def sinkhorn(logits: torch.Tensor, iters: int = 20) -> torch.Tensor:
    """Doubly-stochastic matrix from `[..., n, n]` logits: alternate row and column normalisation of
    exp(logits - max) (Sinkhorn-Knopp; the paper uses 20 iterations). Columns sum to 1 exactly after
    the last step, rows to within the convergence error."""
    m = torch.exp(logits - logits.amax(dim=(-2, -1), keepdim=True))
    for _ in range(iters):
        m = m / m.sum(dim=-1, keepdim=True)
        m = m / m.sum(dim=-2, keepdim=True)
    return m


class HyperConnection(nn.Module):
    """The stream read/write/mix around one sublayer; `forward(streams, branch)` -> new streams.

    `streams`: [batch, seq, n, C]; `branch`: h [batch, seq, C] -> (F(h), state)."""

    def __init__(self, hidden_size: int, streams: int, dynamic: bool, sinkhorn_iters: int, norm_eps: float):
        super().__init__()
        n = streams
        self.n, self.iters, self.dynamic, self.eps = n, sinkhorn_iters, dynamic, norm_eps
        self.pre_logits = nn.Parameter(torch.zeros(n))
        self.post_logits = nn.Parameter(torch.zeros(n))
        self.res_logits = nn.Parameter(torch.zeros(n, n))
        if dynamic:
            self.norm_weight = nn.Parameter(torch.ones(n * hidden_size))
            self.proj = nn.Parameter(torch.randn(n * hidden_size, n + n + n * n) * (n * hidden_size) ** -0.5)
            self.alpha = nn.Parameter(torch.zeros(3))  # pre, post, res gates; 0 = static at init

    def coefficients(self, streams: torch.Tensor):
        """-> pre [.., n], post [.., n], H [.., n, n] (broadcast over batch and seq when static)."""
        n = self.n
        pre, post, res = self.pre_logits, self.post_logits, self.res_logits
        if self.dynamic:
            flat = streams.flatten(-2)
            flat = flat * torch.rsqrt(flat.pow(2).mean(-1, keepdim=True) + self.eps) * self.norm_weight
            d = flat @ self.proj
            pre = pre + self.alpha[0] * d[..., :n]
            post = post + self.alpha[1] * d[..., n:2 * n]
            res = res + self.alpha[2] * d[..., 2 * n:].unflatten(-1, (n, n))
        return torch.softmax(pre, -1), 2 * torch.sigmoid(post), sinkhorn(res, self.iters)

    def forward(self, streams: torch.Tensor, branch):
        pre, post, mix = self.coefficients(streams)
        h = torch.einsum("...j,...jc->...c", pre.to(streams.dtype), streams)
        y, state = branch(h)
        out = torch.einsum("...ij,...jc->...ic", mix.to(streams.dtype), streams)
        return out + post.to(streams.dtype).unsqueeze(-1) * y.unsqueeze(-2), state


def expand_streams(x: torch.Tensor, n: int) -> torch.Tensor:
    """[.., C] -> [.., n, C]: every stream starts as the embedding output."""
    return x.unsqueeze(-2).expand(*x.shape[:-1], n, x.shape[-1]).contiguous()


def collapse_streams(streams: torch.Tensor) -> torch.Tensor:
    """[.., n, C] -> [.., C]: the streams' mean (equals the plain residual at init)."""
    return streams.mean(-2)


def check_hyper_connections(m) -> None:
    """One-line errors for settings that conflict with mHC owning the residual (config.validate calls it)."""
    from megahybrid.config import fail

    hc = m.hyper_connections
    if hc.streams < 1:
        fail("model.hyper_connections.streams", hc.streams, "must be >= 1 (1 = the plain residual)")
    if hc.sinkhorn_iters < 1:
        fail("model.hyper_connections.sinkhorn_iters", hc.sinkhorn_iters, "must be >= 1")
    if hc.streams == 1:
        return
    if m.residual_scale != 1.0:
        fail("model.residual_scale", m.residual_scale, "mHC (model.hyper_connections.streams > 1) owns the residual "
             "weights (its post coefficients); set it to 1.0 or streams to 1")
    if m.post_norm_layers:
        fail("model.post_norm_layers", m.post_norm_layers, "mHC (model.hyper_connections.streams > 1) wraps pre-norm "
             "blocks only; set it to null or streams to 1")


def check_blocks(blocks, streams: int) -> None:
    """Refuse blocks whose mixer manages its own residual or side streams (the mixers set these per
    config, so the check runs on the built blocks)."""
    from megahybrid.config import fail

    for b in blocks:
        if (b.reads_embeddings or b.feeds_next_input or b.side_inputs or b.side_output
                or getattr(b, "reads_token_ids", False)):
            fail("model.hyper_connections.streams", streams, f"layer {b.spec.index} ({b.spec.symbol!r}) manages its "
                 "own residual or side streams (embeddings, token-id, next-input or side-stream mixers); set streams "
                 "to 1 or remove that layer")
