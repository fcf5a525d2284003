"""The mixer-contract checks every mixer test file runs (`megahybrid/mixers/base.py` states the
contract), written once so each file only picks its layer, sizes and tolerances:

- `check_pieces`: running x in pieces with the state carried == running it whole (output and every
  state entry);
- `check_packing`: packed rows (`seq_idx`) == each document run on its own; the incoming state
  belongs to each row's first document, the returned one to its last;
- `check_grads`: a fast form (chunked, parallel, the module) and its reference give the same
  gradient for every named input, under one random cotangent per output.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch

from megahybrid.mixers.base import State
from tests.helpers import assert_close


def check_pieces(module, x: torch.Tensor, cuts: Sequence[int], rtol: float) -> dict:
    """`module(x)` == `module` on x[:, :c1], x[:, c1:c2], ..., x[:, cn:] with the state carried, for
    the output and every state entry (same keys, shapes and values); returns the carried state."""
    y, state = module(x)
    ys, carried = [], None
    for a, b in zip((0, *cuts), (*cuts, x.shape[1])):
        y_i, carried = module(x[:, a:b], carried)
        ys.append(y_i)
    assert_close("y in pieces", y, torch.cat(ys, dim=1), rtol)
    assert state.keys() == carried.keys(), f"state keys {sorted(carried)} != whole {sorted(state)}"
    for key in state:
        assert_close(f"state[{key}] in pieces", state[key], carried[key], rtol)
    return carried


def check_packing(module, x: torch.Tensor, rows: Sequence[Sequence[int]], rtol: float,
                  state0: State = None, state_rtol: Optional[float] = None) -> dict:
    """x [len(rows), sum(row), hidden] packed with the document lengths `rows` == every document run
    on its own: outputs within `rtol`, and the returned state == each row's last document's
    (`state_rtol`, default `rtol`; 0 = bit for bit). `state0` goes to each row's first document.
    Rows with the same lengths run their documents together, as the packed forward batches them:
    a BLAS call on another batch size may round differently, which an exact check would catch.
    Returns the packed run's state."""
    state_rtol = rtol if state_rtol is None else state_rtol
    assert x.shape[:2] == (len(rows), sum(rows[0])) and len({sum(r) for r in rows}) == 1, "x does not fit rows"
    seq_idx = torch.stack([torch.repeat_interleave(torch.arange(len(r)), torch.tensor(r)) for r in rows])
    y, state = module(x, state0, seq_idx)
    groups: dict[tuple, list[int]] = {}
    for row, lengths in enumerate(rows):
        groups.setdefault(tuple(lengths), []).append(row)
    for lengths, idx in groups.items():
        start, s = 0, None if state0 is None else {k: v[idx] for k, v in state0.items()}
        for i, n in enumerate(lengths):
            y_doc, s = module(x[idx, start:start + n], s if i == 0 else None)
            assert_close(f"rows {idx} document {i} (at {start})", y_doc, y[idx, start:start + n], rtol)
            start += n
        assert state.keys() == s.keys(), f"state keys {sorted(state)} != last document's {sorted(s)}"
        for key in state:
            assert_close(f"rows {idx} state[{key}]", s[key], state[key][idx], state_rtol)
    return state


def check_grads(ref, out, leaves: dict, rtol: float) -> None:
    """`ref` and `out`: the same output(s) (a tensor or a tuple of tensors) of a reference and of the
    form under test, both computed from `leaves` (name -> tensor requiring grad). Draws a random
    cotangent per output (global RNG) and compares the gradient of every leaf within `rtol`."""
    ref = (ref,) if torch.is_tensor(ref) else tuple(ref)
    out = (out,) if torch.is_tensor(out) else tuple(out)
    cotangents = [torch.randn_like(r) for r in ref]
    tensors = list(leaves.values())
    ref_grads = torch.autograd.grad(sum((r * c).sum() for r, c in zip(ref, cotangents)), tensors)
    out_grads = torch.autograd.grad(sum((o * c).sum() for o, c in zip(out, cotangents)), tensors)
    for name, r, o in zip(leaves, ref_grads, out_grads):
        assert_close(f"grad {name}", r, o, rtol)


def check_causal(module, x: torch.Tensor, t: int) -> None:
    """Changing token t leaves every output before t bit-identical and changes the output at t."""
    x2 = x.clone()
    x2[:, t] += 1.0
    y, _ = module(x)
    y2, _ = module(x2)
    assert torch.equal(y[:, :t], y2[:, :t]), "an output before the changed token moved"
    assert (y[:, t] - y2[:, t]).abs().max() > 1e-3, "the changed token did not reach its own output"


def randomize_biases(module, scale: float = 0.3):
    """Biases init at zero and could hide a bug: give them random values (in place); returns module."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "bias" in name:
                p.copy_(torch.randn_like(p) * scale)
    return module


def fla_worker_results(module: str) -> dict:
    """Run `module._fla_worker()` in a fresh interpreter (FLA's Triton ops swapped for its references
    there, without touching this process's imports) and return the JSON it prints last."""
    root = Path(__file__).resolve().parents[1]
    code = f"import sys; sys.path.insert(0, sys.argv[1]); from {module} import _fla_worker; _fla_worker()"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TORCHDYNAMO_DISABLE": "1"}  # FLA's sqrelu is torch.compile'd
    proc = subprocess.run([sys.executable, "-c", code, str(root)], cwd=root, capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, f"FLA subprocess ({module}) failed:\n{proc.stderr[-3000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])
