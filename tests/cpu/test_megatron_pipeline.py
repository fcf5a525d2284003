"""The Megatron backend's pipeline stages (`stage_layers`) are the ones Megatron's own
`select_pipeline_segment` picks for the same pattern (CPU: the pipeline group is faked)."""

from __future__ import annotations

import pytest
import torch

import megahybrid
from megahybrid.pattern import pipeline_pattern

CASES = [  # (pattern, pp, vpp, extra overrides)
    ("M*-EG*-E", 2, None, []),
    ("M*-EG*-E", 4, None, []),
    ("M*|-E|G*|-E", 2, 2, []),
    ("MM*|-|E|GG*-|E-|M", 2, 3, []),
    ("(M-M*-)x3", 3, None, []),
    ("MMMMM*-EG*-E", 2, None, ["parallel.pp_balance=flops"]),
    ("MMMMM*-EG*-E", 2, 2, ["parallel.pp_balance=flops"]),
]


@pytest.mark.parametrize("pattern,pp,vpp,extra", CASES)
def test_stages_match_megatron(monkeypatch, pattern, pp, vpp, extra):
    from megatron.core.models.hybrid import hybrid_layer_allocation
    from megatron.core.models.hybrid.hybrid_layer_allocation import select_pipeline_segment

    from megahybrid.megatron.model import stage_layers

    overrides = [f"parallel.pp={pp}", *([f"parallel.vpp={vpp}"] if vpp else []), *extra]
    config = megahybrid.load_config({"model": {"pattern": pattern}}, overrides)
    main = pipeline_pattern(config).main  # with the '|' that pp_balance=flops places
    seen = []
    monkeypatch.setattr(hybrid_layer_allocation, "log_on_each_pipeline_stage", lambda *a, **k: None)
    for rank in range(pp):
        monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None, r=rank: r)
        monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: pp)
        for v in range(vpp or 1):
            vp_stage = v if vpp else None
            want, offset = select_pipeline_segment(main, object(), vp_stage)
            got = stage_layers(config, rank, pp, vp_stage)
            assert [s.symbol for s in got] == list(want), (rank, v)
            assert [s.index for s in got] == list(range(offset, offset + len(want))), (rank, v)
            seen += [s.index for s in got]
    assert sorted(seen) == list(range(len(seen)))  # every layer on exactly one stage
