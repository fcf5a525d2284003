"""Adapters (megahybrid/adapters.py) on a tiny Mamba2 + attention + MLP hybrid.

References, none of them the adapter code itself:
- each adapted linear's output against the method's formula written out here in float64 (LoRA:
  W x + b + alpha/r B A x, Hu et al. arXiv 2106.09685; DoRA: m (W + sBA) / ||W + sBA||_row x + b,
  Liu et al. arXiv 2402.09353; VeRA: W x + b * (B (d * (A x))), arXiv 2310.11454);
- merged (plain nn.Linear) model logits == unmerged model logits in float64;
- freshly initialised adapters == the base model built from the same seed without adapters;
- causality: changing later tokens leaves earlier logits unchanged;
- a short CPU training run: base weights equal the seed's initial weights afterwards, adapters moved;
- save -> load round trip of adapter weights + metadata, and one-line errors on mismatched metadata.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

import megahybrid
from megahybrid import adapters
from megahybrid.config import ConfigError, load_config
from megahybrid.data.prepare import prepare
from megahybrid.megatron.transformer_config import check_megatron
from megahybrid.train import checkpoint
from megahybrid.train.run import train_from_cli
from tests.helpers import assert_close

SIZES = ["model.hidden_size=32", "model.vocab_size=64", "model.attention.num_heads=4", "model.mamba2.head_dim=8",
         "model.mamba2.state_size=8", "model.mlp.ffn_hidden_size=64"]
PATTERN = "M*-"
METHODS = ["lora", "dora", "vera", "dylora"]


def config(method="lora", *extra):
    return load_config(PATTERN, [*SIZES, f"model.adapters.method={method}", "model.adapters.rank=4", *extra])


def build(cfg, seed=0):
    torch.manual_seed(seed)
    return megahybrid.build_model(cfg)


def randomize_adapters(model, seed=1):
    """Non-zero adapter parameters (a fresh LoRA B / VeRA b is zero, which would hide bugs)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.rsplit(".", 1)[-1] in adapters.ADAPTER_PARAMS:
                p.add_(0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))


def tokens(seed=2, T=13):
    return torch.randint(0, 64, (2, T), generator=torch.Generator().manual_seed(seed))


def expected_linear(m, x):
    """The method's formula, written from the paper, in float64."""
    W, b = m.weight.double(), (m.bias.double() if m.bias is not None else 0.0)
    x = x.double()
    if isinstance(m, adapters.VeRALinear):
        A, B = m.vera_A.double(), m.vera_B.double()
        return x @ W.T + b + m.vera_lambda_b.double() * (((x @ A.T) * m.vera_lambda_d.double()) @ B.T)
    r = m.eval_rank if isinstance(m, adapters.DyLoRALinear) else m.rank
    A, B = m.lora_A.double()[:r], m.lora_B.double()[:, :r]
    update = (m.alpha / r) * B @ A
    if isinstance(m, adapters.DoRALinear):
        full = W + update
        return x @ (m.magnitude.double()[:, None] * full / torch.sqrt((full**2).sum(1, keepdim=True))).T + b
    return x @ (W + update).T + b


@pytest.mark.parametrize("method", METHODS)
def test_each_adapted_linear_matches_the_papers_formula(method):
    extra = ["model.adapters.dylora_eval_rank=3"] if method == "dylora" else []
    model = build(config(method, *extra)).double().eval()
    randomize_adapters(model)
    wrapped = adapters.adapter_modules(model)
    assert sorted(wrapped) == ["layers.0.mixer.in_proj", "layers.0.mixer.out_proj", "layers.1.mixer.k_proj",
                               "layers.1.mixer.o_proj", "layers.1.mixer.q_proj", "layers.1.mixer.v_proj"]
    for name, m in wrapped.items():
        xi = torch.randn(3, 5, m.in_features, dtype=torch.float64)
        assert_close(name, expected_linear(m, xi), m(xi), 1e-12)


