"""Engram (`n`, mixers/engram.py, arXiv 2601.07372) against independent computations:

- the lookup == a naive Python dictionary N-gram tuple -> table row, hashed with Python integers
  (the issue's check), with the reserved pad id before the first token;
- hashes are deterministic, in range and differ between layers; table sizes are distinct primes;
- the whole layer == a token-by-token float64 loop written from the paper's equations (hand RMSNorm,
  gate sigmoid(f(<norm h, norm W_k e>/sqrt d)), dilated causal conv as an explicit sum), both gate forms;
- causality in x and in the token ids; pieces == whole with the state carried; packed == separate
  (N-grams and the conv do not cross a document start); a reference LM generating in pieces == whole;
- `host_tables`: `.to()` leaves the tables' device alone (CPU-only: otherwise a no-op);
- a tiny CPU training run of a hybrid with `n` layers; the Megatron backend refuses `n` in one line.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

import megahybrid
from megahybrid.cli import main
from megahybrid.config import ConfigError, load_config
from megahybrid.data.prepare import prepare
from megahybrid.megatron.transformer_config import check_megatron
from megahybrid.mixers.engram import Engram, ngram_hashes
from megahybrid.train.run import train_from_cli
from tests.helpers import assert_close
from tests.mixer_checks import check_packing, check_pieces

VOCAB = 7  # small, so N-grams repeat inside a sequence


def make(index: int = 0, **engram) -> Engram:
    cfg = {"max_ngram": 3, "heads_per_ngram": 2, "table_size": 11, "head_dim": 3, "conv_kernel": 3, **engram}
    config = load_config({"model": {"pattern": "n", "hidden_size": 12, "vocab_size": VOCAB, "engram": cfg}})
    torch.manual_seed(index)
    module = Engram(config.model, index=index).double()
    with torch.no_grad():  # norms init at 1: make them count in the hand formula
        for norm in (module.query_norm, module.key_norm, module.conv_norm):
            norm.weight.uniform_(0.5, 1.5)
        module.tables.weight.normal_()
    return module


def py_hash(gram: tuple[int, ...], multipliers: list[int], prime: int) -> int:
    mix = 0
    for j, token in enumerate(gram):
        mix ^= token * multipliers[j]
    return mix % prime


def rms(v: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return v / torch.sqrt((v * v).mean() + eps) * w


def naive_rows(module: Engram, ids: list[int]) -> list[dict]:
    """Per position: {(n, head): row} from a dictionary filled N-gram by N-gram with Python ints."""
    mult, pad = module.multipliers.tolist(), module.pad_id
    table: dict[tuple, int] = {}
    out = []
    for t in range(len(ids)):
        rows = {}
        for n in range(2, module.max_ngram + 1):
            gram = tuple(ids[t - j] if t - j >= 0 else pad for j in range(n))  # x_t, x_{t-1}, ...
            for k in range(module.heads):
                key = (n, k, gram)
                if key not in table:
                    prime, offset = int(module.primes[n - 2, k]), int(module.offsets[n - 2, k])
                    table[key] = offset + py_hash(gram, mult, prime)
                rows[(n, k)] = table[key]
        out.append(rows)
    return out


@torch.no_grad()
def naive_engram(module: Engram, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """One row, token by token, float64, from the paper's equations."""
    eps, d = module.query_norm.eps, x.shape[-1]
    weight = module.tables.weight.detach()
    values, ys = [], []
    for t, rows in enumerate(naive_rows(module, ids.tolist())):
        e = torch.cat([weight[rows[(n, k)]] for n in range(2, module.max_ngram + 1) for k in range(module.heads)])
        key = module.key_proj.weight @ e
        s = float(rms(x[t], module.query_norm.weight, eps) @ rms(key, module.key_norm.weight, eps)) / math.sqrt(d)
        if module.gate_signed_sqrt:
            s = math.copysign(math.sqrt(max(abs(s), 1e-6)), s)
        v = (1.0 / (1.0 + math.exp(-s))) * (module.value_proj.weight @ e)
        values.append(rms(v, module.conv_norm.weight, eps))
        conv = torch.zeros(d, dtype=x.dtype)
        K = module.conv_kernel
        for i in range(K):
            src = t - (K - 1 - i) * module.max_ngram
            if src >= 0:
                conv = conv + module.conv.weight[:, 0, i] * values[src]
        ys.append(v + conv * torch.sigmoid(conv))
    return torch.stack(ys)


