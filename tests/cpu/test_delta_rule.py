"""Helpers shared by test_deltanet.py and test_gated_deltanet.py (this file holds no tests):
random delta-rule inputs, FLA's naive references, randomised layers, and the comparison against
HF transformers' Qwen3.5 GatedDeltaNet layer run in a subprocess where `fla` cannot import.
The mixer-contract checks (pieces, packing, gradients) are in tests/mixer_checks.py."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from megahybrid.mixers.common import l2norm
from tests.helpers import assert_close

ROOT = Path(__file__).resolve().parents[2]


def delta_inputs(B=2, T=75, H=3, dk=8, dv=12, gated=True, seed=0, dtype=torch.float64):
    """q, k (unit norm, as the mixers feed them), v, beta in (0, 1), log-decay g < 0 (None if not
    gated) and a non-zero initial state [B, H, dk, dv]."""
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *s: torch.randn(*s, generator=gen, dtype=dtype)  # noqa: E731
    return dict(q=rand(B, T, H, dk), k=l2norm(rand(B, T, H, dk)), v=rand(B, T, H, dv),
                beta=torch.sigmoid(rand(B, T, H)),
                g=F.logsigmoid(rand(B, T, H) + 2.0) if gated else None,  # decays in ~(0.5, 1)
                initial_state=0.5 * rand(B, H, dk, dv))


def fla_naive(op: str):
    """FLA's plain-PyTorch reference `fla/ops/<op>/naive.py`, loaded from its file: `import fla`
    pulls in every Triton kernel (~6 s on this CPU), while the naive files need only torch + einops."""
    package = Path(importlib.util.find_spec("fla").submodule_search_locations[0])
    spec = importlib.util.spec_from_file_location(f"fla_naive_{op}", package / "ops" / op / "naive.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def to_bhtd(t):
    """[B, T, H, ...] -> [B, H, T, ...] (FLA's delta_rule naive layout)."""
    return t.transpose(1, 2).contiguous()


# --------------------------------------------------------------------------- module weights


def randomize_(module: torch.nn.Module, seed: int = 0, std: float = 0.3) -> torch.nn.Module:
    """Float64, and every weight N(0, std) so no output is near-trivial (init std 0.02 and norm
    weights of 1 would hide mistakes); A_log/dt_bias keep their realistic init ranges."""
    module.double()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name not in ("A_log", "dt_bias"):
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * std)
    return module


# ------------------------------------------------------------- HF Qwen3.5 (independent model)


def to_qwen3_5(sd: dict, num_v_heads: int) -> dict:
    """Our DeltaNet / GatedDeltaNet state dict -> HF `Qwen3_5GatedDeltaNet` keys. DeltaNet has no
    decay: A_log = -inf makes g = -exp(A_log) * softplus(.) = 0, i.e. the ungated delta rule."""
    cat = lambda *names: torch.cat([sd[n] for n in names])  # noqa: E731
    like = sd["b_proj.weight"]
    return {
        "in_proj_qkv.weight": cat("q_proj.weight", "k_proj.weight", "v_proj.weight"),
        "in_proj_z.weight": sd["g_proj.weight"],
        "in_proj_b.weight": sd["b_proj.weight"],
        "in_proj_a.weight": sd.get("a_proj.weight", torch.zeros_like(like)),
        "conv1d.weight": cat("q_conv1d.weight", "k_conv1d.weight", "v_conv1d.weight"),
        "A_log": sd.get("A_log", torch.full((num_v_heads,), -torch.inf, dtype=like.dtype)),
        "dt_bias": sd.get("dt_bias", torch.zeros(num_v_heads, dtype=like.dtype)),
        "norm.weight": sd["o_norm.weight"],
        "out_proj.weight": sd["o_proj.weight"],
    }


def _hf_worker(spec: dict) -> None:
    """Runs in the subprocess (fla already blocked): build ours and HF's layer on the same weights,
    check that HF really took its torch path, and compare full-sequence outputs."""
    from transformers.models.qwen3_5 import modeling_qwen3_5 as hf
    from transformers.models.qwen3_5.configuration_qwen3_5 import Qwen3_5TextConfig

    from megahybrid.config import DeltaNetConfig, GatedDeltaNetConfig, ModelConfig
    from megahybrid.mixers.deltanet import DeltaNet
    from megahybrid.mixers.gated_deltanet import GatedDeltaNet

    for fn in (hf.torch_chunk_gated_delta_rule, hf.causal_conv1d_fn):
        cells = dict(zip(fn.__code__.co_freevars, (c.cell_contents for c in fn.__closure__)))
        assert cells["implementation"] is cells["torch_function"], f"{fn.__name__} is bound to a kernel"
    torch.manual_seed(spec["seed"])
    hidden, Hk, Hv, dk, dv, K = (spec[n] for n in ("hidden", "Hk", "Hv", "dk", "dv", "K"))
    if spec["kind"] == "gdn":
        ours = GatedDeltaNet(ModelConfig(hidden_size=hidden, gdn=GatedDeltaNetConfig(
            num_qk_heads=Hk, num_v_heads=Hv, qk_head_dim=dk, v_head_dim=dv, conv_kernel=K, chunk_size=16)))
    else:
        ours = DeltaNet(ModelConfig(hidden_size=hidden, deltanet=DeltaNetConfig(
            num_heads=Hk, head_dim=dk, expand_v=dv / dk, conv_kernel=K, chunk_size=16, output_gate=True)))
    randomize_(ours, spec["seed"])
    theirs = hf.Qwen3_5GatedDeltaNet(Qwen3_5TextConfig(
        hidden_size=hidden, linear_num_key_heads=Hk, linear_num_value_heads=Hv, linear_key_head_dim=dk,
        linear_value_head_dim=dv, linear_conv_kernel_dim=K, rms_norm_eps=1e-5, num_hidden_layers=1,
        layer_types=["linear_attention"]), layer_idx=0)
    theirs.load_state_dict(to_qwen3_5(ours.state_dict(), Hv))
    x = torch.randn(2, spec["T"], hidden, dtype=torch.float64)
    with torch.no_grad():
        ref = theirs(x.float())  # HF's torch path runs the delta rule in float32 whatever the input
        out, _ = ours(x)
    assert_close(f"{spec['kind']} vs HF Qwen3_5GatedDeltaNet", ref, out, spec["rtol"])


def run_hf_parity(**spec) -> None:
    """Run `_hf_worker(spec)` in a fresh interpreter with `sys.modules["fla"] = None`, so
    transformers cannot bind FLA's Triton kernels (they fail on CPU; shared/design.md), and fail
    with its traceback unless it exits cleanly."""
    code = ("import sys, json; sys.modules['fla'] = None; sys.path.insert(0, sys.argv[1]); "
            "from tests.cpu.test_delta_rule import _hf_worker; _hf_worker(json.loads(sys.argv[2]))")
    proc = subprocess.run([sys.executable, "-c", code, str(ROOT), json.dumps(spec)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, f"HF parity subprocess failed:\n{proc.stderr[-3000:]}"
