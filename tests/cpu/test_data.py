"""Data pipeline: embedded corpus, tokenizer, Megatron .bin/.idx round trip, split, packing,
blending, stateless sampling and one-line data errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from megahybrid.config import Config, ConfigError, from_dict
from megahybrid.data import corpus, indexed
from megahybrid.data import tokenizer as tokenization
from megahybrid.data.loader import Data
from megahybrid.data.prepare import prepare


def make_config(**data) -> Config:
    """A config for loader tests (no model is built, so the layout stays the default)."""
    train = {"seq_len": 16, "micro_batch_size": 2, "global_batch_size": 8, "seed": 7}
    return from_dict(Config, {"model": {"vocab_size": 1000}, "train": train, "data": {"valid_fraction": 0.25, **data}})


def write_docs(prefix, docs, vocab_size=1000):
    return indexed.write(prefix, [np.asarray(d, dtype=np.int64) for d in docs], vocab_size)


def one_line(err) -> str:
    msg = str(err.value)
    assert "\n" not in msg, msg
    return msg


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A 200 KB slice of the embedded corpus, prepared like `megahybrid data prepare`."""
    out = tmp_path_factory.mktemp("data") / "stdlib"
    prefix, tok_path = prepare([], str(out), None, 512, corpus_bytes=200_000)
    return prefix, tok_path


def test_corpus_is_large_real_text_in_fixed_order():
    files = corpus.files()
    assert files == corpus.files()
    assert sum(f.stat().st_size for f in files) >= 10_000_000, "the embedded corpus should be >= 10 MB"
    first = next(corpus.documents())
    assert first == files[0].read_text(encoding="utf-8")
    cut = list(corpus.documents(max_bytes=50_000))
    assert 0 < sum(len(d.encode()) for d in cut) <= 50_000


def test_tokenizer_round_trips_text_and_checks_vocab(small, tmp_path):
    tok = tokenization.load(small[1])
    assert tok.get_vocab_size() == 512
    text = 'def f(x):\n    """Return x + 1 — naïve."""\n    return x + 1\n'
    assert tok.decode(tok.encode(text).ids) == text  # byte-level: no unknown tokens, exact decode
    assert tok.id_to_token(tokenization.eos_id(tok)) == tokenization.EOS
    with pytest.raises(ConfigError) as err:
        tokenization.check_vocab(tok, 300)
    assert "model.vocab_size=512" in one_line(err)
    with pytest.raises(ConfigError) as err:
        tokenization.load(tmp_path / "missing.json")
    assert "data.tokenizer=" in one_line(err)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError) as err:
        tokenization.load(tmp_path / "bad.json")
    assert "not a valid tokenizer.json" in one_line(err)


@pytest.mark.filterwarnings("ignore:Could not determine rank")  # Megatron's reader, outside torch.distributed
def test_round_trip_through_megatrons_reader(tmp_path, small):
    from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

    docs = [[5, 6, 7, 0], [9, 0], list(range(1, 300)) + [0]]
    assert write_docs(tmp_path / "ours", docs) == (3, sum(map(len, docs)))
    theirs = IndexedDataset(str(tmp_path / "ours"))
    assert [theirs[i].tolist() for i in range(len(theirs))] == docs
    assert theirs.index.dtype == np.uint16

    # A file written by Megatron's own builder (as tools/preprocess_data.py does) loads in Data.
    builder = IndexedDatasetBuilder(str(tmp_path / "meg.bin"), dtype=np.int32)
    for d in docs * 20:
        builder.add_document(torch.tensor(d), [len(d)])
    builder.finalize(str(tmp_path / "meg.idx"))
    data = Data(make_config(), [str(tmp_path / "meg")])
    batch = data.train_batch(0, 0)
    assert batch.tokens.shape == (2, 16) and batch.tokens.dtype == torch.int64

    # The embedded corpus prepared by `prepare` reads back as the tokenizer's encoding + EOS.
    tok = tokenization.load(small[1])
    ds = IndexedDataset(small[0])
    first = next(corpus.documents())
    assert ds[0].tolist() == tok.encode(first).ids + [tokenization.eos_id(tok)]


def test_split_is_by_whole_documents_and_stable():
    train, valid = indexed.split(1000, 0.01)
    assert len(valid) == 10 and len(train) == 990
    assert set(train.tolist()) | set(valid.tolist()) == set(range(1000)) and not set(train) & set(valid)
    assert np.diff(valid).min() > 50, "held-out documents are spread over the dataset"
    assert indexed.split(1000, 0.01)[1].tolist() == valid.tolist()
    assert len(indexed.split(10, 0.0)[1]) == 0


def test_same_seed_and_step_give_identical_batches(small):
    config = make_config()
    a, b = Data(config, [small[0]]), Data(config, [small[0]])
    for step, micro in [(0, 0), (3, 1), (250, 3)]:
        x, y = a.train_batch(step, micro), b.train_batch(step, micro)
        assert torch.equal(x.tokens, y.tokens) and torch.equal(x.seq_idx, y.seq_idx)
    assert not torch.equal(a.train_batch(0, 0).tokens, a.train_batch(1, 0).tokens)
    other = Data(make_config(), [small[0]])
    other.train.seed = 8
    assert not torch.equal(other.train_batch(0, 0).tokens, a.train_batch(0, 0).tokens)
    # Sharding: world=2 ranks together see exactly the world=1 global batch of the step.
    single = torch.cat([a.train_batch(5, m).tokens for m in range(4)])
    sharded = torch.cat([a.train_batch(5, m, rank=r, world=2).tokens for m in range(2) for r in range(2)])
    assert torch.equal(single, sharded)
    # Valid batches never change and never come from training documents.
    assert torch.equal(a.valid_batch(1).tokens, b.valid_batch(1).tokens)