class WithIds(nn.Module):
    """Engram with the token id carried as x's last channel (exact in float64), so the contract
    checks split ids and x together."""

    def __init__(self, engram: Engram):
        super().__init__()
        self.engram = engram

    def forward(self, xi, state=None, seq_idx=None, need_state=True):
        return self.engram(xi[..., :-1], state, seq_idx, need_state, token_ids=xi[..., -1].long())


def inputs(B=2, T=23, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, 12, generator=g, dtype=torch.float64), torch.randint(0, VOCAB, (B, T), generator=g)


def test_lookup_equals_a_naive_ngram_dictionary():
    module = make()
    x, ids = inputs()
    e = module.lookup(ids, ids.new_full((2, 2), VOCAB), torch.zeros_like(ids))
    weight = module.tables.weight
    for b in range(2):
        for t, rows in enumerate(naive_rows(module, ids[b].tolist())):
            expected = torch.cat([weight[rows[(n, k)]] for n in (2, 3) for k in range(2)])
            assert torch.equal(e[b, t], expected), (b, t)
    # equal N-grams share rows, so a repeated trigram gives the same e
    ids2 = torch.tensor([[1, 2, 3, 4, 1, 2, 3]])
    e2 = module.lookup(ids2, ids2.new_full((1, 2), VOCAB), torch.zeros_like(ids2))
    assert torch.equal(e2[0, 2], e2[0, 6]) and not torch.equal(e2[0, 1], e2[0, 2])


def test_hashes_are_deterministic_in_range_and_differ_between_layers():
    a, b, other = make(0), make(0), make(1)
    assert torch.equal(a.multipliers, b.multipliers) and not torch.equal(a.multipliers, other.multipliers)
    primes = a.primes.flatten().tolist()
    assert len(set(primes)) == len(primes) and min(primes) >= 11
    assert all(all(p % q for q in range(2, int(p ** 0.5) + 1)) for p in primes)
    assert all(m % 2 == 1 and m * (VOCAB + 1) < 2 ** 62 for m in a.multipliers.tolist())
    ids = torch.randint(0, VOCAB + 1, (4, 200))
    for n in (2, 3):
        grams = torch.stack([ids.roll(j, 1) for j in range(n)], -1)
        h = ngram_hashes(grams, a.multipliers, a.primes[n - 2])
        assert (h >= 0).all() and (h < a.primes[n - 2]).all()
        assert torch.equal(h, ngram_hashes(grams, b.multipliers, b.primes[n - 2]))
    assert a.tables.weight.shape[0] == sum(primes)


@pytest.mark.parametrize("signed_sqrt", [True, False])
def test_layer_equals_token_by_token_float64_loop(signed_sqrt):
    module = make(gate_signed_sqrt=signed_sqrt)
    x, ids = inputs()
    y, _ = module(x, token_ids=ids)
    for b in range(2):
        assert_close(f"row {b}", naive_engram(module, x[b], ids[b]), y[b].detach(), 1e-12)


def test_causal_in_x_and_in_token_ids():
    module = make()
    x, ids = inputs()
    t = 11
    y, _ = module(x, token_ids=ids)
    x2 = x.clone()
    x2[:, t] += 1.0
    ids2 = ids.clone()
    ids2[:, t] = (ids2[:, t] + 1) % VOCAB
    for name, (xa, ia) in {"x": (x2, ids), "ids": (x, ids2)}.items():
        y2, _ = module(xa, token_ids=ia)
        assert torch.equal(y[:, :t], y2[:, :t]), f"{name}: an output before the changed token moved"
        assert (y[:, t] - y2[:, t]).abs().max() > 1e-6, f"{name}: the change did not reach position t"
    y3, _ = module(x, token_ids=ids2)  # the N-gram reaches t+1 and t+2, and the conv t+3 (dilation 3)
    assert (y[:, t + 2] - y3[:, t + 2]).abs().max() > 1e-6


def test_pieces_equal_whole():
    module = WithIds(make())
    x, ids = inputs(T=29)
    xi = torch.cat([x, ids[..., None].double()], -1)
    state = check_pieces(module, xi, [1, 2, 9, 20], 1e-12)
    assert state["token_ids"].shape == (2, 2) and state["conv"].shape == (2, 6, 12)


