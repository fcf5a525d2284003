"""The comparison helpers for the whole suite (style.md rule 2)."""

from __future__ import annotations

import torch


def rel_error(ref: torch.Tensor, out: torch.Tensor) -> float:
    """max|out - ref| / max(max|ref|, tiny), computed in float64."""
    ref64, out64 = ref.detach().double(), out.detach().double()
    denom = ref64.abs().max().clamp_min(1e-30)
    return float((out64 - ref64).abs().max() / denom)


def norm_rel_error(ref: torch.Tensor, out: torch.Tensor) -> float:
    """|out - ref| / |ref| in the 2-norm, float64; NaN counts as infinitely wrong (a bf16 router may flip
    a near-tied expert choice for one token, which a max-norm turns into a failure of the whole tensor)."""
    ref64, out64 = ref.detach().double(), out.detach().double()
    err = float((out64 - ref64).norm() / ref64.norm().clamp_min(1e-30))
    return err if err == err else float("inf")


def assert_close(name: str, ref: torch.Tensor, out: torch.Tensor, rtol: float) -> None:
    """Fail if shapes differ, anything is NaN/Inf, or the relative error exceeds `rtol`;
    the message names the tensor and shows the worst element. Two empty tensors of the same
    shape (e.g. a window-1 KV cache) are equal."""
    assert ref.shape == out.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    if ref.numel() == 0:
        return
    assert torch.isfinite(out).all(), f"{name}: output has NaN/Inf"
    assert torch.isfinite(ref).all(), f"{name}: reference has NaN/Inf"
    err = rel_error(ref, out)
    if not err <= rtol:
        diff = (out.detach().double() - ref.detach().double()).abs()
        idx = tuple(int(i) for i in torch.unravel_index(diff.argmax(), diff.shape))
        raise AssertionError(
            f"{name}: relative error {err:.3e} > {rtol:.1e}; worst at {idx}: "
            f"ref={float(ref[idx]):.6e} out={float(out[idx]):.6e}")