@pytest.mark.parametrize("method", METHODS)
def test_merged_equals_unmerged_in_float64(method):
    model = build(config(method)).double().eval()
    randomize_adapters(model)
    ids = tokens()
    unmerged = model(ids)
    merged_model = adapters.merge_adapters(copy.deepcopy(model))
    assert not adapters.adapter_modules(merged_model)
    assert all(type(m) is torch.nn.Linear for n, m in merged_model.named_modules() if n.endswith("_proj"))
    assert_close(f"{method} merged logits", unmerged, merged_model(ids), 1e-10)
    base = build(config("none")).double().eval()
    assert (base(ids) - unmerged).abs().max() > 1e-3  # the adapters do change the model


@pytest.mark.parametrize("method", METHODS)
def test_fresh_adapters_give_the_base_models_logits(method):
    ids = tokens()
    base = build(config("none")).eval()
    adapted = build(config(method)).eval()
    out, ref = adapted(ids), base(ids)
    if method in ("lora", "dylora"):
        assert torch.equal(out, ref)  # zero B: the update is exactly 0
    else:  # DoRA's gain m/||W|| and VeRA's zero b are exact in value, not in operation order
        assert_close(f"{method} fresh logits", ref, out, 1e-6)


@pytest.mark.parametrize("method", METHODS)
def test_adapted_model_is_causal(method):
    model = build(config(method)).double().eval()
    randomize_adapters(model)
    ids = tokens(T=16)
    changed = ids.clone()
    changed[:, 9:] = (changed[:, 9:] + 7) % 64
    a, b = model(ids), model(changed)
    assert_close("logits before the change", a[:, :9], b[:, :9], 1e-12)
    assert (a[:, 9:] - b[:, 9:]).abs().max() > 1e-6


def test_dylora_trains_every_truncation_and_evals_at_eval_rank():
    model = build(config("dylora", "model.adapters.dylora_eval_rank=2"))
    m = adapters.adapter_modules(model)["layers.1.mixer.q_proj"]
    m.train()
    torch.manual_seed(0)
    assert {m.active_rank() for _ in range(200)} == {1, 2, 3, 4}
    m.eval()
    assert m.active_rank() == 2


def test_targets_and_methods_errors_are_one_line():
    with pytest.raises(ConfigError, match=r"^model.adapters.targets='nope': matches no linear of this model; its "
                                          r"linears: .*q_proj"):
        build(config("lora", "model.adapters.targets=[q_proj, nope]"))
    with pytest.raises(ConfigError, match=r"^model.adapters.targets='lm_head': matches 'lm_head', whose weight is "
                                          r"read directly"):
        build(config("lora", "model.adapters.targets=[lm_head]"))
    with pytest.raises(ConfigError, match=r"^model.adapters.method='qlora': needs a 4-bit NF4 base from bitsandbytes"):
        config("qlora")
    with pytest.raises(ConfigError, match=r"^model.adapters.rank=0: must be >= 1"):
        load_config(PATTERN, [*SIZES, "model.adapters.method=lora", "model.adapters.rank=0"])
    with pytest.raises(ConfigError, match=r"^model.adapters.method='lora': adapters are not built by the megatron"):
        check_megatron(config("lora"))


def test_full_name_and_wildcard_targets():
    model = build(config("lora", "model.adapters.targets=[layers.1.mixer.q_proj, 'layers.0.*']"))
    assert sorted(adapters.adapter_modules(model)) == ["layers.0.mixer.in_proj", "layers.0.mixer.out_proj",
                                                       "layers.1.mixer.q_proj"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.rsplit(".", 1)[-1] in ("lora_A", "lora_B") for n in trainable)


