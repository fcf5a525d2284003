"""Training throughput of the Megatron backend vs stock Megatron `HybridModel`, in one process.

    megahybrid bench --rows a,d --precisions bf16,fp8 [--steps 10] [--json out.json]
    (or python tools/bench.py ...)

Per row and precision, the models are built from the same megahybrid Config and the same Megatron
TransformerConfig (megahybrid/megatron/transformer_config.py); the baseline is Megatron's own
`HybridModel` from its own `hybrid_stack_spec` (megahybrid.megatron.model.build_stock_hybrid_model),
so the difference is the model assembly, the Mamba path (see megahybrid/megatron/model.py) and the
loss: megahybrid runs TE's fused cross entropy, stock keeps Megatron's default unfused loss
(`--impls stock+fusedce` times stock with the fused loss too). One
step = forward, Megatron's loss (`compute_language_model_loss`, mean), backward, and a fused AdamW
step on the (bf16) parameters, for both. Reported: tokens/s, model TFLOP/s and MFU under both FLOP
conventions (Megatron's causal half-square, and the full square), peak memory.
FLOPs: 3 x forward FLOPs per token from megahybrid.flops (matmul parameters + attention scores,
active experts only, Mamba scan as Megatron counts it, LM head included).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import sys
import time
from pathlib import Path

import torch

ROWS = {
    "a": ("M*-ME-M*, hidden 1024, 8 experts top-2, batch 4 x 4096, vocab 131072",
          ["model.pattern='M*-ME-M*'", "model.hidden_size=1024", "model.vocab_size=131072",
           "model.max_seq_len=4096", "model.attention.num_heads=8", "model.attention.num_kv_heads=8",
           "model.moe.num_experts=8", "model.moe.top_k=2", "model.mamba2.num_groups=1"], 4, 4096),
    "b": ("(M-M-M-M*-)x4 Nemotron-H-shaped, hidden 2048, relu2 MLP 8192, batch 2 x 8192",
          ["model.pattern='(M-M-M-M*-)x4'", "model.hidden_size=2048", "model.vocab_size=131072",
           "model.max_seq_len=8192", "model.attention.num_heads=16", "model.attention.num_kv_heads=8",
           "model.mlp.activation=relu2", "model.mlp.ffn_hidden_size=8192", "model.mamba2.num_groups=8"], 2, 8192),
    "d": ("MG*-MGE-, hidden 1024, 8 experts top-2, batch 4 x 4096, vocab 131072",
          ["model.pattern='MG*-MGE-'", "model.hidden_size=1024", "model.vocab_size=131072",
           "model.max_seq_len=4096", "model.attention.num_heads=8", "model.attention.num_kv_heads=8",
           "model.gdn.num_qk_heads=8", "model.gdn.num_v_heads=8", "model.gdn.qk_head_dim=128",
           "model.moe.num_experts=8", "model.moe.top_k=2", "model.mamba2.num_groups=1"], 4, 4096),
}


class Runner:
    """One model with its optimizer and two fixed batches; `time(steps)` -> seconds per step."""

    def __init__(self, build, config, batch: int, seq: int):
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        self.model = build()
        self.model.train()
        self.params = sum(p.numel() for p in self.model.parameters())
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4, fused=True)
        gen = torch.Generator(device="cuda").manual_seed(0)
        self.batches = [torch.randint(config.model.vocab_size, (batch, seq + 1), device="cuda", generator=gen)
                        for _ in range(2)]
        self.tokens = batch * seq
        self.base_mem = before
        self.resident = 0
        self.peak = 0
        self.loss = float("nan")

    def step(self, i: int):
        ids = self.batches[i % 2]
        if hasattr(self.model, "set_is_first_microbatch"):
            self.model.set_is_first_microbatch()  # FP8: TE re-casts the weights every step, as in training
        loss = self.model(ids[:, :-1].contiguous(), labels=ids[:, 1:].contiguous()).float().mean()
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss

    def time(self, steps: int) -> float:
        """Seconds per step; also updates `peak`, this model's own peak memory (parameters,
        optimizer state, activations), not counting the other model resident beside it."""
        torch.cuda.synchronize()
        others = torch.cuda.memory_allocated() - self.resident
        torch.cuda.reset_peak_memory_stats()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for i in range(steps):
            loss = self.step(i)
        end.record()
        torch.cuda.synchronize()
        self.loss = float(loss)
        self.peak = max(self.peak, torch.cuda.max_memory_allocated() - others)
        return start.elapsed_time(end) / 1e3 / steps

    def profile(self, path: Path, title: str, top: int = 12) -> str:
        """Top CUDA kernels of one step (torch.profiler), appended to `path`; summary returned."""
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            self.step(0)
            torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=40, max_name_column_width=90)
        with path.open("a") as f:
            f.write(f"\n==== {title}\n{table}\n")
        events = sorted(prof.key_averages(), key=lambda e: -e.device_time_total)
        total = sum(e.self_device_time_total for e in events) or 1.0
        lines = [f"  {100 * e.self_device_time_total / total:5.1f}% {e.self_device_time_total / 1e3:7.2f} ms  {e.key[:80]}"
                 for e in sorted(events, key=lambda e: -e.self_device_time_total)[:top]]
        return f"  total {total / 1e3:.1f} ms of kernels\n" + "\n".join(lines)


def _stock_hybrid(config, precision, fused_loss=False):
    """Stock HybridModel's forward takes (input_ids, position_ids, attention_mask, labels=...)."""
    from megahybrid.megatron.model import build_stock_hybrid_model

    model = build_stock_hybrid_model(config, precision, fused_loss=fused_loss)
    forward = model.forward

    def call(input_ids, labels=None):
        return forward(input_ids, None, None, labels=labels)

    model.forward = call
    return model


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="megahybrid bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="a,d")
    ap.add_argument("--precisions", default="bf16,fp8")
    ap.add_argument("--fp8-recipe", default="tensorwise", choices=["delayed", "tensorwise", "blockwise"])
    ap.add_argument("--impls", default="megahybrid,stock",
                    help="megahybrid, stock (Megatron defaults) and/or stock+fusedce (stock with TE's fused loss)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--json", default=None)
    ap.add_argument("--profile-dir", default=None, help="write a one-step kernel profile per model here")
    args = ap.parse_args(argv)

    from megahybrid import load_config
    from megahybrid.flops import model_flops_per_token, peak_flops
    from megahybrid.megatron.gdn_guard import ensure_gdn_backward
    from megahybrid.megatron.model import build_megatron_model, ensure_model_parallel
    from megahybrid.megatron.transformer_config import Precision, have_causal_conv1d

    device = torch.cuda.get_device_name()
    peak = peak_flops(device)
    ensure_model_parallel()
    results = []
    for row in args.rows.split(","):
        title, overrides, batch, seq = ROWS[row]
        config = load_config({"model": {}}, overrides + [f"train.seq_len={seq}"])  # ModelConfig defaults
        if "G" in config.model.pattern:
            ensure_gdn_backward()
        flops = {c: model_flops_per_token(config, seq, causal=c) for c in (True, False)}
        for prec in args.precisions.split(","):
            precision = Precision(fp8=None if prec == "bf16" else args.fp8_recipe)
            label = prec if prec == "bf16" else f"fp8-{args.fp8_recipe}"
            runners, recs = {}, {}
            for impl in args.impls.split(","):
                build = {"megahybrid": lambda: build_megatron_model(config, precision),
                         "stock": lambda: _stock_hybrid(config, precision),
                         "stock+fusedce": lambda: _stock_hybrid(config, precision, fused_loss=True)}[impl]
                recs[impl] = {"row": row, "title": title, "precision": label, "impl": impl, "batch": batch, "seq": seq}
                t0 = time.time()
                try:
                    runner = Runner(build, config, batch, seq)
                    for i in range(args.warmup):  # compiles and autotunes
                        runner.step(i)
                    torch.cuda.synchronize()
                    runner.resident = torch.cuda.memory_allocated() - runner.base_mem
                    runners[impl] = runner
                except Exception as e:  # a failing baseline (e.g. stock FP8) is a result too
                    recs[impl]["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                recs[impl]["build_warmup_s"] = time.time() - t0
            # Alternate the models and keep the faster of two timings each, so neither pays for
            # running first (allocator growth, lazy library initialisation).
            for _ in range(2):
                for impl, runner in runners.items():
                    try:
                        sec = runner.time(args.steps)
                        recs[impl]["step_ms"] = min(recs[impl].get("step_ms", 1e9), 1e3 * sec)
                    except Exception as e:
                        recs[impl]["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            for impl, runner in runners.items():
                rec = recs[impl]
                if "error" in rec:
                    continue
                rec.update(tokens_per_s=runner.tokens / (rec["step_ms"] / 1e3), peak_mem_gib=runner.peak / 2**30,
                           params=runner.params, loss=runner.loss)
                for causal, name in ((True, "causal"), (False, "full")):
                    tflops = rec["tokens_per_s"] * 3 * flops[causal] / 1e12
                    rec[f"tflops_{name}"] = tflops
                    rec[f"mfu_{name}"] = tflops * 1e12 / peak if peak else None
                if args.profile_dir:
                    summary = runner.profile(Path(args.profile_dir) / "profiles.txt", f"{row} {label} {impl}")
                    print(f"-- {row} {label} {impl}: top kernels of one step\n{summary}", flush=True)
            runner = runners = None  # free both models before the next precision
            gc.collect()
            torch.cuda.empty_cache()
            for rec in recs.values():
                results.append(rec)
                print(json.dumps(rec), flush=True)

    date = datetime.date.today().isoformat()
    mamba_path = "causal_conv1d fused" if have_causal_conv1d() else "megahybrid: FLA Triton conv + mamba_ssm scan; stock: non-fused (use_mamba_mem_eff_path=False)"
    print(f"\n{device}, {date}, torch {torch.__version__}; Mamba path: {mamba_path}")
    print(f"{'row':3s} {'prec':15s} {'impl':13s} {'tok/s':>9s} {'vs stock':>8s} {'TFLOP/s':>8s} {'MFU causal':>10s} "
          f"{'MFU full':>8s} {'mem GiB':>7s} {'params':>7s}")
    for r in results:
        if "error" in r:
            print(f"{r['row']:3s} {r['precision']:15s} {r['impl']:13s} ERROR {r['error']}")
            continue
        base = next((s for s in results if s["row"] == r["row"] and s["precision"] == r["precision"]
                     and s["impl"] == "stock" and "error" not in s), None)
        ratio = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base else "-"
        mfu_c = f"{100 * r['mfu_causal']:.1f}%" if r.get("mfu_causal") else "-"
        mfu_f = f"{100 * r['mfu_full']:.1f}%" if r.get("mfu_full") else "-"
        print(f"{r['row']:3s} {r['precision']:15s} {r['impl']:13s} {r['tokens_per_s']:9.0f} {ratio:>8s} "
              f"{r['tflops_causal']:8.1f} {mfu_c:>10s} {mfu_f:>8s} {r['peak_mem_gib']:7.1f} {r['params'] / 1e6:6.0f}M")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": device, "date": date, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
