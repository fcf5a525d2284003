"""`megahybrid train [--config SOURCE] [--out DIR] [key=value ...]`: config -> run dir -> data ->
model -> loop. Re-running the same command resumes from the newest valid checkpoint in DIR."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch
import yaml

import megahybrid
from megahybrid.config import ConfigError
from megahybrid.data.loader import Data
from megahybrid.data.prepare import prepare_run_data
from megahybrid.parallel.model import check_context_parallel
from megahybrid.train import checkpoint, dist as distributed, loop, megatron_loop


def make_run_dir(out: str) -> Path:
    """Create DIR (and parents) and check it is writable; one-line ConfigError if not."""
    run_dir = Path(out)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise ConfigError(f"--out={out!r}: cannot write there ({err.strerror or err}); choose a writable "
                          "directory") from None
    return run_dir


def print_config(config, run_dir: Path) -> None:
    """The resolved config, one flow-style YAML line per section (also saved as RUN/config.yaml)."""
    data = yaml.safe_load(checkpoint.config_yaml(config))
    print(f"megahybrid {megahybrid.__version__}: run {data.pop('name')!r} in {run_dir}; resolved config:")

    def show(name: str, values: dict) -> None:
        flat = {k: v for k, v in values.items() if not isinstance(v, dict)}
        print(f"  {name}: {yaml.safe_dump(flat, default_flow_style=True, width=10**9).strip()}")
        for key, value in values.items():
            if isinstance(value, dict):
                show(f"{name}.{key}", value)

    for section, values in data.items():
        show(section, values)


def check_layout_supported(config) -> None:
    """The reference loop trains data parallelism, plus context parallelism on the reference backend;
    model-parallel layouts train through megatron_loop (train.backend=megatron); nothing is ignored."""
    p = config.parallel
    if megatron_loop.uses_megatron_loop(config):
        if p.cp != 1:
            raise ConfigError(f"parallel.cp={p.cp}: the megatron backend does not train under context parallelism "
                              "yet; set parallel.cp=1 (or train.backend=reference, parallel.tp=pp=ep=1)")
        from megahybrid.megatron.transformer_config import check_megatron

        check_megatron(config)  # its one-line errors before any data is prepared
        return
    for name in ("tp", "pp", "ep"):
        if getattr(p, name) != 1:
            raise ConfigError(f"parallel.{name}={getattr(p, name)}: model-parallel layouts train on the megatron "
                              f"backend; set parallel.{name}=1, or train.backend=megatron to train it on CUDA GPUs")
    if p.cp != 1 and config.train.backend != "reference":
        raise ConfigError(f"parallel.cp={p.cp}: the {config.train.backend} backend does not train under context "
                          "parallelism yet (Transformer Engine CP is not wired in); set train.backend=reference "
                          "or parallel.cp=1")
    check_context_parallel(config)
    if p.vpp is not None or p.sequence_parallel or p.distributed_optimizer or p.recompute != "none":
        raise ConfigError("parallel: vpp / sequence_parallel / distributed_optimizer / recompute are Megatron "
                          "features; set train.backend=megatron or leave them at their defaults")


def train_from_cli(config_source, out_dir, overrides) -> int:
    start = time.time()
    config = megahybrid.load_config(config_source, overrides)
    check_layout_supported(config)
    run_dir = make_run_dir(out_dir)
    dist = distributed.setup(config.train, config.parallel)
    say = print if dist.is_main else (lambda *a, **k: None)
    try:
        prefixes = None
        if dist.is_main:  # rank 0 writes the run dir; the other ranks wait for its dataset paths
            print_config(config, run_dir)
            (run_dir / "config.yaml").write_text(checkpoint.config_yaml(config))
            prefixes = prepare_run_data(config, run_dir)
        prefixes = dist.broadcast(prefixes)
        data = Data(config, prefixes, config.data.weights)
        if data.valid is None:
            say("note: no validation split (too few held-out documents for one sequence); validation is off")
        torch.manual_seed(config.train.seed)
        if megatron_loop.uses_megatron_loop(config):
            return megatron_loop.train(config, data, run_dir, dist)
        model = megahybrid.build_model(config, config.train.backend).to(dist.device)
        params = sum(p.numel() for p in model.parameters())
        layout = f" (cp {dist.cp_size} x dp {dist.dp_world})" if dist.cp else ""
        say(f"model: {params / 1e6:.2f}M parameters on {dist.device} ({str(dist.dtype).removeprefix('torch.')}), "
            f"world size {dist.world}{layout}; data: {data.train_tokens / 1e6:.2f}M training tokens; "
            f"ready in {time.time() - start:.1f}s", flush=True)
        return loop.train(config, model, data, run_dir, dist)
    except (loop.TrainingError, checkpoint.CheckpointError) as err:
        print(f"megahybrid: training stopped: {err}", file=sys.stderr)
        return 1
    finally:
        dist.close()