def test_an_epoch_visits_every_window_once(tmp_path):
    write_docs(tmp_path / "d", [list(range(1, 100)) + [0]] * 4)  # 400 tokens: 24 windows of 16 (+1)
    data = Data(make_config(valid_fraction=0.0), [str(tmp_path / "d")])
    n = data.train.n_windows[0]
    starts = [data.train._window(0, g) for g in range(n)]
    assert sorted(starts) == list(range(n))
    assert [data.train._window(0, g) for g in range(n, 2 * n)] != starts  # fresh order next epoch


def test_packing_marks_document_boundaries(tmp_path):
    # Document k is k+1 repeated (length 3..9) and ends with EOS=0, so boundaries are known.
    docs = [[k + 1] * (3 + k % 7) + [0] for k in range(200)]
    write_docs(tmp_path / "p", docs)
    data = Data(make_config(valid_fraction=0.0), [str(tmp_path / "p")])
    for step in range(5):
        b = data.train_batch(step, 0)
        assert torch.equal(b.tokens[:, 1:], b.labels[:, :-1])
        for tokens, seq_idx in zip(b.tokens, b.seq_idx):
            assert seq_idx[0] == 0 and (seq_idx.diff() >= 0).all()
            # seq_idx steps up exactly after each EOS (0) and nowhere else ...
            assert torch.equal(seq_idx.diff(), (tokens[:-1] == 0).int())
            # ... so each document number covers one document: one fill value besides EOS.
            for k in seq_idx.unique():
                values = tokens[(seq_idx == k) & (tokens != 0)].unique()
                assert len(values) <= 1, (k, tokens, seq_idx)
    unpacked = Data(make_config(valid_fraction=0.0, pack=False), [str(tmp_path / "p")]).train_batch(0, 0)
    assert unpacked.seq_idx is None and torch.equal(unpacked.tokens, data.train_batch(0, 0).tokens)


def test_blending_follows_the_weights(tmp_path):
    write_docs(tmp_path / "low", [[1] * 50 + [0]] * 40)
    write_docs(tmp_path / "high", [[2] * 50 + [0]] * 40)
    data = Data(make_config(valid_fraction=0.0), [str(tmp_path / "low"), str(tmp_path / "high")], [0.8, 0.2])
    rows = torch.cat([data.train_batch(s, m).tokens for s in range(60) for m in range(4)])
    from_low = (rows.max(dim=1).values == 1).float().mean().item()
    assert 0.72 < from_low < 0.88, from_low


def test_data_errors_are_one_line(tmp_path):
    config = make_config()
    with pytest.raises(ConfigError) as err:
        Data(config, [str(tmp_path / "nothing")])
    assert "data.paths[0]=" in one_line(err) and "megahybrid data prepare" in str(err.value)
    write_docs(tmp_path / "empty", [])
    with pytest.raises(ConfigError) as err:
        Data(config, [str(tmp_path / "empty")])
    assert "empty" in one_line(err)
    write_docs(tmp_path / "short", [[3, 4, 0]] * 4)  # 12 tokens < seq_len + 1
    with pytest.raises(ConfigError) as err:
        Data(make_config(valid_fraction=0.0), [str(tmp_path / "short")])
    assert "fewer than one sequence" in one_line(err) and "train.seq_len" in str(err.value)
    write_docs(tmp_path / "big", [[5000] * 40 + [0]] * 4, vocab_size=6000)
    with pytest.raises(ConfigError) as err:
        Data(make_config(valid_fraction=0.0), [str(tmp_path / "big")]).train_batch(0, 0)
    assert "model.vocab_size=1000" in one_line(err)


def test_prepare_cli_reads_txt_and_jsonl(tmp_path, capsys):
    from megahybrid.cli import main

    (tmp_path / "a.txt").write_text("The quick brown fox jumps over the lazy dog. " * 30)
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"text": f"line {i}: hello world"}) for i in range(50)))
    out = tmp_path / "mine"
    assert main(["data", "prepare", str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl"),
                 "--out", str(out), "--vocab-size", "300"]) == 0
    printed = capsys.readouterr().out
    assert "51 documents" in printed and f"data.paths=[{out}]" in printed
    tok = tokenization.load(f"{out}.tokenizer.json")
    ds = indexed.open_dataset(out)
    assert tok.decode(ds[1].tolist()[:-1]) == "line 0: hello world"

    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"body": "no text key"}\n')
    assert main(["data", "prepare", str(tmp_path / "bad.jsonl"), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert "bad.jsonl:2" in err and "--json-key" in err and "\n" not in err
    assert main(["data", "prepare", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "x")]) == 2
    assert "no such file" in capsys.readouterr().err
