"""FLOPs per token and MFU.

Convention (Megatron-LM `num_floating_point_operations`, megatron/training/training.py): a
multiply-add is 2 FLOPs; a training step costs 3x the forward (forward, dgrad, wgrad); causal
attention counts half of the score matrix ("causal half-square"). `causal=False` gives the
full-square count some papers use. Each layer type's forward count lives with its mixer
(`Mixer.flops_per_token`); this module adds the LM head and turns counts into MFU.
"""

from __future__ import annotations

from typing import Optional

from megahybrid.mixers import REGISTRY
from megahybrid.pattern import resolve_layers

TRAIN_FACTOR = 3
"""forward + backward (data grad) + backward (weight grad), each one forward's matmul work."""

PEAK_BF16_FLOPS = {
    # Dense BF16 tensor-core peaks from NVIDIA's datasheets (no sparsity).
    "H100": 989e12,
    "H200": 989e12,
    "A100": 312e12,
}


def layer_flops_per_token(config, spec, seq_len: int, causal: bool = True) -> float:
    m = getattr(config, "model", config)
    return float(REGISTRY[spec.symbol].cls().flops_per_token(m, seq_len, causal))


def head_flops_per_token(config) -> float:
    m = getattr(config, "model", config)
    return 2.0 * m.hidden_size * m.vocab_size


def model_flops_per_token(config, seq_len: Optional[int] = None, causal: bool = True) -> float:
    """Forward FLOPs per token of the whole model (layers + logits), Megatron's convention."""
    if seq_len is None:
        seq_len = config.train.seq_len if hasattr(config, "train") else config.max_seq_len
    specs = resolve_layers(config)
    return sum(layer_flops_per_token(config, s, seq_len, causal) for s in specs) + head_flops_per_token(config)


def peak_flops(device_name: str) -> Optional[float]:
    """Dense BF16 peak for a CUDA device name, or None when unknown (e.g. CPU)."""
    for key, value in PEAK_BF16_FLOPS.items():
        if key in device_name:
            return value
    return None


def mfu(tokens_per_s: float, flops_per_token: float, peak: Optional[float]) -> Optional[float]:
    """Model FLOPs utilisation of a training run (3x forward FLOPs per token)."""
    if not peak:
        return None
    return tokens_per_s * TRAIN_FACTOR * flops_per_token / peak