def test_packed_equals_separate():
    module = WithIds(make())
    x, ids = inputs(B=3, T=24, seed=1)
    xi = torch.cat([x, ids[..., None].double()], -1)
    rows = [[1, 9, 11, 3], [10, 2, 11, 1], [1, 9, 11, 3]]  # last documents shorter than the carried window
    check_packing(module, xi, rows, 1e-12)
    _, state0 = module(inputs(B=3, T=5, seed=2)[0].new_zeros(3, 5, 13).normal_())
    check_packing(module, xi, rows, 1e-12, state0=state0)


def tiny_lm_config(**extra):
    return load_config({"model": {"pattern": "n*-n-", "hidden_size": 32, "vocab_size": 50,
                                  "attention": {"num_heads": 2},
                                  "engram": {"table_size": 97, "heads_per_ngram": 2, "head_dim": 8, **extra}}})


def test_reference_lm_generates_in_pieces_like_whole():
    torch.manual_seed(0)
    model = megahybrid.build_model(tiny_lm_config()).double()
    ids = torch.randint(0, 50, (2, 17))
    whole = model(ids)
    state, parts = None, []
    for a, b in [(0, 5), (5, 6), (6, 17)]:
        logits, state = model(ids[:, a:b], state=state, return_state=True)
        parts.append(logits)
    assert_close("logits in pieces", whole, torch.cat(parts, 1), 1e-11)


def test_host_tables_are_not_moved_by_to():
    """CPU-only: the `meta` device stands in for an accelerator; dtype casts still apply."""
    torch.manual_seed(0)
    model = megahybrid.build_model(tiny_lm_config(host_tables=True))
    plain = megahybrid.build_model(tiny_lm_config())
    plain.load_state_dict(model.state_dict())
    ids = torch.randint(0, 50, (2, 9))
    assert torch.equal(model(ids), plain(ids))  # no-op on CPU
    model.double()
    assert model.layers[0].mixer.tables.weight.dtype == torch.float64
    model.to("meta")
    assert model.layers[0].mixer.tables.weight.device.type == "cpu"
    assert model.layers[0].mixer.key_proj.weight.device.type == "meta"
    plain.to("meta")
    assert plain.layers[0].mixer.tables.weight.device.type == "meta"


def test_config_errors_and_megatron_refusal_are_one_line():
    with pytest.raises(ConfigError, match=r"^model.engram.max_ngram=1: must be >= 2") as err:
        Engram(load_config({"model": {"pattern": "n", "engram": {"max_ngram": 1}}}).model)
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match=r"^model.post_norm_layers=\[0\]: layer 0 is engram"):
        megahybrid.build_model(load_config({"model": {"pattern": "n-", "post_norm_layers": [0]}}))
    with pytest.raises(ConfigError, match=r"^model.pattern=.*'n'.*megatron backend does not build") as err:
        check_megatron(load_config({"model": {"pattern": "M*n-"}}))
    assert "\n" not in str(err.value)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    prefix, tok = prepare([], str(tmp_path_factory.mktemp("data") / "corpus"), None, 512, corpus_bytes=200_000)
    return [f"data.paths=[{prefix}]", f"data.tokenizer={tok}"]


def test_tiny_hybrid_with_engram_trains(dataset, tmp_path, capsys):
    args = ["model.vocab_size=512", "model.hidden_size=64", "model.attention.num_heads=4",
            "model.engram.table_size=1009", "model.engram.head_dim=16",
            "train.steps=16", "train.seq_len=32", "train.micro_batch_size=4",
            "train.global_batch_size=4", "train.warmup_steps=2", "train.log_every=1", "train.eval_every=0",
            "train.save_every=16", "train.threads=1", "data.valid_fraction=0.1", *dataset]
    assert train_from_cli("Mn*-n-", str(tmp_path), args) == 0
    losses = [json.loads(line)["loss"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 16 and sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.1, losses  # corpus-independent margin
    capsys.readouterr()
    assert main(["describe", "--json", "n*-", "model.engram.table_size=101"]) == 0
    info = json.loads(capsys.readouterr().out)
    row = info["layers"][0]
    assert row["name"] == "engram" and row["params"] > 0 and row["flops_per_token"] > 0
