"""The reference LM as a whole: packed documents stay apart, state carries across pieces."""

import pytest
import torch

from megahybrid import build_model, load_config
from megahybrid.mixers.base import cu_seqlens_to_seq_idx
from tests.helpers import assert_close

PATTERN = "MG*E d-r-w-m-h-s"  # every layer type the reference builds


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = load_config("default:tiny", [f"model.pattern={PATTERN}", "model.attention.window=6",
                                       "model.hymba.attention_window=5"])
    return build_model(cfg).double().eval()


@pytest.mark.parametrize("return_state", [False, True], ids=["batched-padded", "per-document"])
def test_packed_equals_separate(model, return_state):
    """Two rows packed differently: each document equals its own run. (Both rows end in 9-token
    documents so the per-document path can stack their attention caches into one state.)"""
    rows = [[5, 17, 9], [13, 9, 9]]
    ids = torch.randint(0, model.config.vocab_size, (2, 31))
    seq_idx = torch.cat([cu_seqlens_to_seq_idx(torch.tensor([0, *torch.tensor(r).cumsum(0).tolist()]))
                         for r in rows])
    packed = model(ids, seq_idx=seq_idx, return_state=return_state)
    packed = packed[0] if return_state else packed
    for b, lengths in enumerate(rows):
        start = 0
        for n in lengths:
            alone = model(ids[b:b + 1, start:start + n])
            assert_close(f"row {b} document at {start}", alone, packed[b:b + 1, start:start + n], 1e-10)
            start += n


def test_pieces_with_state_equal_whole(model):
    ids = torch.randint(0, model.config.vocab_size, (2, 23))
    whole = model(ids)
    state, outs = None, []
    for a, b in [(0, 7), (7, 8), (8, 23)]:
        logits, state = model(ids[:, a:b], state=state, return_state=True)
        outs.append(logits)
    assert_close("logits in pieces", whole, torch.cat(outs, 1), 1e-10)


def test_training_step_reduces_loss():
    torch.manual_seed(0)
    model = build_model(load_config("default:tiny"))
    ids = torch.randint(0, 256, (4, 33))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        logits = model(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()) + model.aux_loss()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_post_norm_layers_compute_x_plus_norm_of_sublayer():
    """model.post_norm_layers: those blocks are x + norm(f(x)), the others x + f(norm(x)), against the
    block math written out here from the mixers and norms (float64, random norm weights)."""
    torch.manual_seed(0)
    cfg = load_config("default:tiny", ["model.pattern=G-*-", "model.post_norm_layers=[2, 3]"])
    lm = build_model(cfg).double().eval()
    with torch.no_grad():
        for layer in lm.layers:
            layer.norm.weight.normal_(1.0, 0.3)
    ids = torch.randint(0, cfg.model.vocab_size, (2, 9))
    with torch.no_grad():
        x = lm.embedding(ids)
        for i, layer in enumerate(lm.layers):
            mixer = lambda v: layer.mixer(v)[0]  # noqa: E731
            x = x + (layer.norm(mixer(x)) if i >= 2 else mixer(layer.norm(x)))
        expected = lm.final_norm(x) @ lm.lm_head.weight.T
        assert_close("post-norm LM", expected, lm(ids), 1e-12)
        pre = build_model(load_config("default:tiny", ["model.pattern=G-*-"])).double().eval()
        pre.load_state_dict(lm.state_dict())
        assert (pre(ids) - expected).abs().max() > 1e-3, "post-norm made no difference; the check cannot fail"


def test_post_norm_layers_out_of_range_is_one_line_error():
    from megahybrid.config import ConfigError

    message = r"model.post_norm_layers=\[4\]: must list distinct block indices in \[0, 4\)"
    with pytest.raises(ConfigError, match=message):
        load_config("default:tiny", ["model.pattern=G-*-", "model.post_norm_layers=[4]"])
