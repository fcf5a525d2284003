"""The checks every Hugging Face architecture's conversion test runs (issue 9):

1. a tiny random transformers model (all parameters perturbed, so a norm stored as `w` vs `1 + w`
   or a swapped projection cannot hide behind HF's ones/zeros init) is saved with `save_pretrained`;
2. `megahybrid convert --to megahybrid` -> `ReferenceLM` logits == HF logits (float32);
3. `megahybrid convert --to hf` -> transformers loads it with no missing, unexpected or mismatched
   keys, and its logits == the original HF logits again.

transformers is imported with `sys.modules["fla"] = None`: otherwise it binds FLA's Triton kernels
at import time and fails on a CPU (shared/notes/hf-conversion.md).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

LOGITS_ATOL = 1e-4
"""Issue 9's bound: max |logit difference| in float32."""


def assert_logits(name: str, ref: torch.Tensor, out: torch.Tensor, atol: float = LOGITS_ATOL) -> None:
    """Absolute max difference (the issue's bound), with the worst element in the message."""
    assert ref.shape == out.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    assert torch.isfinite(ref).all() and torch.isfinite(out).all(), f"{name}: NaN/Inf in the logits"
    diff = (out.double() - ref.double()).abs()
    worst = float(diff.max())
    if os.environ.get("MEGAHYBRID_REPORT"):  # `MEGAHYBRID_REPORT=1 pytest -s tests/cpu/convert`: the README's numbers
        print(f"\n[logits] {os.environ.get('PYTEST_CURRENT_TEST', '').split(' ')[0]} {name}: max |diff| {worst:.1e}")
    if not worst <= atol:
        idx = tuple(int(i) for i in torch.unravel_index(diff.argmax(), diff.shape))
        raise AssertionError(f"{name}: max |diff| {worst:.3e} > {atol:.0e} (max |logit| "
                             f"{float(ref.abs().max()):.2f}); worst at {idx}: ref={float(ref[idx]):.6e} "
                             f"out={float(out[idx]):.6e}")


def transformers():
    """transformers, imported with FLA's (GPU-only) kernels kept out."""
    sys.modules["fla"] = None  # tests/conftest.py restores it after the test
    import transformers as tf

    return tf


def perturb(model: torch.nn.Module, scale: float = 0.05, seed: int = 0) -> None:
    """Add seeded noise to every parameter (in place)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


def tokens(vocab_size: int, batch: int = 2, seq: int = 24, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seed))


def hf_logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits.float()


def roundtrip(tmp_path: Path, hf_model, seq: int = 24, atol: float = LOGITS_ATOL, perturb_scale: float = 0.05,
              arch: str | None = None):
    """HF model -> megahybrid -> HF, checking logits at each step. Returns the megahybrid model."""
    from megahybrid.convert import convert, load_reference

    tf = transformers()
    hf_model = hf_model.float().eval()
    if perturb_scale:
        perturb(hf_model, perturb_scale)
    ids = tokens(hf_model.config.vocab_size, seq=seq)
    expected = hf_logits(hf_model, ids)
    assert torch.isfinite(expected).all()

    hf_dir, mh_dir, back_dir = tmp_path / "hf", tmp_path / "megahybrid", tmp_path / "hf_back"
    hf_model.save_pretrained(hf_dir)
    convert(hf_dir, mh_dir, to="megahybrid")
    ours, _ = load_reference(mh_dir)
    with torch.no_grad():
        got = ours(ids).float()
    assert_logits("megahybrid logits vs HF", expected, got, atol)

    convert(mh_dir, back_dir, to="hf", arch=arch)
    loaded, info = tf.AutoModelForCausalLM.from_pretrained(back_dir, output_loading_info=True,
                                                             dtype=torch.float32)
    problems = {k: v for k, v in info.items() if v and k != "error_msgs"} | (
        {"error_msgs": info["error_msgs"]} if info.get("error_msgs") else {})
    assert not problems, f"transformers reloading the export: {problems}"
    assert_logits("exported HF logits vs original HF", expected, hf_logits(loaded.eval(), ids), atol)
    return ours
