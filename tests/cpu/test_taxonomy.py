"""MegaCpp's A/M/D/E/R/C block taxonomy (megahybrid/taxonomy.py) and its column in `describe`.

The expected labels are written out here from the taxonomy's stated rules (the module docstring),
not read back from its table; every registered symbol must have one, plug-ins get "?" without failing.
"""

from __future__ import annotations

import json

from megahybrid.cli import main
from megahybrid.config import load_config
from megahybrid.describe import describe
from megahybrid.mixers import REGISTRY, LayerType
from megahybrid.taxonomy import LABELS, TAXONOMY, block_label

EXPECTED = {"A": "*+sfhwDn", "M": "Mm", "D": "dGk", "E": "E-c", "R": "ruob", "C": "y"}


def test_every_registered_symbol_has_a_label():
    missing = [s for s in REGISTRY if s != "p" and s not in TAXONOMY]
    assert not missing, f"symbols without a MegaCpp label: {missing}; add them to megahybrid/taxonomy.py"
    for symbol in REGISTRY:
        label, _ = block_label(symbol, load_config("M"))
        assert label != "?" and set(label.split("|")) <= set(LABELS), (symbol, label)


def test_labels_follow_the_stated_rules():
    for label, symbols in EXPECTED.items():
        for s in symbols:
            assert block_label(s)[0] == label, (s, block_label(s), label)
    assert block_label("w")[1].startswith("sparse") and block_label("D")[1].startswith("sparse")
    assert block_label("*")[1] == "dense" and block_label("-") == ("E", "dense") and block_label("E") == ("E", "routed")
    assert block_label("n")[1].startswith("engram")


def test_parallel_mixers_take_their_branches_labels():
    config = load_config("p", ["model.parallel_mixers.mixers=[attention,mamba2,hyena]"])
    assert block_label("p", config)[0] == "A|M|C"
    assert block_label("p")[0] == "?"  # no config: cannot know the branches


def test_plugin_symbol_is_labelled_unknown(monkeypatch):
    monkeypatch.setitem(REGISTRY, "Q", LayerType("Q", "plugin_mlp_for_taxonomy", "channel",
                                                 "megahybrid.mixers.mlp:MLP"))
    assert block_label("Q") == ("?", "")
    info = describe(load_config({"model": {"pattern": "Q*", "hidden_size": 32, "vocab_size": 64}}), seq_len=16)
    assert [(r["symbol"], r["block"]) for r in info["layers"]] == [("Q", "?"), ("*", "A")]


def test_describe_shows_the_labels(capsys):
    assert main(["describe", "--json", "M*-Eyo-", "model.hidden_size=64", "model.vocab_size=128",
                 "model.gdn.num_qk_heads=4", "model.moe.num_experts=4"]) == 0
    rows = json.loads(capsys.readouterr().out)["layers"]
    assert [r["block"] for r in rows] == ["M", "A", "E", "E", "C", "R", "E"]
    assert rows[3]["block_branch"] == "routed" and "gdn" in rows[5]["block_branch"]
    assert main(["describe", "M*-", "model.hidden_size=64", "model.vocab_size=128"]) == 0
    table = capsys.readouterr().out
    assert "block" in table.splitlines()[1]
    assert any(line.split()[1] == "*" and line.rstrip().endswith("A dense") for line in table.splitlines()[3:5])
