"""flash-linear-attention's Hopper guard on gated-delta-rule backward, lifted only after a check.

FLA 0.6.0 raises in `fla.ops.common.chunk_o.chunk_bwd_dqkwg` (the gated backward of every GDN layer)
on Hopper with 3.4.0 <= Triton < 3.7.1, because Triton 3.4+ miscompiled that kernel at some tile
sizes (FLA issue #640). The GPU machine has Triton 3.6.0. `ensure_gdn_backward` runs FLA's gated
delta rule forward + backward on this GPU against megahybrid's float32 reference
(`mixers.delta_rule.chunked_delta_rule`) at head dims 64 and 128 and a length that is not a multiple
of the chunk, logs the measured errors, and lifts the guard only if every output and gradient is
within `TOLERANCE`; otherwise it restores the guard and stops with a message saying what to do.
A passing check is recorded per GPU model, Triton and FLA version (`record_path`), so the other ranks
and later runs on the same machine reuse it instead of re-running (and re-autotuning) it; a failed
check is never recorded.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
import torch.nn.functional as F

log = logging.getLogger("megahybrid.megatron")

TOLERANCE = 2e-2
"""Relative error (max |fla - ref| / max |ref|) allowed for bf16 kernels against the fp32 reference.
Measured on an H100 with the guard lifted: ~5e-3 at head dims 64 and 128 (design.md, "Known facts")."""

_result: dict | None = None


def _chunk_o():
    import fla.ops.common.chunk_o as chunk_o

    return chunk_o


def guard_active() -> bool:
    """True when FLA would refuse gated-delta-rule backward on this machine."""
    c = _chunk_o()
    return bool(c.IS_NVIDIA_HOPPER and c.TRITON_ABOVE_3_4_0 and not c.TRITON_ABOVE_3_7_1)


def self_check(device="cuda", seed: int = 0) -> dict[str, float]:
    """FLA `chunk_gated_delta_rule` (bf16) vs the float32 reference: relative error per tensor."""
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule

    from megahybrid.mixers.delta_rule import chunked_delta_rule

    gen = torch.Generator(device=device).manual_seed(seed)
    errors = {}
    for d in (64, 128):
        B, T, H = 2, 300, 4  # T = 4 chunks + 44: the tail of a partial chunk is exercised
        shape = (B, T, H, d)
        q = F.normalize(torch.randn(shape, device=device, generator=gen), dim=-1)
        k = F.normalize(torch.randn(shape, device=device, generator=gen), dim=-1)
        v = torch.randn(shape, device=device, generator=gen)
        beta = torch.rand(B, T, H, device=device, generator=gen)
        g = F.logsigmoid(torch.randn(B, T, H, device=device, generator=gen) + 3.0)  # decays near 0.95
        do = torch.randn(shape, device=device, generator=gen)
        inputs = [t.to(torch.bfloat16) for t in (q, k, v, g, beta)]
        fla_in = [t.clone().requires_grad_() for t in inputs]
        ref_in = [t.float().clone().requires_grad_() for t in inputs]
        o_fla, _ = chunk_gated_delta_rule(fla_in[0], fla_in[1], fla_in[2], g=fla_in[3].float(), beta=fla_in[4])
        o_fla.backward(do.to(o_fla.dtype))
        o_ref, _ = chunked_delta_rule(ref_in[0], ref_in[1], ref_in[2], ref_in[4], ref_in[3], chunk_size=64)
        o_ref.backward(do)
        errors[f"o(d={d})"] = _rel(o_ref, o_fla)
        for name, a, b in zip("qkvgb", ref_in, fla_in):
            errors[f"d{name}(d={d})"] = _rel(a.grad, b.grad)
    return errors


def _rel(ref: torch.Tensor, out: torch.Tensor) -> float:
    ref, out = ref.detach().double(), out.detach().double()
    err = float((out - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
    return err if err == err else float("inf")  # NaN never passes


def record_path(name: str, triton_version: str) -> Path:
    """Where a passing self-check for this GPU model / Triton / FLA is kept ($MEGAHYBRID_CACHE, else
    ~/.cache/megahybrid)."""
    import fla

    root = Path(os.environ.get("MEGAHYBRID_CACHE") or Path.home() / ".cache" / "megahybrid")
    key = f"{name}-triton{triton_version}-fla{fla.__version__}".replace(" ", "_").replace("/", "_")
    return root / f"gdn_guard-{key}.json"


def ensure_gdn_backward(device="cuda") -> dict:
    """Lift FLA's Hopper guard if (and only if) the self-check passes on this GPU; idempotent.

    Returns {"guard": "inactive"} where FLA has no guard here, else {"guard": "lifted", "errors": ...}.
    Raises RuntimeError (guard kept) when the check fails."""
    global _result
    if _result is not None:
        return _result
    if not torch.cuda.is_available() or not guard_active():
        _result = {"guard": "inactive"}
        return _result
    import triton

    c = _chunk_o()
    name = torch.cuda.get_device_name(device)
    record = record_path(name, triton.__version__)
    if record.is_file():
        errors = json.loads(record.read_text())["errors"]
        if max(errors.values()) <= TOLERANCE:
            c.TRITON_ABOVE_3_7_1 = True
            log.warning("FLA gated-delta-rule backward guard lifted on %s (Triton %s): self-check recorded in "
                        "%s, worst %.2e <= %.0e", name, triton.__version__, record, max(errors.values()), TOLERANCE)
            _result = {"guard": "lifted", "device": name, "triton": triton.__version__, "errors": errors,
                       "record": str(record)}
            return _result
    c.TRITON_ABOVE_3_7_1 = True  # lift for the check itself
    try:
        errors = self_check(device)
    except Exception:
        c.TRITON_ABOVE_3_7_1 = False
        raise
    worst = max(errors, key=errors.get)
    summary = ", ".join(f"{k} {v:.1e}" for k, v in errors.items())
    if not errors[worst] <= TOLERANCE:
        c.TRITON_ABOVE_3_7_1 = False
        raise RuntimeError(
            f"GDN backward self-check FAILED on {name} with Triton {triton.__version__}: {worst} relative "
            f"error {errors[worst]:.2e} > {TOLERANCE:.0e} (FLA issue #640 miscompile). FLA's guard stays on; "
            f"Gated DeltaNet ('G') cannot train here - install Triton >= 3.7.1 or tilelang, or remove 'G' "
            f"from model.pattern. Errors: {summary}")
    log.warning("FLA gated-delta-rule backward guard lifted on %s (Triton %s) after a self-check against "
                "the fp32 reference: worst %s = %.2e <= %.0e; all: %s",
                name, triton.__version__, worst, errors[worst], TOLERANCE, summary)
    _result = {"guard": "lifted", "device": name, "triton": triton.__version__, "errors": errors}
    try:  # write then rename: a concurrent rank never reads half a file
        record.parent.mkdir(parents=True, exist_ok=True)
        tmp = record.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(_result, indent=1))
        tmp.replace(record)
    except OSError as e:  # a read-only home only costs the next run a re-check
        log.warning("could not record the GDN self-check in %s: %s", record, e)
    return _result
