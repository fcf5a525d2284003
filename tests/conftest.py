import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run on the device machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


_ABSENT = object()


@pytest.fixture(autouse=True)
def _unblock_fla_after_each_test():
    """Tests that import transformers block `fla` (`sys.modules["fla"] = None`, tests/convert_checks.py)
    so it cannot bind FLA's GPU kernels on a CPU; undo that after the test, or later tests that load
    FLA's naive reference files would find `fla` unimportable."""
    before = sys.modules.get("fla", _ABSENT)
    yield
    if sys.modules.get("fla", _ABSENT) is None and before is not None:
        if before is _ABSENT:
            del sys.modules["fla"]
        else:
            sys.modules["fla"] = before
