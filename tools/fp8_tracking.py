"""Does FP8 training track BF16? The Megatron backend trained N steps per precision from the same
initial weights on the same batches (the embedded corpus), with the loss of every step recorded.

    python tools/fp8_tracking.py [--steps 200] [--recipes tensorwise,delayed,blockwise] [--json out.json]

Each run: bf16 parameters, an fp32 master copy updated by AdamW (what Megatron's mixed-precision
optimizer does), warmup + cosine LR, gradient clipping at 1.0. Reported per FP8 recipe: NaN/Inf
steps, the mean loss over the last 20 steps, and the largest gap to BF16 of the 10-step moving
average after warmup (the statistic the margin is stated for: single steps are noisy).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

OVERRIDES = ["model.pattern='M*-ME-M*'", "model.hidden_size=512", "model.vocab_size=8192",
             "model.attention.num_heads=8", "model.mamba2.head_dim=64", "model.mamba2.state_size=64",
             "model.moe.num_experts=8", "model.moe.top_k=2", "model.max_seq_len=1024",
             "train.seq_len=1024", "train.micro_batch_size=8", "train.global_batch_size=8",
             "data.pack=false"]


def moving_average(xs: list[float], k: int = 10) -> list[float]:
    return [sum(xs[max(0, i - k + 1):i + 1]) / len(xs[max(0, i - k + 1):i + 1]) for i in range(len(xs))]


def train(config, data, precision, init_state, steps: int, lr: float, warmup: int) -> dict:
    from megahybrid.megatron.model import build_megatron_model

    model = build_megatron_model(config, precision)
    missing, unexpected = model.load_state_dict(init_state, strict=False)
    left = [k for k in missing + unexpected if not k.endswith("_extra_state")]
    assert not left, f"initial weights do not fit: {left[:5]}"
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    off = sorted({str(p.device) for p in params} - {"cuda:0"})
    if off:
        print(f"note: parameters on {off} ({sum(str(p.device) != 'cuda:0' for p in params)} tensors)", flush=True)
    master = [p.detach().float().cuda().clone().requires_grad_(True) for p in params]
    opt = torch.optim.AdamW(master, lr=lr, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    losses, bad = [], 0
    start = time.time()
    for step in range(steps):
        scale = min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, step / steps)))
        for group in opt.param_groups:
            group["lr"] = lr * max(scale, 0.1)
        batch = data.train_batch(step, 0).to("cuda")
        model.set_is_first_microbatch()  # TE re-casts the updated weights to FP8 (else it reuses step 1's)
        loss = model(batch.tokens, labels=batch.labels).float().mean() + model.aux_loss().float()
        loss.backward()
        for p, m in zip(params, master):
            m.grad = torch.zeros_like(m) if p.grad is None else p.grad.detach().float().to(m.device)
        norm = float(torch.nn.utils.clip_grad_norm_(master, 1.0))
        value = float(loss.detach())
        if not (math.isfinite(value) and math.isfinite(norm)):
            bad += 1
        else:
            opt.step()
            with torch.no_grad():
                for p, m in zip(params, master):
                    p.copy_(m)
        opt.zero_grad(set_to_none=True)
        for p in params:
            p.grad = None
        losses.append(value)
    torch.cuda.synchronize()
    return {"losses": losses, "bad_steps": bad, "sec_per_step": (time.time() - start) / steps}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--recipes", default="tensorwise,delayed,blockwise")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    from megahybrid import load_config
    from megahybrid.data.loader import Data
    from megahybrid.data.prepare import prepare_run_data
    from megahybrid.megatron.model import build_megatron_model, ensure_model_parallel
    from megahybrid.megatron.transformer_config import Precision

    config = load_config({"model": {}}, OVERRIDES + [f"train.steps={args.steps}"])
    run_dir = Path(tempfile.mkdtemp(prefix="fp8_tracking_"))
    data = Data(config, prepare_run_data(config, run_dir))
    ensure_model_parallel()
    torch.manual_seed(0)
    init_state = {k: v.clone() for k, v in build_megatron_model(config, Precision()).state_dict().items()
                  if torch.is_tensor(v)}
    runs = {}
    for name in ["bf16", *args.recipes.split(",")]:
        precision = Precision() if name == "bf16" else Precision(fp8=name)
        try:
            runs[name] = train(config, data, precision, init_state, args.steps, args.lr, args.warmup)
        except Exception as e:  # an unsupported recipe is a result, not a crash of the whole table
            runs[name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"}
        torch.cuda.empty_cache()
        if "error" in runs[name] and name == "bf16":
            raise SystemExit(f"the bf16 baseline failed: {runs[name]['error']}")
        print(name, json.dumps({k: v for k, v in runs[name].items() if k != "losses"}), flush=True)

    base = moving_average(runs["bf16"]["losses"])
    print(f"\n{torch.cuda.get_device_name()}, {args.steps} steps, batch 8 x 1024, M*-ME-M* hidden 512, "
          f"vocab 8192 (embedded corpus)")
    print(f"{'precision':12s} {'NaN steps':>9s} {'loss@1':>7s} {'loss@50':>7s} {'last-20 mean':>12s} "
          f"{'max |MA10 - bf16| after warmup':>31s} {'s/step':>7s}")
    for name, run in runs.items():
        if "error" in run:
            print(f"{name:12s} ERROR {run['error']}")
            continue
        ls = run["losses"]
        gap = max(abs(a - b) for a, b in list(zip(moving_average(ls), base))[args.warmup:])
        run["max_ma10_gap"] = gap
        print(f"{name:12s} {run['bad_steps']:9d} {ls[0]:7.3f} {ls[min(49, len(ls) - 1)]:7.3f} "
              f"{sum(ls[-20:]) / 20:12.4f} {gap:31.4f} {run['sec_per_step']:7.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