def test_save_load_round_trip_and_metadata_errors(tmp_path):
    model = build(config("dora")).double().eval()
    randomize_adapters(model)
    adapters.save_adapters(model, tmp_path / "a")
    meta = json.loads((tmp_path / "a" / "adapters.json").read_text())
    assert {k: meta[k] for k in ("method", "rank", "alpha", "dtype")} == {"method": "dora", "rank": 4,
                                                                          "alpha": 16.0, "dtype": "auto"}
    assert len(meta["base_model_sha256"]) == 64 and len(meta["modules"]) == 6
    saved = load_file(str(tmp_path / "a" / "adapters.safetensors"))
    assert all(k.rsplit(".", 1)[-1] in adapters.ADAPTER_PARAMS for k in saved)  # adapter tensors only

    fresh = build(config("dora")).double().eval()  # same seed: same base weights, fresh adapters
    ids = tokens()
    assert (fresh(ids) - model(ids)).abs().max() > 1e-3
    adapters.load_adapters(fresh, tmp_path / "a")
    assert torch.equal(fresh(ids), model(ids))

    with pytest.raises(ConfigError, match=r"adapters.json: adapters.rank=4 but this model has 8; set model.adapters.rank"):
        adapters.load_adapters(build(config("dora", "model.adapters.rank=8")).double(), tmp_path / "a")
    with pytest.raises(ConfigError, match=r"adapters.json: adapters.alpha=16.0 but this model has 4.0"):
        adapters.load_adapters(build(config("dora", "model.adapters.alpha=4")).double(), tmp_path / "a")
    with pytest.raises(ConfigError, match=r"adapters.json: adapters.targets=.* but this model has \['q_proj'\]"):
        adapters.load_adapters(build(config("dora", "model.adapters.targets=[q_proj]")).double(), tmp_path / "a")
    with pytest.raises(ConfigError, match=r"adapters.json: adapters.base_model_sha256='[0-9a-f]{64}' differs from this "
                                          r"base model's"):
        adapters.load_adapters(build(config("dora"), seed=5).double(), tmp_path / "a")


def test_checkpoint_carries_adapter_metadata_and_refuses_a_mismatch(tmp_path):
    cfg = config("lora")
    model = build(cfg)
    randomize_adapters(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    path = checkpoint.save(tmp_path, 1, model, opt, cfg, {"tokens": 0}, keep_last=2)
    meta = checkpoint.verify(path)
    assert "adapters.json" in meta["files"]
    assert json.loads((path / "adapters.json").read_text())["rank"] == 4
    loaded, loaded_cfg = megahybrid.load_checkpoint(path)
    ids = tokens()
    assert torch.equal(loaded(ids), model.eval()(ids))
    assert loaded_cfg.model.adapters.method == "lora"

    other = build(config("lora", "model.adapters.alpha=2"))
    with pytest.raises(checkpoint.CheckpointError, match=r"adapters.alpha=16.0 but this model has 2.0"):
        checkpoint.restore(path, other, None, "cpu")
    with pytest.raises(checkpoint.CheckpointError, match=r"holds lora adapters but the model has none"):
        checkpoint.restore(path, build(config("none")), None, "cpu")
    (path / "adapters.json").write_text("{}")
    with pytest.raises(checkpoint.CheckpointError, match=r"^adapters.json has 2 bytes, expected \d+"):
        checkpoint.verify(path)


def test_training_run_moves_only_the_adapters(tmp_path):
    """Adapters on the attention (q/k/v/o) and Mamba2 (in/out) projections of a tiny hybrid; after
    training the base weights equal the initial weights of the same seed, the adapters do not."""
    prefix, tok = prepare([], str(tmp_path / "corpus"), None, 512, corpus_bytes=100_000)
    args = ["model.hidden_size=32", "model.vocab_size=512", "model.attention.num_heads=4", "model.mamba2.head_dim=8",
            "model.mamba2.state_size=8", "model.mlp.ffn_hidden_size=64", "model.adapters.method=lora",
            "model.adapters.rank=4", "train.steps=8", "train.seq_len=32", "train.micro_batch_size=4",
            "train.global_batch_size=4", "train.warmup_steps=2", "train.log_every=1", "train.eval_every=0",
            "train.save_every=8", "train.threads=1", "train.lr=1e-2", "data.valid_fraction=0.1",
            f"data.paths=[{prefix}]", f"data.tokenizer={tok}"]
    assert train_from_cli(f"{PATTERN}", str(tmp_path / "run"), args) == 0
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 8 and all(torch.isfinite(torch.tensor(losses))) and min(losses[-3:]) < losses[0], losses

    trained, cfg = megahybrid.load_checkpoint(tmp_path / "run")
    torch.manual_seed(cfg.train.seed)  # what run.py does before build_model
    initial = megahybrid.build_model(cfg)
    start, end = initial.state_dict(), trained.state_dict()
    moved = {n for n in end if not torch.equal(start[n], end[n])}
    assert moved and all(n.rsplit(".", 1)[-1] in ("lora_A", "lora_B") for n in moved), sorted(moved)
    assert any("mixer.in_proj.lora_B" in n for n in moved) and any("mixer.q_proj.lora_B" in n for n in moved)
